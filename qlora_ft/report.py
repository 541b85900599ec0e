"""Plots (matplotlib, PNG) and the run's report.md: training curves, eval tables and charts, samples."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from qlora_ft import checkpoint


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut short by a kill
                continue
    return rows


def plot_training(run: Path, out: Path) -> bool:
    """training.png: train/validation loss, learning rate and tokens/s against step (from metrics.jsonl)."""
    rows = read_jsonl(run / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    if not train and not val:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train (mean over the log window)")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax.legend()
    axes[1].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[1].set(xlabel="step", ylabel="learning rate", title="learning rate")
    axes[2].plot([r["step"] for r in train], [r["tokens_per_second"] for r in train])
    axes[2].set(xlabel="step", ylabel="real tokens / s", title="throughput (since start or resume)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def plot_eval(result: dict[str, Any], out: Path) -> None:
    """eval.png: held-out perplexity per model, and the share of generations judged the target style (an
    instruction or chat run: response perplexity, ROUGE-L and format adherence)."""
    if "response_perplexity" in result:
        _plot_instruction_eval(result, out)
        return
    plt = _pyplot()
    style = result.get("style")
    fig, axes = plt.subplots(1, 2 if style else 1, figsize=(12 if style else 6, 4), squeeze=False)
    ppl = result["perplexity"]
    names = [("base", "base")]
    names += [
        (k, v)
        for k, v in (
            ("trained", "fine-tuned\n(as trained)"),
            ("fine_tuned", "fine-tuned\n(merged)"),
            ("lora_reference", "LoRA\nreference"),
        )
        if k in ppl
    ]
    ax = axes[0][0]
    bars = ax.bar([label for _, label in names], [ppl[k] for k, _ in names], color="tab:blue")
    ax.bar_label(bars, fmt="%.1f")
    tokens = result["held_out"]["tokens"]
    ax.set(ylabel="perplexity (lower is better)", title=f"held-out perplexity ({tokens:,} tokens)")
    if style:
        shares = style["judged_target"]
        keys = [k for k in ("base", "fine_tuned", "held_out_text") if k in shares]
        labels = {"base": "base", "fine_tuned": "fine-tuned", "held_out_text": "real held-out\nparagraphs"}
        values = [100 * shares[k]["share"] for k in keys]
        errors = [
            [100 * (shares[k]["share"] - shares[k]["ci_low"]) for k in keys],
            [100 * (shares[k]["ci_high"] - shares[k]["share"]) for k in keys],
        ]
        ax = axes[0][1]
        bars = ax.bar([labels[k] for k in keys], values, yerr=errors, capsize=6, color="tab:green")
        ax.bar_label(bars, fmt="%.0f%%", label_type="center")
        ax.set(ylim=(0, 100), ylabel="% judged target style (95% CI)", title="style classifier on generations")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _plot_instruction_eval(result: dict[str, Any], out: Path) -> None:
    """eval.png of an instruction or chat run: base vs fine-tuned response perplexity; ROUGE-L and format."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    names, labels = ["base", "fine_tuned"], ["base", "fine-tuned"]
    bars = axes[0].bar(labels, [result["response_perplexity"][k] for k in names], color="tab:blue")
    axes[0].bar_label(bars, fmt="%.1f")
    tokens = result["held_out"]["response_tokens"]
    axes[0].set(ylabel="perplexity (lower is better)", title=f"held-out response perplexity ({tokens:,} tokens)")
    width = 0.38
    for shift, (title, values) in zip((-width / 2, width / 2), (
        ("ROUGE-L F1", [result["rouge_l"][k] for k in names]),
        ("format adherence", [result["format"][k]["adherence"] for k in names]),
    ), strict=True):  # fmt: skip
        bars = axes[1].bar([i + shift for i in range(len(names))], values, width, label=title)
        axes[1].bar_label(bars, fmt="%.2f")
    n = result["generation"]["n_prompts"]
    axes[1].set(xticks=range(len(names)), xticklabels=labels, ylim=(0, 1.1), title=f"greedy answers to {n} records")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def eval_markdown(r: dict[str, Any]) -> str:
    """eval.json as Markdown: perplexity, merge parity, style, overfitting and diversity (an instruction or chat
    run: `instruction_eval_markdown`)."""
    if "response_perplexity" in r:
        return instruction_eval_markdown(r)
    lines = _perplexity_lines(r)
    if "merge_parity" in r:
        lines += _parity_lines(r["merge_parity"])
    if "style" in r:
        lines += _style_lines(r["style"])
    lines += _diversity_lines(r)
    return "\n".join(lines) + "\n"


