"""Training data for every mode behind one call: `prepare_data(cfg, tokenizer) -> TrainData`.

    text         paragraphs -> split by paragraph -> windows of <= --max-input-length tokens (no masks:
                 every token after a window's first is a target)
    instruction  records -> split by record -> template -> (ids, loss mask) per record; records longer than
    chat         --max-input-length are dropped and counted, never cut

The split is seeded and by record (or paragraph), after exact duplicates are dropped, or taken from
`--validation-data`; `Split.fingerprint` over the records' keys lets a resumed run check it trains on the
same data. The loop then plans, packs and batches the sequences the same way in every mode; the mask
(`templates.collate_masked`) is all that differs.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from qlora_ft import sources
from qlora_ft.cache import CacheSplit, WindowIds, cut_windows, open_text_cache
from qlora_ft.config import TrainConfig
from qlora_ft.data import Corpus, Split, load_corpus, split_corpus, split_from_json, windows_for
from qlora_ft.errors import UserError
from qlora_ft.records import Record, detect_format, load_records, read_rows, record_key
from qlora_ft.templates import Template, encode_records, fit, generation_prompt, get_template

log = logging.getLogger(__name__)

Mode = Literal["text", "instruction", "chat"]
TEMPLATE_KEY = "template_used"  # run_config.json's data section: the template as data (`Template.to_dict`)


@dataclass
class Sequences:
    """Token sequences to train or validate on: `ids[i]`, and `masks[i]` (1 = a target token) where only some
    tokens are trained on; `masks` is None for plain text, whose every token after a sequence's first is."""

    ids: Sequence[Sequence[int]]  # lists, or windows read from a token cache's memory map (`cache.WindowIds`)
    masks: Sequence[Sequence[int]] | None = None

    @property
    def lengths(self) -> Sequence[int]:
        known = getattr(self.ids, "lengths", None)  # a token cache's windows know theirs without reading them
        return known if known is not None else [len(s) for s in self.ids]


@dataclass
class TrainData:
    """What a run trains and validates on.

    split: which paragraphs / records train and validate (saved as split.json, checked on resume).
    template: the template instruction/chat records were rendered with (None for text); saved with the run.
    train_records / val_records: the records behind `train` / `validation`, index for index (None for text).
    """

    mode: Mode
    train: Sequences
    validation: Sequences
    split: Split | CacheSplit  # CacheSplit: text read through the token cache
    template: Template | None = None
    train_records: list[Record] | None = None
    val_records: list[Record] | None = None

    def sample_prompts(self, tokenizer, n: int = 3) -> list[str]:
        """Prompts for in-training samples in instruction/chat mode: the `n` validation records with the
        shortest prompts, through the template (as the model is prompted at inference). [] for text."""
        if self.template is None or not self.val_records:
            return []
        prompts = [generation_prompt(r, self.template, tokenizer)[0] for r in self.val_records]
        return sorted(prompts, key=len)[:n]

    def run_config(self, cfg: TrainConfig) -> dict[str, Any]:
        """`cfg.to_dict()` plus, for instruction and chat runs, the template used (data section, `template_used`):
        what run_config.json holds, so generation and evaluation prompt the same way without being told."""
        config = cfg.to_dict()
        if self.template is not None:
            config["data"][TEMPLATE_KEY] = self.template.to_dict()
        return config


def stored_template(run_config: dict[str, Any], where: str = "the saved run configuration") -> Template | None:
    """The template a run saved in its run configuration (None for a text run)."""
    saved = run_config.get("data", {}).get(TEMPLATE_KEY) if isinstance(run_config, dict) else None
    return Template.from_dict(saved, where) if saved is not None else None


def data_mode(source: str, fmt: str, text_column: str | None) -> Mode:
    """The mode of `source`: `fmt` unless "auto", else read from its columns. Anything not clearly instruction
    or chat records is text, so paragraph data keeps the text loader's own checks and messages."""
    if fmt != "auto":
        return fmt  # type: ignore[return-value]
    if text_column is not None:
        return "text"
    try:
        columns = _columns(source)
        return "text" if columns is None else detect_format(columns, None, source)
    except _BadLine:
        raise  # a row that does not parse is named as such, not mistaken for text in the wrong columns
    except (UserError, ValueError, OSError):
        return "text"  # the text loader reports the problem as it always has


class _BadLine(UserError):
    """A line of a JSONL sample that is not JSON."""


