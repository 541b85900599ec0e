"""`qlora-ft eval` and `qlora-ft compare`: measure a fine-tuning run against its base model.

eval writes eval.json (every number), eval.md (the same as tables), eval.png and report.md into the run dir:
held-out perplexity of the base and the fine-tuned model, merge parity (KL of next-token distributions
between the trained 4-bit model and each merged model), a style classifier's verdict on generations from
both, copied 8-grams and distinct-n, and optionally a 16/32-bit LoRA run's perplexity beside QLoRA's.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from qlora_ft import checkpoint, metrics
from qlora_ft.checkpoint import adapter_base_name, is_adapter_folder
from qlora_ft.config import CompareConfig, EvalConfig, TrainConfig, train_config_from_dict
from qlora_ft.data import collate, eval_batches, load_corpus, split_corpus, windows_for
from qlora_ft.errors import UserError
from qlora_ft.generate import sample
from qlora_ft.model import (
    compute_dtype,
    default_device,
    keep_training_layout,
    load_base,
    load_dequantized_base,
    load_for_inference,
    load_tokenizer,
    merge_target,
    resolve_base_name,
)

log = logging.getLogger(__name__)

VARIANTS = {
    "trained": "base in NF4 + adapter, unmerged (what was trained)",
    "merged_original": "adapter merged into the original full-precision base",
    "merged_dequantized": "adapter merged into the dequantised NF4 base",
}


def read_run(path: Path) -> TrainConfig:
    if not path.is_dir():
        raise UserError(f"run directory not found: {path}")
    saved = checkpoint.read_run_config(path) if is_adapter_folder(path) else None
    if saved is None:
        raise UserError(f"{path} is not a qlora-ft run's output dir (needs {checkpoint.ADAPTER_CONFIG} and "
                        f"{checkpoint.CONFIG_JSON})")  # fmt: skip
    return train_config_from_dict(saved)


def _find_data(cfg: TrainConfig, run: Path) -> str:
    """The run's --data, as recorded (relative to where training ran, or to the run dir's parent)."""
    if cfg.data.data:
        recorded = Path(cfg.data.data)
        for candidate in (recorded, run.parent / recorded, run.resolve().parent / recorded):
            if candidate.exists():
                return str(candidate)
    raise UserError(
        f"the run's training data {cfg.data.data!r} (run_config.json) is not found from here; "
        "run eval from the directory training ran in"
    )


def paragraphs(source: str) -> list[str]:
    corpus = load_corpus(source)
    return list(dict.fromkeys(corpus.train + (corpus.validation or [])))


def held_out_batches(tokenizer, texts: list[str], max_len: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Padded batches of held-out windows (each paragraph scored once, as in training's validation)."""
    windows = windows_for(tokenizer, texts, max_len)
    rows = eval_batches([len(w) for w in windows], max_len, packing=False, batch_size=batch_size)
    return [collate([[windows[i] for i in row] for row in batch], tokenizer.pad_token_id) for batch in rows]


def _with_adapter(base, run: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(run)).eval()


