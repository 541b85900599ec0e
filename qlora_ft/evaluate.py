"""`qlora-ft eval` and `qlora-ft compare`: measure a fine-tuning run against its base model.

eval writes eval.json (every number), eval.md (the same as tables), eval.png and report.md into the run dir:
held-out perplexity of the base and the fine-tuned model, merge parity (KL of next-token distributions
between the trained 4-bit model and each merged model), a style classifier's verdict on generations from
both, copied 8-grams and distinct-n, and optionally a 16/32-bit LoRA run's perplexity beside QLoRA's.

On an instruction or chat run (its run_config.json holds the template it trained with) eval measures what
such a run is for instead: the base's and the fine-tuned model's perplexity on the held-out responses (the
tokens training's validation scores), their greedy answers to the first `--n-prompts` held-out records,
ROUGE-L F1 against the references, and format adherence (answers that end with EOS within `--max-length`
tokens without writing a template header).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from qlora_ft import metrics
from qlora_ft.checkpoint import adapter_base_name, is_adapter_folder
from qlora_ft.config import TrainConfig
from qlora_ft.data.batches import Windows, held_out_batches
from qlora_ft.data.encode import generation_prompt, prompt_ids
from qlora_ft.data.prepare import held_out_data, read_run, read_template, run_data
from qlora_ft.data.records import Record, iter_paragraphs, prompt_side
from qlora_ft.data.sources import resolve
from qlora_ft.errors import UserError
from qlora_ft.generate import greedy_answers, sample, stop_strings
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
from qlora_ft.run_options import CompareConfig, EvalConfig
from qlora_ft.templates import Template, rouge_l
from qlora_ft.training.validate import validation_loss

log = logging.getLogger(__name__)

VARIANTS = {
    "trained": "base in NF4 + adapter, unmerged (what was trained)",
    "merged_original": "adapter merged into the original full-precision base",
    "merged_dequantized": "adapter merged into the dequantised NF4 base",
}


def paragraphs(source: str) -> list[str]:
    """The distinct paragraphs of `source`, read as training reads text (for the style classifier)."""
    return list(dict.fromkeys(iter_paragraphs(resolve(source))))


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
    adapter = is_adapter_folder(run)
    base_name = resolve_base_name(args.base_model or (adapter_base_name(run) if adapter else train_cfg.model.model))
    tokenizer = load_tokenizer(str(run) if (run / "tokenizer_config.json").is_file() else base_name)
    if (template := read_template(run)) is not None:  # an instruction or chat run
        return instruction_eval(args, train_cfg, template, run, base_name, tokenizer, device)
    if not adapter:
        raise UserError(f"{run} is a fully fine-tuned text run: eval compares a text run's adapter with its base "
                        "(instruction and chat runs are scored either way)")  # fmt: skip
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
    index = metrics.NgramIndex(data["train"], 8)
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
    data = run_data(train_cfg, run, tokenizer, None)
    train = data.read(data.split.train_idx)
    held = held_out_data(train_cfg, args.data, tokenizer, None) if args.data else data
    texts = held.read(held.split.val_idx)
    out = {"train": train, "texts": texts, "name": args.data or f"validation split of {train_cfg.data.data}"}
    out["batches"] = held_out_batches(held.validation, tokenizer.pad_token_id, args.batch_size)
    out["tokens"] = sum(int((b["labels"] != -100).sum()) for b in out["batches"])
    if args.contrast:
        out["contrast"] = paragraphs(args.contrast)
        # the classifier never sees the held-out paragraphs, so its verdict on them is a fair check
        seen = set(texts)
        out["reference"] = [p for p in (paragraphs(args.reference) if args.reference else train) if p not in seen]
    log.info("held-out: %d paragraphs, %s target tokens (%s)", len(texts), f"{out['tokens']:,}", out["name"])
    return out


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
# eval of an instruction or chat run

# eval options that measure text runs only (style classifier, sampled generations and their copying)
TEXT_ONLY_OPTIONS = ("reference", "contrast", "lora_reference", "prompt", "n_generations", "top_k", "top_p",
                     "temperature")  # fmt: skip


@dataclass
class HeldOutRecords:
    """Held-out records of an instruction or chat run, `records[i]` encoded as window i of `windows`, its loss
    mask 1 on its response tokens only; `n_dropped` more were longer than the run's --max-input-length."""

    records: list[Record]
    windows: Windows
    source: str
    n_dropped: int = 0


