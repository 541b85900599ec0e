"""`qlora-ft check`: what a run with these options will train on, read through train's own road (`load_data`:
the same readers, rules, template, token cache and split), before a step is taken; with `--plan`, what it will
cost (`training.plan.plan_report`). `check_report` is the report as data, `format_report` its text.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import numpy as np

from qlora_ft.config import CheckConfig
from qlora_ft.data.batches import Windows
from qlora_ft.data.prepare import TrainData
from qlora_ft.data.split import SPLIT_DROPPED
from qlora_ft.errors import UserError

log = logging.getLogger(__name__)

MIN_TRAINED_SHARE = 0.05  # below this share of tokens trained on, the check warns
EXAMPLE_CHARS = 100
BAR = 40  # histogram bar width in characters


def run_check(cfg: CheckConfig) -> dict[str, Any]:
    """Print the report of `cfg` (text, or JSON with --json) and return it."""
    from qlora_ft.training.probe import plan_report, process_seconds
    from qlora_ft.training.setup import load_data

    started = process_seconds()  # the imports: a training process spends them too
    if cfg.data.data is None:
        raise UserError("--data is required")
    tokenizer, data = load_data(cfg)  # train's road: refuses what train refuses, with its message
    report = check_report(cfg, tokenizer, data)
    if cfg.check.plan:
        report["plan"] = plan_report(cfg, cfg.check.probe_steps, started)
    for warning in report["warnings"]:
        log.warning(warning)
    colour = sys.stdout.isatty() and not cfg.check.json
    print(json.dumps(report, indent=1) if cfg.check.json else format_report(report, colour))
    return report


def check_report(cfg: CheckConfig, tokenizer, data: TrainData) -> dict[str, Any]:
    """The report as JSON-able data: source, what was read and dropped, lengths, loss mask, EOS, split, examples."""
    d, cache = cfg.data, data.cache
    src, val_src = data.sources
    kept = np.concatenate([data.split.train_idx, data.split.val_idx])
    report: dict[str, Any] = {
        "source": {
            "data": d.data,
            "kind": src.kind,
            "validation_data": d.validation_data,
            "format": data.mode,
            "format_option": d.format,
            "template": data.template.name if data.template else None,
            "token_cache": str(cache.path),
            "cache_built_now": cache.built,
        },  # fmt: skip
        "read": read_section(cfg, tokenizer, data),
        "lengths": length_section(cache.lengths[kept] + (0 if cache.whole_records else 2), d.max_input_length),
        "loss_mask": mask_section(data.train),
        "eos": eos_section(tokenizer, data, kept),
        "split": {
            "train_records": len(data.split.train_idx),
            "validation_records": len(data.split.val_idx),
            "train_sequences": len(data.train),
            "validation_sequences": len(data.validation),
        },  # fmt: skip
        "examples": [rendered(tokenizer, data.train, k) for k in range(min(cfg.check.show, len(data.train)))],
    }
    report["warnings"] = warnings_of(report)
    return report


def read_section(cfg: CheckConfig, tokenizer, data: TrainData) -> dict[str, Any]:
    """What was read and what became of it: the counts training logs, with an example of each."""
    cache, max_len = data.cache, cfg.data.max_input_length
    assignment = split_assignment(data)
    dropped = np.flatnonzero(assignment == SPLIT_DROPPED)
    section: dict[str, Any] = {"records_read": int(cache.n_records), "tokens": int(cache.n_tokens),
                               "duplicates": len(dropped),
                               "duplicate_example": example(tokenizer, cache, dropped)}  # fmt: skip
    if cache.whole_records:
        out = {}
        for side, idx in (("train", data.split.train_idx), ("validation", data.split.val_idx)):
            out[side] = int((cache.lengths[idx] > max_len).sum())
        longer = np.flatnonzero(assignment.astype(bool) & (np.asarray(cache.lengths) > max_len))
        return {**section, "over_length": out, "over_length_example": example(tokenizer, cache, longer)}
    read = cache.meta.get("read")  # None: a cache built before the counts were kept
    headings = sum(c["headings"] for c in read.values()) if read is not None else None
    missing = sum(c["missing"] for c in read.values()) if read is not None else None
    heading_example = next((c["heading_example"] for c in (read or {}).values() if c["heading_example"]), None)
    seq = np.asarray(cache.lengths, dtype=np.int64)[np.flatnonzero(assignment)] + 2
    cut = seq > max_len
    windows = len(data.train) + len(data.validation)
    long_idx = np.flatnonzero(assignment.astype(bool) & (np.asarray(cache.lengths) + 2 > max_len))
    return {**section, "headings": headings, "missing": missing, "heading_example": heading_example,
            "cut": int(cut.sum()), "windows": windows, "windows_from_cut": windows - int((~cut).sum()),
            "cut_example": example(tokenizer, cache, long_idx, max_len)}  # fmt: skip


def split_assignment(data: TrainData) -> np.ndarray:
    """Per cached record: 1 train, 2 validation, 0 left out as a duplicate (the split training made)."""
    assignment = np.zeros(data.cache.n_records, dtype=np.int8)
    assignment[data.split.train_idx], assignment[data.split.val_idx] = 1, 2
    return assignment


def example(tokenizer, cache, indices: np.ndarray, max_len: int | None = None) -> dict[str, Any] | None:
    """The first of `indices` as text (cut to `EXAMPLE_CHARS`), with its record index and length in tokens."""
    if not len(indices):
        return None
    i = int(indices[0])
    text = tokenizer.decode(cache.tokens(i)[:64].tolist())
    out = {"record": i, "tokens": int(cache.lengths[i]), "text": shorten(text)}
    if max_len is not None:  # a paragraph cut into windows: how many (wrapped in <eos>, overlapping by one)
        out["windows"] = -(-(int(cache.lengths[i]) + 1) // (max_len - 1))
    return out


def shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= EXAMPLE_CHARS else text[: EXAMPLE_CHARS - 3] + "..."


def length_section(lengths: np.ndarray, max_len: int) -> dict[str, Any]:
    """Token lengths of the records kept (a paragraph with its two <eos>) against --max-input-length: percentiles
    and a histogram of 8 equal bins up to the limit, plus one of the records longer than it."""
    lengths = np.asarray(lengths, dtype=np.int64)
    edges = np.linspace(0, max_len, 9).round().astype(np.int64).tolist()
    edges += [int(lengths.max())] if lengths.max() > max_len else []
    counts, _ = np.histogram(lengths, bins=edges)
    percentiles = {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)}
    return {"max_input_length": max_len, **percentiles, "max": int(lengths.max()),
            "over_max_input_length": int((lengths > max_len).sum()), "count": len(lengths),
            "histogram": [{"from": int(edges[i]), "to": int(edges[i + 1]), "count": int(c)}
                          for i, c in enumerate(counts)]}  # fmt: skip


def trained(windows: Windows, k: int) -> np.ndarray:
    """Which tokens of window k are targets, as `batches.collate` labels them: never the first, and where the
    cache's loss mask says (unless --train-on-prompt)."""
    n = int(windows.lengths[k])
    out = np.ones(n, dtype=bool)
    if windows.masked:
        out = windows.mask(k).astype(bool)
    out[0] = False
    return out