def _summary(run: Path) -> dict[str, Any] | None:
    path = run / "train_summary.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def generations(model, tokenizer, args, n_per_prompt: int) -> list[dict[str, str]]:
    """`n_per_prompt` continuations of each prompt (prompt text removed), seeded with `args.seed`."""
    texts = sample(model, tokenizer, args.prompt, args, args.max_length, n_per_prompt, args.seed)
    out = []
    for prompt, group in zip(args.prompt, texts, strict=True):
        for text in group:
            out.append({"prompt": prompt, "text": text[len(prompt) :].strip() if text.startswith(prompt) else text})
    return out


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Score the run in `--model_path` against its base (see the module docstring); writes and returns eval.json."""
    args = cfg.eval
    if args.model_path is None:
        raise UserError("--model_path is required")
    run = Path(args.model_path)
    train_cfg = read_run(run)
    device = default_device()
    base_name = resolve_base_name(args.base_model or adapter_base_name(run))
    tokenizer = load_tokenizer(str(run) if (run / "tokenizer_config.json").is_file() else base_name)
    ref_cfg = read_run(Path(args.lora_reference)) if args.lora_reference else None
    data = _held_out(args, train_cfg, run, tokenizer)
    result: dict[str, Any] = {
        "run": str(run),
        "base_model": base_name,
        "method": "QLoRA" if train_cfg.model.qlora else ("LoRA" if train_cfg.model.lora else "full fine-tuning"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "held_out": {"source": data["name"], "paragraphs": len(data["texts"]), "tokens": data["tokens"]},
    }
    if summary := _summary(run):
        result["train_summary"] = summary
    models, fine_tuned_name = _models(args, train_cfg, run, base_name, device)
    if ref_cfg is not None:
        result["lora_reference"] = {"run": str(Path(args.lora_reference)), "qlora": ref_cfg.model.qlora,
                                    "lora": ref_cfg.model.lora,
                                    "train_summary": _summary(Path(args.lora_reference))}  # fmt: skip
    _score(models, fine_tuned_name, data["batches"], result)
    base, fine_tuned = models["base"], models[fine_tuned_name]
    models.clear()  # free the other variants before generating
    gens = _generate(args, base, fine_tuned, tokenizer, fine_tuned_name, result)
    texts = {k: [g["text"] for g in v] for k, v in gens.items()}
    # --- overfitting signals and diversity ------------------------------------------------------------
    index = metrics.NgramIndex(data["split"].train, 8)
    real = data["texts"][: len(texts["base"])]
    result["copied_8gram_share"] = {k: index.copied_share(v) for k, v in texts.items()}
    result["distinct_n"] = {k: {str(n): metrics.distinct_n(v, n) for n in (1, 2, 3)}
                            for k, v in {**texts, "held_out_text": real}.items()}  # fmt: skip
    if args.contrast:
        _style(args, train_cfg, data, gens, texts, result)
    result["generations"] = gens
    _write_eval(result, run, Path(args.out_dir or run))
    return result


def _held_out(args, train_cfg: TrainConfig, run: Path, tokenizer) -> dict[str, Any]:
    """The run's split, the held-out paragraphs and their batches; the style classifier's texts (read before
    the slow part, so a bad path fails at once)."""
    data_source = _find_data(train_cfg, run)
    corpus = load_corpus(data_source, train_cfg.data.text_column, train_cfg.data.keep_headings)
    split = split_corpus(corpus, train_cfg.data.train_size, train_cfg.data.seed)
    held_out = paragraphs(args.data) if args.data else split.validation
    data = {"split": split, "texts": held_out, "name": args.data or f"validation split of {train_cfg.data.data}"}
    data["batches"] = held_out_batches(tokenizer, held_out, train_cfg.data.max_input_length, args.batch_size)
    data["tokens"] = sum(int((b["labels"] != -100).sum()) for b in data["batches"])
    if args.contrast:
        data["contrast"] = paragraphs(args.contrast)
        # the classifier never sees the held-out paragraphs, so its verdict on them is a fair check
        held = set(held_out)
        data["reference"] = [p for p in (paragraphs(args.reference) if args.reference else split.train)
                             if p not in held]  # fmt: skip
    log.info("held-out: %d paragraphs, %s target tokens (%s)", len(held_out), f"{data['tokens']:,}", data["name"])
    return data


def _models(args, train_cfg: TrainConfig, run: Path, base_name: str, device) -> tuple[dict[str, Any], str]:
    """Every model to score by name (see VARIANTS), in eval mode, and the name of the one inference uses."""
    dtype = compute_dtype("auto", device)
    on_4bit = bool(train_cfg.model.qlora)
    models = {"base": load_base(base_name, False, dtype, device)}
    if train_cfg.model.lora:
        trained_base = load_base(base_name, on_4bit, dtype, device)
        if on_4bit:
            keep_training_layout(trained_base)
        models["trained"] = _with_adapter(trained_base, run)
        models["merged_original"] = _with_adapter(load_base(base_name, False, dtype, device), run).merge_and_unload()
        if on_4bit:
            models["merged_dequantized"] = _with_adapter(load_dequantized_base(base_name, dtype, device), run)
            models["merged_dequantized"] = models["merged_dequantized"].merge_and_unload()
        fine_tuned_name = "merged_" + merge_target(run, "auto")  # what inference.py and export use
    else:  # full fine-tuning: the run dir holds the whole model
        models["fine_tuned"], _ = load_for_inference(str(run), base_name, False, device)
        fine_tuned_name = "fine_tuned"
    if args.lora_reference:
        models["lora_reference"], _ = load_for_inference(args.lora_reference, base_name, False, device, "original")
    for model in models.values():
        model.eval()
    return models, fine_tuned_name


def _score(models: dict[str, Any], fine_tuned_name: str, batches, result: dict[str, Any]) -> None:
    """Perplexity and merge parity: every model scored in one pass over the held-out tokens."""
    progress = tqdm(batches, desc=f"scoring {len(models)} models", unit="batch", dynamic_ncols=True)
    scores = metrics.compare_models(models, progress, "trained" if "trained" in models else None)
    perplexity = {name: scores.perplexity(name) for name in models}
    perplexity["fine_tuned"] = perplexity[fine_tuned_name]
    perplexity["reduction"] = 1 - perplexity["fine_tuned"] / perplexity["base"]
    result["perplexity"] = perplexity
    if "trained" in models:
        parity = {name: {"kl_from_trained": scores.kl[name], "perplexity": perplexity[name]}
                  for name in models if name.startswith("merged_")}  # fmt: skip
        result["merge_parity"] = {"variants": parity, "default": fine_tuned_name,
                                  "closest": min(parity, key=lambda k: parity[k]["kl_from_trained"])}  # fmt: skip
        for name, v in parity.items():
            log.info("%s: KL from the trained model %.3g nats/token, perplexity %.2f", name, v["kl_from_trained"],
                     v["perplexity"])  # fmt: skip
    log.info("perplexity: base %.2f -> fine-tuned %.2f (%.0f%% lower)", perplexity["base"], perplexity["fine_tuned"],
             100 * perplexity["reduction"])  # fmt: skip


def _generate(args, base, fine_tuned, tokenizer, fine_tuned_name: str, result: dict[str, Any]) -> dict[str, list]:
    """Generations of both models: the same prompts, seed and sampling."""
    n_per_prompt = math.ceil(args.n_generations / len(args.prompt))
    log.info("generating %d texts per model", n_per_prompt * len(args.prompt))
    gens = {"base": generations(base, tokenizer, args, n_per_prompt),
            "fine_tuned": generations(fine_tuned, tokenizer, args, n_per_prompt)}  # fmt: skip
    result["generation"] = {"prompts": args.prompt, "per_prompt": n_per_prompt, "max_new_tokens": args.max_length,
                            "seed": args.seed, "top_k": args.top_k, "top_p": args.top_p,
                            "temperature": args.temperature, "fine_tuned_model": fine_tuned_name}  # fmt: skip
    return gens


def _style(args, train_cfg: TrainConfig, data: dict[str, Any], gens, texts, result: dict[str, Any]) -> None:
    """The style score: the share of each model's generations a classifier (target vs contrast) judges target."""
    log.info("training the style classifier (5-fold cross-validation first)")
    classifier = metrics.StyleClassifier(seed=args.seed).fit(data["reference"], data["contrast"])
    held_long = [t for t in data["texts"] if len(t.split()) >= classifier.min_words]
    result["style"] = {
        "reference": args.reference or train_cfg.data.data,
        "contrast": args.contrast,
        "classifier": "char 2-4-gram + word 1-2-gram TF-IDF, logistic regression (scikit-learn)",
        "paragraphs_per_class": classifier.n_per_class,
        "cv_accuracy_mean": sum(classifier.cv_accuracy) / len(classifier.cv_accuracy),
        "cv_accuracy": classifier.cv_accuracy,
        "judged_target": {
            **{k: classifier.target_share(v) for k, v in texts.items()},
            "held_out_text": classifier.target_share(held_long),
        },
    }
    shares = result["style"]["judged_target"]
    log.info("judged target style: base %.0f%%, fine-tuned %.0f%% (classifier CV accuracy %.3f)",
             100 * shares["base"]["share"], 100 * shares["fine_tuned"]["share"],
             result["style"]["cv_accuracy_mean"])  # fmt: skip
    for name, items in gens.items():
        for item, hit in zip(items, classifier.is_target(texts[name]), strict=True):
            item["judged_target"] = hit