def instruction_eval(args, train_cfg: TrainConfig, template: Template, run: Path, base_name: str, tokenizer,
                     device) -> dict[str, Any]:  # fmt: skip
    """eval of a run trained on instruction or chat records (see the module docstring); writes and returns
    eval.json. The held-out records are the run's validation split, or every record of `--data`."""
    mode = "chat" if template.chat_template is not None else "instruction"  # as `generate.respond` prompts
    _warn_text_only(args, mode)
    held = instruction_held_out(args, train_cfg, template, run, tokenizer)
    batches = held_out_batches(held.windows, tokenizer.pad_token_id, args.batch_size)
    result: dict[str, Any] = {
        "run": str(run),
        "base_model": base_name,
        "method": "QLoRA" if train_cfg.model.qlora else ("LoRA" if train_cfg.model.lora else "full fine-tuning"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "mode": mode,
        "template": template.name,
        "held_out": {
            "source": held.source,
            "records": len(held.records),
            "dropped_too_long": held.n_dropped,
            "response_tokens": sum(int((b["labels"] != -100).sum()) for b in batches),
        },
    }
    if summary := _summary(run):
        result["train_summary"] = summary
    fine_tuned, _ = load_for_inference(str(run), base_name, False, device)  # as `qlora-ft generate` loads it
    models = {"base": load_base(base_name, False, fine_tuned.dtype, device).eval(), "fine_tuned": fine_tuned}
    _response_perplexity(models, batches, result)
    _answer_held_out(models, tokenizer, template, held.records[: args.n_prompts], args.max_length, result)
    merged = "merged_" + merge_target(run, "auto") if is_adapter_folder(run) else "fully fine-tuned model"
    result["generation"]["fine_tuned_model"] = merged
    _write_eval(result, run, Path(args.out_dir or run))
    return result


def _response_perplexity(models: dict[str, Any], batches, result: dict[str, Any]) -> None:
    """Each model's loss and perplexity on the held-out responses: the loss training's validation computes."""
    scores = {name: validation_loss(model, batches) for name, model in models.items()}
    result["response_loss"] = {name: loss for name, (loss, _) in scores.items()}
    ppl = {name: perplexity for name, (_, perplexity) in scores.items()}
    result["response_perplexity"] = {**ppl, "reduction": 1 - ppl["fine_tuned"] / ppl["base"]}
    log.info("response perplexity: base %.2f -> fine-tuned %.2f", ppl["base"], ppl["fine_tuned"])


def _answer_held_out(models: dict[str, Any], tokenizer, template: Template, records: list[Record],
                     max_new_tokens: int, result: dict[str, Any]) -> None:  # fmt: skip
    """Each model's greedy answers to `records`, their ROUGE-L against the references and their format."""
    stop = stop_strings(template, tokenizer)
    prompts = [generation_prompt(record, template, tokenizer) for record in records]  # (prompt, reference)
    ids = [prompt_ids(record, template, tokenizer) for record in records]  # the prompts as training encoded them
    log.info("answering %d held-out records greedily with each model", len(records))
    answers = {name: greedy_answers(model, tokenizer, ids, max_new_tokens, stop) for name, model in models.items()}
    result["generation"] = {"decoding": "greedy", "n_prompts": len(records), "max_new_tokens": max_new_tokens,
                            "stop": list(stop)}  # fmt: skip
    result["rouge_l"], result["format"] = {}, {}
    for name, items in answers.items():
        result["rouge_l"][name], result["format"][name] = score_answers(items, [ref for _, ref in prompts])
    rouge, adherence = result["rouge_l"], {k: 100 * v["adherence"] for k, v in result["format"].items()}
    log.info("ROUGE-L: base %.3f -> fine-tuned %.3f; format adherence: base %.0f%% -> fine-tuned %.0f%%",
             rouge["base"], rouge["fine_tuned"], adherence["base"], adherence["fine_tuned"])  # fmt: skip
    result["responses"] = [
        {**prompt_side(record), "prompt": prompt, "reference": reference, **{k: v[i] for k, v in answers.items()}}
        for i, (record, (prompt, reference)) in enumerate(zip(records, prompts, strict=True))
    ]
    capped = sum(a["token_limit"] < max_new_tokens for items in answers.values() for a in items)
    if capped:
        log.warning("%d answers had fewer than --max-length %d new tokens: their prompts left less room in the "
                    "model's context", capped, max_new_tokens)  # fmt: skip


def _warn_text_only(args, mode: str) -> None:
    """One warning naming the text-run options given (they do not apply to this run), if any."""
    defaults = type(args)()
    given = [f"--{name.replace('_', '-')}" for name in TEXT_ONLY_OPTIONS
             if getattr(args, name) != getattr(defaults, name)]  # fmt: skip
    if given:
        log.warning("ignored for %s runs: %s (style, copying and sampled generations measure text runs)", mode,
                    ", ".join(given))  # fmt: skip


def instruction_held_out(args, train_cfg: TrainConfig, template: Template, run: Path,
                         tokenizer) -> HeldOutRecords:  # fmt: skip
    """The records to evaluate on: every record of `--data`, or else the run's own validation split; records
    longer than the run's --max-input-length are left out and counted."""
    if args.data:
        data, source = held_out_data(train_cfg, args.data, tokenizer, template), args.data
    else:
        data, source = run_data(train_cfg, run, tokenizer, template), f"validation split of {train_cfg.data.data}"
        if data.template != template:
            raise UserError(f"the template {train_cfg.data.template!r} differs from the one {run} was trained "
                            "with (run_config.json): restore it to evaluate the run")  # fmt: skip
    held = data.validation
    n_dropped = len(data.split.val_idx) - len(held)
    return HeldOutRecords(data.read(held.record), held, source, n_dropped)


def score_answers(answers: list[dict[str, Any]], references: list[str]) -> tuple[float, dict[str, float]]:
    """(mean ROUGE-L F1 of the responses against `references`, the shares of answers that kept the format,
    ended with EOS, and wrote a template header). Each answer gets its own `rouge_l`."""
    scores = rouge_l([a["response"] for a in answers], references)
    for answer, score in zip(answers, scores, strict=True):
        answer["rouge_l"] = float(score)
    n = len(answers)
    shares = {"adherence": sum(a["format_ok"] for a in answers) / n,
              "ended_with_eos": sum(a["ended_with_eos"] for a in answers) / n,
              "repeated_header": sum(a["repeated_header"] for a in answers) / n}  # fmt: skip
    return sum(scores) / n, shares


# ----------------------------------------------------------------------------------------------------------
# compare


def training_line(s: dict[str, Any]) -> str:
    """compare.md's line on the training, from train_summary.json: the validation loss of the weights in the folder
    (--output-best: an earlier step's, named)."""
    shipped, steps = s.get("output_step"), s.get("steps")
    earlier = shipped not in (None, steps)
    before = s.get("initial_val_loss") or math.nan
    after = s.get("best_val_loss" if earlier else "final_val_loss") or math.nan
    line = (f"- training: {steps} steps, {s.get('train_tokens_total', 0):,} tokens, validation loss {before:.3f} "
            f"-> {after:.3f}")  # fmt: skip
    return line + (f"; the weights of step {shipped} of {steps} (--output-best)" if earlier else "")


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
        lines.append(training_line(s))
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
