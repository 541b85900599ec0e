"""Which token to put before a paragraph: a model's held-out perplexity on Austen paragraphs with each candidate.

    python bench/leading_token.py --model /tmp/smollm2-hf          # to_hf.py's SmolLM2-135M-Instruct folder

Candidates: the tokenizer's EOS, its BOS, `<|endoftext|>` (where the vocabulary has it and it is neither), and
no leading token. Each paragraph (a seeded sample of --paragraphs from the Austen novels, cut to --max-tokens)
is scored twice: over its tokens from the second on (the same tokens for every candidate, "none" included), and
over all its tokens (the first predicted from the leading token alone; not defined for "none"). Writes
bench/results/leading-token.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlora_ft.data.records import iter_paragraphs  # noqa: E402
from qlora_ft.data.sources import resolve  # noqa: E402

AUSTEN = ROOT.parent / "shared" / "data" / "corpora" / "austen"


def candidates(tokenizer) -> dict[str, int | None]:
    out: dict[str, int | None] = {f"EOS {tokenizer.eos_token}": tokenizer.eos_token_id}
    if tokenizer.bos_token_id is not None and tokenizer.bos_token_id != tokenizer.eos_token_id:
        out[f"BOS {tokenizer.bos_token}"] = tokenizer.bos_token_id
    endoftext = tokenizer.get_vocab().get("<|endoftext|>")
    if endoftext is not None and endoftext not in out.values():
        out["<|endoftext|>"] = endoftext
    out["none"] = None
    return out


def sample(tokenizer, n: int, max_tokens: int, seed: int) -> list[list[int]]:
    paragraphs = [p for p in iter_paragraphs(resolve(str(AUSTEN))) if len(p.split()) >= 8]
    chosen = random.Random(seed).sample(paragraphs, n)
    return [tokenizer(p, add_special_tokens=False)["input_ids"][:max_tokens] for p in chosen]


def score(model, lead: int | None, paragraphs: list[list[int]], batch: int) -> tuple[float, float, int, int]:
    """(NLL of tokens 2.. , NLL of every token, their counts) summed over the paragraphs."""
    rest = whole = 0.0
    n_rest = n_whole = 0
    for start in range(0, len(paragraphs), batch):
        part = paragraphs[start : start + batch]
        rows = [([lead] if lead is not None else []) + p for p in part]
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for i, row in enumerate(rows):
            offset = 1 if lead is not None else 0  # position of the paragraph's first token
            nll = -logp[i, : len(row) - 1].gather(-1, torch.tensor(row[1:])[:, None])[:, 0]
            rest += nll[offset:].sum().item()  # from the paragraph's second token
            n_rest += len(row) - 1 - offset
            if lead is not None:
                whole += nll.sum().item()
                n_whole += len(row) - 1
    return rest, whole, n_rest, n_whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--paragraphs", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "leading-token.json"))
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    paragraphs = sorted(sample(tokenizer, args.paragraphs, args.max_tokens, args.seed), key=len)
    start = time.perf_counter()
    rows = {}
    for name, lead in candidates(tokenizer).items():
        rest, whole, n_rest, n_whole = score(model, lead, paragraphs, args.batch)
        rows[name] = {"id": lead, "ppl_from_second_token": math.exp(rest / n_rest), "tokens": n_rest,
                      "ppl_all_tokens": math.exp(whole / n_whole) if n_whole else None}  # fmt: skip
        print(f"{name:24} id {lead!s:5} ppl (2nd token on) {rows[name]['ppl_from_second_token']:8.3f}  "
              f"ppl (all tokens) {rows[name]['ppl_all_tokens'] or float('nan'):8.3f}", flush=True)  # fmt: skip
    result = {"command": "python bench/leading_token.py " + " ".join(sys.argv[1:]), "model": args.model,
              "paragraphs": len(paragraphs), "seconds": time.perf_counter() - start, "candidates": rows}  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