def _write_eval(result: dict[str, Any], run: Path, out_dir: Path) -> None:
    from qlora_ft.report import plot_eval, write_eval_markdown, write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    write_eval_markdown(result, out_dir / "eval.md")
    plot_eval(result, out_dir / "eval.png")
    write_report(run, out_dir)
    log.info("wrote eval.json, eval.md, eval.png and report.md to %s", out_dir)


# ----------------------------------------------------------------------------------------------------------
# compare


def run_compare(cfg: CompareConfig) -> Path:
    """Markdown: base vs fine-tuned generations for the same prompts, seed and sampling settings."""
    args = cfg.compare
    if args.model_path is None:
        raise UserError("--model_path is required")
    run = Path(args.model_path)
    if not run.is_dir() or not is_adapter_folder(run):
        raise UserError(f"{args.model_path} is not a directory holding an adapter (adapter_config.json)")
    out = Path(args.out) if args.out else run / "compare.md"
    device = default_device()
    base_name = args.base_model or adapter_base_name(run)
    prompts = args.prompt or [""]
    fine_tuned, tokenizer = load_for_inference(str(run), base_name, False, device, args.merge_into)
    base = load_base(resolve_base_name(base_name), False, fine_tuned.dtype, device).eval()
    truncate = args.truncate_prompt
    results = {
        name: sample(model, tokenizer, prompts, args, args.max_length, args.n_return_seqs, args.seed, truncate=truncate)
        for name, model in (("base", base), ("fine_tuned", fine_tuned))
    }
    target = merge_target(run, args.merge_into)
    lines = [
        f"# Base vs fine-tuned: {run.name}",
        "",
        f"- base model: `{base_name}`",
        f"- fine-tuned: `{run}` (adapter merged into the {'dequantised NF4' if target == 'dequantized' else 'original'}"
        " base)",
        f"- sampling: top_k {args.top_k}, top_p {args.top_p}, temperature {args.temperature}, "
        f"{args.max_length} new tokens, seed {args.seed} (the same for both models)",
    ]
    if s := _summary(run):
        before, after = s.get("initial_val_loss") or math.nan, s.get("final_val_loss") or math.nan
        lines.append(f"- training: {s.get('steps')} steps, {s.get('train_tokens_total', 0):,} tokens, "
                     f"validation loss {before:.3f} -> {after:.3f}")  # fmt: skip
    for i, prompt in enumerate(prompts):
        lines += ["", f"## Prompt {i + 1}: {prompt!r}" if prompt else f"## Prompt {i + 1}: (empty: <|endoftext|>)"]
        for name, title in (("base", "Base"), ("fine_tuned", "Fine-tuned")):
            lines += ["", f"**{title}**", ""]
            for text in results[name][i]:
                lines += ["> " + text.replace("\n", " "), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    log.info("wrote %s", out)
    return out