def mask_section(windows: Windows) -> dict[str, Any]:
    """The share of the training tokens that are targets, overall and its spread over the training sequences."""
    lengths = np.asarray(windows.lengths, dtype=np.int64)
    if windows.masked:
        targets = np.array([int(trained(windows, k).sum()) for k in range(len(windows))], dtype=np.int64)
    else:
        targets = lengths - 1
    share = targets / np.maximum(lengths, 1)
    spread = {f"p{q}": round(float(np.percentile(share, q)), 4) for q in (10, 50, 90)}
    return {"tokens": int(lengths.sum()), "trained_tokens": int(targets.sum()),
            "trained_share": round(float(targets.sum() / max(1, lengths.sum())), 4),
            "per_sequence": {"min": round(float(share.min()), 4), **spread, "max": round(float(share.max()), 4)},
            "train_on_prompt": windows.every_token}  # fmt: skip


def eos_section(tokenizer, data: TrainData, kept: np.ndarray) -> dict[str, Any]:
    """Whether each response (each trained run of tokens) ends with the EOS generation stops on, allowing only
    whitespace after it; paragraphs are closed by the <eos> windowing adds."""
    cache, eos = data.cache, tokenizer.eos_token_id
    out: dict[str, Any] = {"eos_token": tokenizer.eos_token, "eos_id": eos}
    if not cache.whole_records:
        return {**out, "responses": len(kept), "ending_with_eos": len(kept), "example_without": None}
    blank: dict[int, bool] = {}
    responses = ending = 0
    missing = None
    for i in kept.tolist():
        ids, mask = cache.tokens(i), np.asarray(cache.mask(i), dtype=np.int8)
        ends = np.flatnonzero(np.diff(np.append(mask, 0)) == -1)  # the last token of each trained run
        for end in ends.tolist():
            responses += 1
            last = int(ids[end])
            if last != eos and end > 0 and int(ids[end - 1]) == eos:
                if last not in blank:
                    blank[last] = not tokenizer.decode([last]).strip()
                last = eos if blank[last] else last
            if last == eos:
                ending += 1
            elif missing is None:
                tail = tokenizer.decode(ids[max(0, end - 15) : end + 1].tolist())
                missing = {"record": i, "ends_with": shorten(tail)}
    return {**out, "responses": responses, "ending_with_eos": ending, "example_without": missing}


def rendered(tokenizer, windows: Windows, k: int) -> list[tuple[str, bool]]:
    """Training sequence k as the model sees it: (text, trained) runs of its tokens."""
    ids, target = windows.ids(k).tolist(), trained(windows, k)
    runs: list[tuple[str, bool]] = []
    start = 0
    for j in range(1, len(ids) + 1):
        if j == len(ids) or target[j] != target[start]:
            runs.append((tokenizer.decode(ids[start:j]), bool(target[start])))
            start = j
    return runs


