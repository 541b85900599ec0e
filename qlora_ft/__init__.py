"""qlora-ft: QLoRA fine-tuning of GPT-2-family causal language models to a writing style."""

__version__ = "0.2.0"  # the one place the version is written (pyproject.toml reads it)
