"""lm-evaluation-harness reads our outputs as its `hf` model type does (lm_eval's own HFLM, offline): a run
folder as `peft=` over its base, and an `export` folder as a plain `pretrained=` model. Its log-likelihoods
equal those of the same model loaded with transformers/peft by hand."""

import pickle

import pytest
import torch

from conftest import make_paragraphs
from qlora_ft.cli import main, train_main

pytest.importorskip("lm_eval", reason='lm-evaluation-harness is not installed (pip install -e ".[harness]")')

# (context, continuation) as harness tasks write them: the word-boundary space opens the continuation; an
# empty context is scored after lm_eval's prefix token, which for GPT-2 is <|endoftext|>
PAIRS = [("Elizabeth said that", " her sister was happy"), ("The letter", " was silent."), ("", "Mr Darcy felt")]


@pytest.fixture(scope="module")
def run_and_export(tiny_model_dir, tmp_path_factory):
    """(run folder, export folder) of a 2-step QLoRA run on the tiny GPT-2."""
    root = tmp_path_factory.mktemp("harness")
    data = root / "data.pkl"
    data.write_bytes(pickle.dumps([{"sentence": p} for p in make_paragraphs(40)]))
    train_main(["--data", str(data), "--model", str(tiny_model_dir), "--batch-size", "4", "--max-input-length", "24",
                "--rank-lora", "4", "--lr", "2e-2", "--warmup-steps", "1", "--max-steps", "2", "--sample-every", "0",
                "--save-interval", "0", "--check-dir", str(root / "ckpt"),
                "--output-dir", str(root / "run")])  # fmt: skip
    main(["export", "--model_path", str(root / "run"), "--out", str(root / "merged")])
    return root / "run", root / "merged"


def harness_loglikelihoods(model_args: str) -> list[float]:
    """lm_eval's scores for PAIRS, its `hf` model built from a `--model_args` string as its CLI builds it."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM.create_from_arg_string(f"{model_args},dtype=float32", {"device": "cpu", "batch_size": 2})
    requests = [Instance("loglikelihood", {}, pair, idx) for idx, pair in enumerate(PAIRS)]
    return [logprob for logprob, _ in lm.loglikelihood(requests, disable_tqdm=True)]


def our_loglikelihoods(model, tokenizer) -> list[float]:
    """Sum of log p(continuation token | everything before it), the context tokenized as a prefix of the whole."""
    out = []
    for context, continuation in PAIRS:
        if context:
            ctx, ids = tokenizer(context).input_ids, tokenizer(context + continuation).input_ids
            assert ids[: len(ctx)] == ctx  # the pairs split at a token boundary, as lm_eval's _encode_pair assumes
        else:
            ctx = [tokenizer.eos_token_id]  # lm_eval's prefix token; the continuation without the tokenizer's own
            ids = ctx + tokenizer(continuation, add_special_tokens=False).input_ids  # (an export's adds the lead)
        ids = torch.tensor([ids])
        with torch.no_grad():
            logprobs = model(ids).logits[0, :-1].log_softmax(-1)  # (T-1, V): position t predicts token t+1
        targets = ids[0, len(ctx) :]
        out.append(logprobs[len(ctx) - 1 :].gather(-1, targets[:, None]).sum().item())
    return out


@pytest.mark.slow
def test_harness_scores_a_run_and_its_export_as_transformers_does(tiny_model_dir, run_and_export):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, export_dir = run_and_export
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    plain = our_loglikelihoods(base, tokenizer)

    # peft= loads the base in full precision and applies the adapter unmerged on it
    adapted = PeftModel.from_pretrained(base, str(run_dir)).eval()
    expected = our_loglikelihoods(adapted, tokenizer)
    got = harness_loglikelihoods(f"pretrained={tiny_model_dir},peft={run_dir}")
    assert got == pytest.approx(expected, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(got, plain, strict=True)) > 1e-3  # the adapter is what was scored

    # the export (merged into the dequantised NF4 base by default) is scored as the plain model it is
    exported = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    expected = our_loglikelihoods(exported, AutoTokenizer.from_pretrained(export_dir))
    got = harness_loglikelihoods(f"pretrained={export_dir}")
    assert got == pytest.approx(expected, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(got, plain, strict=True)) > 1e-3