def _perplexity_lines(r: dict[str, Any]) -> list[str]:
    ppl = r["perplexity"]
    lines = [f"Run `{r['run']}` ({r['method']}), base `{r['base_model']}`, on {r['device']}.", ""]
    lines += [
        f"Held-out: {r['held_out']['source']}: {r['held_out']['paragraphs']:,} paragraphs, "
        f"{r['held_out']['tokens']:,} target tokens.",
        "",
        "### Perplexity",
        "",
        "| model | held-out perplexity |",
        "|---|---|",
        f"| base (full precision) | {ppl['base']:.2f} |",
    ]
    if "trained" in ppl:
        lines.append(f"| fine-tuned, as trained (NF4 base + unmerged adapter) | {ppl['trained']:.2f} |")
    lines.append(
        f"| fine-tuned, as `inference.py` loads it ({r['generation']['fine_tuned_model']}) | {ppl['fine_tuned']:.2f} |"
    )
    if "lora_reference" in ppl:
        lines.append(f"| 16/32-bit LoRA reference (`{r['lora_reference']['run']}`) | {ppl['lora_reference']:.2f} |")
    return [*lines, "", f"Perplexity reduction, base -> fine-tuned: **{_pct(ppl['reduction'])}**."]


def _parity_lines(mp: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "### Merge parity",
        "",
        "KL divergence of next-token distributions from the model as trained (nats per token, mean over "
        "held-out tokens; 0 means identical):",
        "",
        "| merge target | KL from trained | perplexity |",
        "|---|---|---|",
    ]
    for name, v in mp["variants"].items():
        lines.append(
            f"| {name.removeprefix('merged_')}: {_describe(name)} | {v['kl_from_trained']:.3g} "
            f"| {v['perplexity']:.2f} |"
        )
    return [
        *lines,
        "",
        f"Closest to the trained model: **{mp['closest']}**; `inference.py`/`export` merge into "
        f"**{mp['default'].removeprefix('merged_')}** by default (`--merge-into`).",
    ]


def _style_lines(st: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "### Style",
        "",
        f"Classifier: {st['classifier']}, {st['paragraphs_per_class']:,} paragraphs per class, target "
        f"`{st['reference']}` vs contrast `{st['contrast']}`; 5-fold cross-validated accuracy "
        f"{100 * st['cv_accuracy_mean']:.1f}%.",
        "",
        "| text | judged target style | 95% CI | n |",
        "|---|---|---|---|",
    ]
    for k, v in st["judged_target"].items():
        lines.append(
            f"| {k.replace('_', ' ')} | **{_pct(v['share'])}** | {_pct(v['ci_low'])} - "
            f"{_pct(v['ci_high'])} | {v['n']} |"
        )
    return lines


def _diversity_lines(r: dict[str, Any]) -> list[str]:
    g = r["generation"]
    lines = [
        "",
        "### Overfitting and diversity",
        "",
        f"Generations: {g['per_prompt']} per prompt for prompts {g['prompts']}, {g['max_new_tokens']} new "
        f"tokens, top_k {g['top_k']}, top_p {g['top_p']}, temperature {g['temperature']}, seed {g['seed']} "
        "(the same for both models).",
        "",
        "| text | 8-grams copied from the training split | distinct-1 | distinct-2 | distinct-3 |",
        "|---|---|---|---|---|",
    ]
    for k, d in r["distinct_n"].items():
        copied = _pct(r["copied_8gram_share"][k]) if k in r["copied_8gram_share"] else "-"
        lines.append(f"| {k.replace('_', ' ')} | {copied} | {d['1']:.3f} | {d['2']:.3f} | {d['3']:.3f} |")
    return lines