def _jsonl_sample(path: Path, sample_rows: int) -> list[Any]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(itertools.islice(f, sample_rows), start=1):
            try:
                rows += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as e:
                raise _BadLine(f"{path}: line {number} is not valid JSON ({e.msg})") from None
    return rows


def _columns(source: str, sample_rows: int = 1000) -> list[str] | None:
    """The field names of `source`'s rows, None for plain text. Large formats are not read whole: a parquet
    file's schema, a saved dataset's column names, the first `sample_rows` lines of a JSONL file."""
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_file() and suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    if path.is_file() and suffix == ".jsonl":
        rows = _jsonl_sample(path, sample_rows)
    elif path.is_dir() and sources.resolve(source).kind == "hf_disk":
        from datasets import DatasetDict, load_from_disk

        saved = load_from_disk(str(path))  # memory-mapped: nothing is read but the metadata
        parts = saved.values() if isinstance(saved, DatasetDict) else [saved]
        return list(dict.fromkeys(c for part in parts for c in part.column_names))
    else:
        every = read_rows(source)
        if every is None:  # plain text (.txt, a folder of .txt)
            return None
        rows = every[0] + (every[1] or [])
    return list(dict.fromkeys(str(k) for row in rows if isinstance(row, dict) for k in row))


def prepare_data(cfg: TrainConfig, tokenizer, saved_split: dict[str, Any] | None = None) -> TrainData:
    """The run's train and validation sequences for `--data` (and `--validation-data`), in the mode
    `--format` names or the data's columns imply. `saved_split`: a checkpoint's split.json, to resume on
    exactly its split (UserError if the data changed). Raises UserError for bad data or records."""
    d = cfg.data
    mode = data_mode(d.data, d.format, d.text_column)
    if mode == "text":
        return _text_data(cfg, tokenizer, saved_split)
    return _record_data(cfg, tokenizer, mode, saved_split)


def _split(train: Sequence[str], validation: Sequence[str] | None, cfg: TrainConfig, saved_split) -> Split:
    """Seeded split of distinct strings (paragraphs or record keys), or the given validation; or the saved one."""
    split = split_corpus(Corpus(list(train), None if validation is None else list(validation)),
                         cfg.data.train_size, cfg.data.seed)  # fmt: skip
    return split_from_json(split, saved_split) if saved_split is not None else split


def _validation_source(cfg: TrainConfig, has_own: bool) -> str | None:
    if cfg.data.validation_data is not None and has_own:
        raise UserError(f"{cfg.data.data} already holds a validation split: drop --validation-data, or pass data "
                        "without one")  # fmt: skip
    return cfg.data.validation_data


def _text_data(cfg: TrainConfig, tokenizer, saved_split) -> TrainData:
    """Paragraphs -> split -> windows: through the token cache for local data (tokenized once, read from memory
    maps); in memory where --data or --validation-data names a hub dataset (no local files to fingerprint) and
    to resume a checkpoint whose split lists its paragraphs (made by earlier versions). Both give the same
    split and windows."""
    d = cfg.data
    local = Path(d.data).exists() and (d.validation_data is None or Path(d.validation_data).exists())
    if local and (saved_split is None or "cache_fingerprint" in saved_split):
        return _cached_text_data(cfg, tokenizer, saved_split)
    return _memory_text_data(cfg, tokenizer, saved_split)


def _memory_text_data(cfg: TrainConfig, tokenizer, saved_split) -> TrainData:
    """Paragraphs -> split -> windows as lists of ids (every paragraph tokenized at every start)."""
    d = cfg.data
    corpus = load_corpus(d.data, d.text_column, d.keep_headings)
    if (val_source := _validation_source(cfg, corpus.validation is not None)) is not None:
        val = load_corpus(val_source, d.text_column, d.keep_headings)
        corpus = Corpus(corpus.train, val.train + (val.validation or []))
    split = _split(corpus.train, corpus.validation, cfg, saved_split)
    train = Sequences(windows_for(tokenizer, split.train, d.max_input_length))
    validation = Sequences(windows_for(tokenizer, split.validation, d.max_input_length))
    log.info("data: %d train / %d validation paragraphs -> %d / %d windows of <= %d tokens",
             len(split.train_idx), len(split.val_idx), len(train.ids), len(validation.ids),
             d.max_input_length)  # fmt: skip
    return TrainData("text", train, validation, split)