def warnings_of(report: dict[str, Any]) -> list[str]:
    notes = []
    share = report["loss_mask"]["trained_share"]
    if share < MIN_TRAINED_SHARE:
        notes.append(f"only {100 * share:.1f}% of the training tokens are trained on (the loss mask): the prompts "
                     "dominate; check the template, or shorten the prompts")  # fmt: skip
    eos = report["eos"]
    if eos["ending_with_eos"] < eos["responses"]:
        notes.append(f"{eos['responses'] - eos['ending_with_eos']} of {eos['responses']} responses do not end with "
                     f"{eos['eos_token']}: a model trained on them may not stop there")  # fmt: skip
    return notes


# ----------------------------------------------------------------------------------------------------------
# Text


def format_report(report: dict[str, Any], colour: bool = False) -> str:
    """The report as lines of text; trained tokens in colour on a terminal, else between [[ and ]]."""
    s, r, n, m, e = report["source"], report["read"], report["lengths"], report["loss_mask"], report["eos"]
    lines = [f"source: {s['data']} ({s['kind']}), format {s['format']}"
             + (f" (--format {s['format_option']})" if s["format_option"] != "auto" else " (detected)")
             + (f", template {s['template']}" if s["template"] else "")
             + (f"; validation data {s['validation_data']}" if s["validation_data"] else ""),
             f"token cache: {s['token_cache']} ({'built now' if s['cache_built_now'] else 'reused'})"]  # fmt: skip
    lines += read_lines(r)
    lines += [
        f"lengths (tokens): median {n['p50']}, p90 {n['p90']}, p99 {n['p99']}, max {n['max']}; "
        f"{n['over_max_input_length']} of {n['count']} over --max-input-length {n['max_input_length']}"
    ]
    top = max(b["count"] for b in n["histogram"]) or 1
    for b in n["histogram"]:
        over = " >" if b["from"] >= n["max_input_length"] else ""
        lines.append(f"  {b['from']:>6}-{b['to']:<6} {'#' * round(BAR * b['count'] / top):<{BAR}} {b['count']}{over}")
    ps = m["per_sequence"]
    lines.append(f"trained on (loss mask): {100 * m['trained_share']:.1f}% of {m['tokens']:,} training tokens; "
                 f"per sequence min {100 * ps['min']:.0f}%, p10 {100 * ps['p10']:.0f}%, median {100 * ps['p50']:.0f}%, "
                 f"p90 {100 * ps['p90']:.0f}%, max {100 * ps['max']:.0f}%")  # fmt: skip
    what = "responses" if report["source"]["format"] != "text" else "paragraphs (windowing adds it)"
    lines.append(
        f"EOS: {e['ending_with_eos']} of {e['responses']} {what} end with {e['eos_token']} "
        f"(id {e['eos_id']}), the token generation stops on"
    )
    if e["example_without"]:
        lines.append(f"  e.g. record {e['example_without']['record']} ends: {e['example_without']['ends_with']!r}")
    sp = report["split"]
    lines.append(
        f"split: {sp['train_records']} train / {sp['validation_records']} validation records -> "
        f"{sp['train_sequences']} / {sp['validation_sequences']} sequences"
    )
    if "plan" in report:
        from qlora_ft.training.probe import plan_lines

        lines += plan_lines(report["plan"])
    for number, runs in enumerate(report["examples"], 1):
        lines.append(f"--- training sequence {number} (trained tokens {'in green' if colour else 'in [[ ]]'}) ---")
        lines.append("".join(mark(text, on, colour) for text, on in runs))
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)


def read_lines(r: dict[str, Any]) -> list[str]:
    lines = [f"read: {r['records_read']:,} records, {r['tokens']:,} tokens"]
    if "headings" in r:
        known = r["headings"] is not None
        lines.append(f"  heading-only paragraphs dropped: {r['headings'] if known else 'not recorded'}"
                     + (f" (e.g. {r['heading_example']!r})" if r["heading_example"] else ""))  # fmt: skip
        lines.append(f"  missing values skipped: {r['missing'] if known else 'not recorded'}")
    lines.append(f"  duplicates left out: {r['duplicates']}" + with_example(r["duplicate_example"]))
    if "cut" in r:
        lines.append(
            f"  paragraphs longer than --max-input-length, cut into windows: {r['cut']} "
            f"({r['windows_from_cut']} windows of {r['windows']})" + with_example(r["cut_example"])
        )
    else:
        o = r["over_length"]
        lines.append(
            f"  records longer than --max-input-length left out: {o['train'] + o['validation']} ("
            f"{o['train']} train, {o['validation']} validation)" + with_example(r["over_length_example"])
        )
    return lines


def with_example(found: dict[str, Any] | None) -> str:
    if not found:
        return ""
    windows = f", {found['windows']} windows" if "windows" in found else ""
    return f"\n    e.g. record {found['record']} ({found['tokens']} tokens{windows}): {found['text']!r}"


def mark(text: str, trained: bool, colour: bool) -> str:
    if not trained:
        return text
    return f"\x1b[1;32m{text}\x1b[0m" if colour else f"[[{text}]]"