def instruction_eval_markdown(r: dict[str, Any]) -> str:
    """eval.json of an instruction or chat run as Markdown: base vs fine-tuned, then every answered record."""
    held, gen, fmt, ppl = r["held_out"], r["generation"], r["format"], r["response_perplexity"]
    dropped = f" ({held['dropped_too_long']} longer than the run's --max-input-length left out)"
    template = "its chat template" if r["mode"] == "chat" else f"template `{r['template']}`"
    lines = [
        f"Run `{r['run']}` ({r['method']}, {r['mode']} records, {template}), base `{r['base_model']}`, on "
        f"{r['device']}.",
        "",
        f"Held-out: {held['source']}: {held['records']:,} records, {held['response_tokens']:,} response tokens"
        f"{dropped if held['dropped_too_long'] else ''}.",
        "",
        "| | base | fine-tuned |",
        "|---|---|---|",
        f"| response perplexity (held-out responses) | {ppl['base']:.2f} | {ppl['fine_tuned']:.2f} |",
        f"| ROUGE-L F1 (mean) | {r['rouge_l']['base']:.3f} | {r['rouge_l']['fine_tuned']:.3f} |",
        f"| format adherence | {_pct(fmt['base']['adherence'])} | {_pct(fmt['fine_tuned']['adherence'])} |",
        f"| ended with EOS | {_pct(fmt['base']['ended_with_eos'])} | {_pct(fmt['fine_tuned']['ended_with_eos'])} |",
        f"| wrote a template header | {_pct(fmt['base']['repeated_header'])} | "
        f"{_pct(fmt['fine_tuned']['repeated_header'])} |",
        "",
        f"Answers: greedy, to the first {gen['n_prompts']} held-out records, at most {gen['max_new_tokens']} new "
        f"tokens; the fine-tuned model as `qlora-ft generate` loads it ({gen['fine_tuned_model']}). Format "
        "adherence: the answer ended with EOS within that limit and wrote no template header "
        f"({', '.join(repr(s.strip()) for s in gen['stop'])}); ROUGE-L is scored on the answer cut at a header.",
        "",
        "### Held-out records",
    ]
    for i, item in enumerate(r["responses"], 1):
        lines += ["", f"#### {i}.", ""]
        if "messages" in item:
            lines += [f"**{m['role']}:**\n\n{_quote(m['content'])}\n" for m in item["messages"]]
        else:
            lines += ["**Instruction:**", "", _quote(item["instruction"]), ""]
            lines += ["**Input:**", "", _quote(item["input"]), ""] if item["input"].strip() else []
        lines += ["**Reference:**", "", _quote(item["reference"])]
        for name, title in (("base", "Base"), ("fine_tuned", "Fine-tuned")):
            a = item[name]
            verdict = "format ok" if a["format_ok"] else ("wrote a header" if a["repeated_header"] else "no EOS")
            lines += ["", f"**{title}** (ROUGE-L {a['rouge_l']:.3f}, {verdict}):", "", _quote(a["response"])]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    """`text` as a Markdown block quote, every line of it ("(empty)" for none)."""
    return "\n".join("> " + line for line in (text.splitlines() or ["(empty)"]))


def _describe(name: str) -> str:
    return {"merged_original": "original full-precision base", "merged_dequantized": "dequantised NF4 base"}[name]


def write_eval_markdown(result: dict[str, Any], out: Path) -> None:
    out.write_text("# Evaluation\n\n" + eval_markdown(result), encoding="utf-8")


def write_report(run: Path, out_dir: Path) -> Path:
    """report.md: summary, curves, evaluation (when eval has run) and the latest samples, in one page."""
    has_curves = plot_training(run, out_dir / "training.png")
    lines = [f"# Report: {run.resolve().name}", ""]
    summary = run / "train_summary.json"
    s = json.loads(summary.read_text(encoding="utf-8")) if summary.is_file() else {}
    if s:
        lines += ["## Training", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v:,.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in s.items()]
        lines.append("")
    if s.get("output_step") not in (None, s.get("steps")):
        lines += [f"The weights in this folder are step {s['output_step']}'s, the best validation loss "
                  f"(--output-best); the run ended at step {s['steps']}.", ""]  # fmt: skip
    if has_curves:
        lines += ["![training curves](training.png)", ""]
    eval_json = out_dir / "eval.json"
    if eval_json.is_file():
        result = json.loads(eval_json.read_text(encoding="utf-8"))
        lines += [
            "## Evaluation",
            "",
            eval_markdown(result),
            "![evaluation](eval.png)",
            "",
        ]
        lines += ["### Generations (first 3 per model)", ""] if "generations" in result else []
        for name, items in result.get("generations", {}).items():
            lines += [f"**{name.replace('_', ' ')}**", ""]
            for item in items[:3]:
                verdict = {True: " *(judged target style)*", False: ""}.get(item.get("judged_target"), "")
                text = f"**{item['prompt']}** {item['text']}" if item["prompt"] else item["text"]
                lines += ["> " + text.replace("\n", " ") + verdict, ""]
    samples = read_jsonl(run / "samples.jsonl")
    if samples:  # those of the weights in this folder where there are some (--output-best), else the latest
        steps = {r["step"] for r in samples}
        last = s["output_step"] if s.get("output_step") in steps else max(steps)
        mark = " (the weights in this folder)" if last == s.get("output_step") else ""
        lines += [f"## In-training samples at step {last}{mark}", ""]
        lines += [f"> {r['text']}".replace("\n", " ") + "\n" for r in samples if r["step"] == last]
    config = checkpoint.read_run_config(run)
    if config is not None:
        lines += [
            "## Configuration (run_config.json)",
            "",
            "```json",
            json.dumps(config, indent=2),
            "```",
        ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path
