"""The documentation stays true to the code: the generated option reference, and every relative link."""

import re

import pytest

from conftest import ROOT
from qlora_ft.options import options_document

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "sample_outputs").glob("*.md"))]


def test_options_reference_matches_the_code():
    written = (ROOT / "docs" / "options.md").read_text()
    assert written == options_document(), "docs/options.md is stale: python -m qlora_ft.options > docs/options.md"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_that_exist(doc):
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text())
    missing = [t for t in targets if "://" not in t and not (doc.parent / t).exists()]
    assert not missing, f"{doc.name} links to missing files: {missing}"
