"""The documentation stays true to the code: the generated option reference, every relative link, and README's
first commands, run as a newcomer runs them."""

import json
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT, shared_or_skip
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


@pytest.mark.slow
def test_the_readmes_first_commands_need_nothing_but_the_install(tmp_path):
    """README's first fine-tune and generation, as written, from a folder holding nothing: only the model is the
    mini model instead of a hub name (no hub here), and the run a few steps long."""
    model = shared_or_skip("models", "mini-gpt2-fiction")
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    train = next(line for line in blocks[0].splitlines() if line.startswith("python train.py"))
    generate = next(line for line in blocks[1].splitlines() if line.startswith("python inference.py"))
    assert "--data demo:austen" in train

    def run(line: str, *extra: str) -> str:
        args = shlex.split(line.replace("--model gpt2-medium", f"--model {model}"))
        cmd = [sys.executable, str(ROOT / args[1]), *args[2:], *extra]
        done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    run(train, "--max-steps", "2", "--batch-size", "2", "--max-input-length", "64", "--sample-every", "0",
        "--eval-max-tokens", "256", "--cache-dir", "cache")  # fmt: skip
    assert json.loads((tmp_path / "GPT2_fine_tuned_Austen" / "run_config.json").read_text())["data"]["data"] == (
        "demo:austen"
    )
    out = run(generate, "--max_length", "8")
    assert "It is a truth universally acknowledged" in out
