"""Which defaults suit instruction fine-tuning: one training run per configuration, same data, seed, split
and step budget, each scored on validation response loss and on format adherence.

    python bench/instruct_defaults.py --model ../shared/models/mini-gpt2-fiction \\
        --data ../shared/data/instructions/instruction-data.json --max-steps 60

Each run goes through `python train.py` (the user's entry point) in a subprocess. Reported per configuration:
- the validation loss of the run's train_summary.json (`final_val_loss`; the loop's validation loss counts
  only labelled tokens, i.e. the responses and their EOS) and its perplexity, plus the untrained base's;
- format adherence on `--n-prompts` held-out instructions (the run's own validation split): greedy generation
  with the template's prompt (`generate.instruction_prompt`, as `generate.respond` prompts), scored with
  `templates.check_format` (ended with EOS within `--max-new-tokens`, and wrote no template header);
- ROUGE-L of those responses against the references (`templates.rouge_l`), and the run's wall time.

Prints a Markdown table and writes bench/results/instruct-defaults.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlora_ft.config import TrainConfig  # noqa: E402
from qlora_ft.data.prepare import prepare_data, read_template  # noqa: E402
from qlora_ft.data.records import Instruction  # noqa: E402
from qlora_ft.generate import instruction_prompt  # noqa: E402
from qlora_ft.model import load_for_inference, load_tokenizer  # noqa: E402
from qlora_ft.options import parse_config  # noqa: E402
from qlora_ft.templates import check_format, cut_at_stop, rouge_l  # noqa: E402

# name -> train.py options that differ between configurations (everything else is shared, see `base_argv`)
CONFIGS: dict[str, list[str]] = {
    name: options.split()
    for name, options in {
        "qlora-2e-4-r64a16-attn": "--qlora True --lr 2e-4 --rank-lora 64 --alpha-lora 16 --targets-lora c_attn c_proj",
        "qlora-3e-4-r16a32-all": "--qlora True --lr 3e-4 --rank-lora 16 --alpha-lora 32 --targets-lora all-linear",
        "qlora-1e-3-r16a32-all": "--qlora True --lr 1e-3 --rank-lora 16 --alpha-lora 32 --targets-lora all-linear",
        "qlora-3e-4-r64a128-all": "--qlora True --lr 3e-4 --rank-lora 64 --alpha-lora 128 --targets-lora all-linear",
        "full-5e-5": "--qlora False --lr 5e-5",
        "full-2e-4": "--qlora False --lr 2e-4",
    }.items()
}


def base_argv(args, out_dir: Path) -> list[str]:
    """The options every configuration shares: data, model, budget, seed and split."""
    return ["--data", args.data, "--model", args.model, "--max-steps", str(args.max_steps),
            "--batch-size", str(args.batch_size), "--max-input-length", str(args.max_input_length),
            "--seed", str(args.seed), "--sample-every", "0", "--save-interval", "0", "--log-every", "10",
            "--output-dir", str(out_dir / "run"), "--check-dir", str(out_dir / "ckpt")]  # fmt: skip


def held_out(args, tokenizer) -> list[Instruction]:
    """The first `--n-prompts` records of the runs' validation split (the package's own seeded split)."""
    cfg = parse_config(TrainConfig, ["--data", args.data, "--model", args.model, "--seed", str(args.seed),
                                     "--max-input-length", str(args.max_input_length)], "train.py", "")  # fmt: skip
    data = prepare_data(cfg, tokenizer)
    records = data.read(data.validation.record)  # the validation records that fit, in window order
    return [r for r in records if isinstance(r, Instruction)][: args.n_prompts]


@torch.no_grad()
def adherence(run: Path, prompts: list[Instruction], max_new_tokens: int) -> dict:
    """Greedy responses of the trained run to `prompts`, without stop strings (so that a repeated header shows),
    scored by `check_format`; plus ROUGE-L of the cut responses against the references."""
    model, tokenizer = load_for_inference(str(run), None, False, torch.device("cpu"))
    template = read_template(run)
    checks, responses = [], []
    for record in prompts:
        prompt_ids, stop = instruction_prompt(template, tokenizer, record.instruction, record.input)
        input_ids = torch.tensor([prompt_ids])  # training's encoding, leading <eos> included
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        new_ids = out[0, input_ids.shape[1] :].tolist()
        upto = new_ids.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in new_ids else len(new_ids)
        text = tokenizer.decode(new_ids[:upto], skip_special_tokens=True)
        checks.append(check_format(new_ids, text, tokenizer.eos_token_id, max_new_tokens, stop))
        responses.append(cut_at_stop(text, stop).strip())
    n = len(checks)
    return {
        "format_ok": sum(c.ok for c in checks) / n,
        "ended_with_eos": sum(c.ended for c in checks) / n,
        "repeated_header": sum(c.repeated_header for c in checks) / n,
        "rouge_l": sum(rouge_l(responses, [r.output for r in prompts])) / n,
        "examples": [
            {"instruction": r.instruction, "input": r.input, "reference": r.output, "response": t}
            for r, t in zip(prompts[:3], responses[:3], strict=True)
        ],  # fmt: skip
    }


def run_one(name: str, args, prompts: list[Instruction], work: Path) -> dict:
    out_dir = work / name
    cmd = [sys.executable, str(ROOT / "train.py"), *base_argv(args, out_dir), *CONFIGS[name]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((out_dir / "run" / "train_summary.json").read_text())
    result = {"options": CONFIGS[name], "wall_seconds": wall, **{k: summary[k] for k in (
        "final_val_loss", "final_val_perplexity", "initial_val_loss", "steps", "epochs", "train_tokens",
        "tokens_per_second", "trainable_parameters")}}  # fmt: skip
    result.update(adherence(out_dir / "run", prompts, args.max_new_tokens))
    print(f"{name}: val {result['final_val_loss']:.4f}, format ok {result['format_ok']:.0%}, {wall:.0f} s",
          flush=True)  # fmt: skip
    return result


def table(results: dict[str, dict]) -> str:
    lines = ["| configuration | val response loss | val ppl | format ok | ended w/ EOS | repeated header | "
             "ROUGE-L | trainable params | wall s |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        lines.append(f"| {name} | {r['final_val_loss']:.4f} | {r['final_val_perplexity']:.1f} | {r['format_ok']:.0%} "
                     f"| {r['ended_with_eos']:.0%} | {r['repeated_header']:.0%} | {r['rouge_l']:.3f} | "
                     f"{r['trainable_parameters']:,} | {r['wall_seconds']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT.parent / "shared/models/mini-gpt2-fiction"))
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/instructions/instruction-data.json"))
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-input-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--n-prompts", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names from: " + ", ".join(CONFIGS))
    p.add_argument("--out", default=str(ROOT / "bench/results/instruct-defaults.json"))
    args = p.parse_args()
    names = args.configs.split(",")
    prompts = held_out(args, load_tokenizer(args.model))
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="instruct-defaults-") as work:
        for name in names:
            results[name] = run_one(name, args, prompts, Path(work))
    first = next(iter(results.values()))
    print(f"\nbase model (untrained) validation response loss: {first['initial_val_loss']:.4f}\n")
    print(table(results))
    command = "python bench/instruct_defaults.py " + " ".join(sys.argv[1:])
    Path(args.out).write_text(json.dumps({"command": command, "threads": torch.get_num_threads(),
                                          "settings": {k: v for k, v in vars(args).items() if k != "out"},
                                          "results": results}, indent=2) + "\n")  # fmt: skip
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
