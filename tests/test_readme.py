from conftest import ROOT
from qlora_ft.config import options_reference


def test_readme_option_tables_match_the_code():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- options:start -->\n", 1)[1].split("<!-- options:end -->", 1)[0]
    assert block == options_reference(), "README option tables are stale: regenerate with python -m qlora_ft.config"