def _cached_text_data(cfg: TrainConfig, tokenizer, saved_split) -> TrainData:
    """Paragraphs -> token cache -> split (a function of the cache's fingerprint, seed and share) -> windows,
    all as offsets into the cache's memory maps: memory does not grow with the corpus."""
    d = cfg.data
    val_source = _validation_source(cfg, sources.source_splits(d.data, d.text_column) is not None)
    cache = open_text_cache(d.data, tokenizer, cache_dir=d.cache_dir, keep_headings=d.keep_headings,
                            text_column=d.text_column, validation_source=val_source)  # fmt: skip
    split = CacheSplit.of(cache, d.seed, d.train_size)
    if saved_split is not None:
        split.check(saved_split)
    train = Sequences(WindowIds(cut_windows(cache, split.train_idx, d.max_input_length)))
    validation = Sequences(WindowIds(cut_windows(cache, split.val_idx, d.max_input_length)))
    log.info("data: %d train / %d validation paragraphs -> %d / %d windows of <= %d tokens (token cache %s)",
             len(split.train_idx), len(split.val_idx), len(train.ids), len(validation.ids), d.max_input_length,
             cache.path)  # fmt: skip
    return TrainData("text", train, validation, split)


def _record_data(cfg: TrainConfig, tokenizer, mode: Mode, saved_split) -> TrainData:
    """Records -> split by record -> template -> (ids, mask), over-long records dropped and counted."""
    d = cfg.data
    if d.keep_headings:  # (its default is False: it was given)
        log.warning("--keep-headings: no effect, %s holds %s records, not text paragraphs", d.data, mode)
    records = load_records(d.data, mode, d.text_column)
    if records.format != mode:  # --format text is handled by the caller; this is a mode the data cannot hold
        raise UserError(f"{d.data}: holds {records.format} data, not {mode} records")
    validation = records.validation
    if (val_source := _validation_source(cfg, validation is not None)) is not None:
        val = load_records(val_source, mode, d.text_column)
        validation = val.train + (val.validation or [])
    by_key = {record_key(r): r for r in [*records.train, *(validation or [])]}
    split = _split([record_key(r) for r in records.train],
                   None if validation is None else [record_key(r) for r in validation], cfg, saved_split)  # fmt: skip
    # the run saves the chat template it used for chat records, and none for instructions (`generate.respond`
    # prompts through the chat template exactly when the saved template has one)
    template = get_template(d.template)
    template = template.for_tokenizer(tokenizer) if mode == "chat" else replace(template, chat_template=None)
    train_records, val_records = [by_key[k] for k in split.train], [by_key[k] for k in split.validation]
    train, train_records, n_long = _encode(tokenizer, train_records, template, cfg)
    val, val_records, n_long_val = _encode(tokenizer, val_records, template, cfg)
    where = f"--max-input-length {d.max_input_length}"
    if not train.ids:
        raise UserError(f"every training record is longer than {where} tokens: raise it (up to the model's context)")
    if not val.ids:
        raise UserError(f"every validation record is longer than {where} tokens: raise it (up to the model's context)")
    log.info("data: %d train / %d validation %s records (template %s, loss on %s) -> %d / %d sequences of <= %d "
             "tokens; %d / %d longer ones dropped", len(split.train_idx), len(split.val_idx), mode, template.name,
             "every token" if d.train_on_prompt else "responses", len(train.ids), len(val.ids),
             d.max_input_length, n_long, n_long_val)  # fmt: skip
    return TrainData(mode, train, val, split, template, train_records, val_records)


def _encode(tokenizer, records: list[Record], template: Template, cfg: TrainConfig):
    """(Sequences of the records that fit --max-input-length, those records, how many were dropped)."""
    encoded = encode_records(tokenizer, records, template, cfg.data.train_on_prompt)
    max_len = cfg.data.max_input_length
    kept = [i for i, (ids, _) in enumerate(encoded) if len(ids) <= max_len]
    fitted, n_dropped = fit(encoded, max_len)  # logs the count of dropped records
    return Sequences([ids for ids, _ in fitted], [mask for _, mask in fitted]), [records[i] for i in kept], n_dropped


def read_template(model_path: str | Path) -> Template | None:
    """The template saved with a run: from the run configuration in `model_path` (an output dir, a checkpoint,
    or an exported model); None when there is none (a text run, or a plain model)."""
    from qlora_ft import checkpoint

    config = checkpoint.read_run_config(Path(model_path))
    return stored_template(config, f"{model_path}: the saved template") if config is not None else None
