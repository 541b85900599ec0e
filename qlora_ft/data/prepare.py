"""The road end to end: `prepare_data(cfg, tokenizer) -> TrainData`, the same for every mode and source.

    --data (+ --validation-data) -> records -> token cache -> split -> training / validation windows

eval asks the same function for a run's held-out set (the run's configuration and saved split), or
`held_out_data` for every record of another source, read by the run's own rules.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from qlora_ft import checkpoint
from qlora_ft.checkpoint import is_adapter_folder
from qlora_ft.config import TrainConfig, train_config_from_dict
from qlora_ft.data import records as rec
from qlora_ft.data.batches import Windows, cut_windows
from qlora_ft.data.cache import (
    Record,
    TokenCache,
    earlier_tokenizer_digest,
    file_digests,
    fingerprint,
    open_or_build,
    read_note,
    tokenizer_digest,
    write_note,
)
from qlora_ft.data.encode import Parallel, leading_token_id, segments_of
from qlora_ft.data.sources import DEMO_PREFIX, Layout, Shape, Source, input_bytes, is_csv, resolve, table_shape
from qlora_ft.data.split import Split
from qlora_ft.errors import UserError, first_line
from qlora_ft.templates import TEMPLATES, Template, get_template

log = logging.getLogger(__name__)

# How chat records become ids (`encode.encode`): 2 = history and prompts tokenized whole as a rendered template is,
# nothing after a response's EOS trained (1: every segment tokenized apart). Instruction ids did not change.
CHAT_ENCODING = 2
TEMPLATE_KEY = "template_used"  # run_config.json's data section: the template as data (`Template.to_dict`)


@dataclass(frozen=True)
class Recipe:
    """How a source's records become ids: everything besides the source and the tokenizer that changes them."""

    mode: rec.Mode = "text"
    template: Template | None = None  # instruction and chat: the template, its chat template resolved
    text_column: str | None = None
    keep_headings: bool = False
    layout: Layout = "auto"

    def covers(self) -> dict[str, Any]:
        # a plain-text cache covers what it did before the rules version, which `split.Split.check` relies on
        if self.mode == "text":
            return {"format": "text", "keep_headings": self.keep_headings, "layout": self.layout,
                    "text_column": self.text_column, "template": None, "rules": rec.RULES_VERSION}  # fmt: skip
        assert self.template is not None
        chat = {"chat_encoding": CHAT_ENCODING} if self.mode == "chat" else {}
        return {"format": self.mode, "template": self.template.to_dict(), **chat}

    def items(self, src: Source, part: str | None, tally: dict | None = None) -> Iterator[str | rec.Record]:
        """The paragraphs or records of `src` (or of its `part`), in order (`tally`: see `rec.iter_paragraphs`)."""
        if self.mode == "text":
            yield from rec.iter_paragraphs(src, text_column=self.text_column, keep_headings=self.keep_headings,
                                           layout=self.layout, part=part, tally=tally)  # fmt: skip
        else:
            yield from rec.iter_records(src, self.mode, part)

    def segments(self, src: Source, part: str | None, tokenizer, tally: dict | None = None) -> Iterator[Record]:
        """The (text, trained) segments of each record; a template that fails on a record is named with it."""
        for i, item in enumerate(self.items(src, part, tally)):
            try:
                yield segments_of(item, self.template, tokenizer)
            except UserError as e:
                raise UserError(f"{rec.record_prefix(src, part)} {i}: {e}") from None


def parts(sources: tuple[Source, Source | None]) -> list[tuple[Source, str | None]]:
    """What the cache holds, in order, as (source, part): --data whole (or its train part), then the validation
    side: --validation-data, or the validation part of a source already split."""
    src, val_src = sources
    split = src.parts() if val_src is None else None
    first = [(src, split[0] if split else None)]
    return first + ([(val_src, None)] if val_src is not None else [(src, split[1])] if split else [])


def data_digest(src: Source) -> dict[str, Any]:
    """What identifies the content of `src`: its files' names, sizes and hashes (a hub dataset's data files')."""
    if src.kind == "hub":
        return {"data": {"hub": src.name, "parts": src.digest_key()}, "kind": src.kind}
    digest = src.digest if src.digest is not None else file_digests(src.files, src.path if src.path.is_dir() else None)
    return {"data": digest, "kind": src.kind}


def resolve_known(source: str, cache_dir: str | Path | None) -> Source:
    """`source` resolved with its files hashed (once: `data_digest` takes the digest from it), and a .json or
    pickle table's shape (columns, parts) from the note the token cache folder keeps of each such file it met,
    by the SHA-256 of its bytes: a warm start reads the file only to hash it. Met first, it is read and noted."""
    src = resolve(source)
    if src.kind == "hub":
        return src
    src = replace(src, digest=file_digests(src.files, src.path if src.path.is_dir() else None))
    if src.kind != "table" or is_csv(src.files[0]):
        return src
    sha256 = src.digest[0]["sha256"]
    note = read_note(cache_dir, sha256)
    if note is not None:
        return replace(src, shape=Shape(tuple(note["columns"]), bool(note["split"])))
    shape = table_shape(src)
    write_note(cache_dir, sha256, {"columns": list(shape.columns), "split": shape.split})
    return replace(src, shape=shape)


def open_cache(source: str | Source, tokenizer: Any, recipe: Recipe, *,
               validation_source: str | Source | None = None, cache_dir: str | Path | None = None,
               workers: int | None = None, parallel: Parallel = "threads") -> TokenCache:  # fmt: skip
    """The token cache of `source` read by `recipe` (tokenized only when the data, the tokenizer or the recipe
    changed). `validation_source` (--validation-data): a second source whose records the split keeps on the
    validation side, as it keeps a pre-split source's own validation part. Sources given by name are resolved
    here (`resolve_known`)."""
    src, val_src = (s if isinstance(s, Source) or s is None else resolve_known(s, cache_dir)
                    for s in (source, validation_source))  # fmt: skip
    covers = {**data_digest(src), "tokenizer": tokenizer_digest(tokenizer), **recipe.covers()}
    if val_src is not None:
        covers["validation_data"] = data_digest(val_src)
    dropped: dict = {}  # what the paragraph reader drops, kept in the cache's meta.json ("read")
    train, *validation = [partial(recipe.segments, s, part, tokenizer, dropped) for s, part in parts((src, val_src))]
    size = input_bytes(src) + (input_bytes(val_src) if val_src else 0)
    return open_or_build(covers, tokenizer, train, cache_dir=cache_dir, validation=validation[0] if validation
                         else None, input_bytes=size, workers=workers, parallel=parallel,
                         lead=recipe.mode != "text", read=dropped,
                         earlier=partial(earlier_fingerprints, covers, tokenizer, (src, val_src)))  # fmt: skip


def earlier_fingerprints(covers: dict[str, Any], tokenizer: Any, sources: tuple[Source, Source | None],
                         ) -> dict[str, int | None]:  # fmt: skip
    """The cache fingerprints earlier versions gave these covers (a tokenizer digest of its whole serialized
    pipeline, a hub dataset's `datasets` fingerprint; text read by the paragraph rules of version 2, unnamed in
    the cache's first version), each with the rules version of its text (None for records): their checkpoints
    resume where the records are the same (`Split.check`)."""
    if leading_token_id(tokenizer) != tokenizer.eos_token_id:
        return {}  # earlier versions put the EOS before every paragraph and record: their ids differ
    then = {**covers, "tokenizer": earlier_tokenizer_digest(tokenizer)}
    for key, src in zip(("data", "validation_data"), sources, strict=True):
        if src is not None and src.kind == "hub":
            earlier = {"data": {"hub": src.name, "parts": src.earlier_digest_key()}, "kind": "hub"}
            then.update(earlier if key == "data" else {key: earlier})
    if covers["format"] != "text":
        return {fingerprint(then): None}
    first = {k: v for k, v in then.items() if k != "rules"}
    return {fingerprint({**then, "rules": 2}): 2, fingerprint(first): 2}


@dataclass
class TrainData:
    """What a run trains and validates on: windows into the token cache, the split they come from, and the
    template instruction and chat records were rendered with (None for text; saved with the run)."""

    mode: rec.Mode
    cache: TokenCache
    split: Split
    train: Windows
    validation: Windows
    template: Template | None
    sources: tuple[Source, Source | None]  # --data and --validation-data, as read
    recipe: Recipe

    def sample_prompts(self, n: int = 3) -> list[list[int]]:
        """Prompts for in-training samples of instruction and chat runs: the `n` validation records with the
        shortest prompts, as the token ids training saw before each record's last response (`prompt_ids`:
        through its assistant header, for a chat that goes on after it too). [] for text."""
        if self.template is None or not len(self.validation):
            return []
        lengths = np.asarray(self.cache.prompts)[self.validation.record]
        shortest = np.argsort(lengths, kind="stable")[:n].tolist()
        return [self.validation.prompt(k) for k in shortest]

    def read(self, indices: np.ndarray) -> list[Any]:
        """The paragraphs or records at these cache indices, read again from the sources (for eval's texts and
        references; training needs only the ids)."""
        wanted = {int(i): n for n, i in enumerate(indices)}
        out: list[Any] = [None] * len(wanted)
        for i, item in enumerate(self._items()):
            if i in wanted:
                out[wanted[i]] = item
        return out

    def _items(self) -> Iterator[Any]:
        for src, part in parts(self.sources):
            yield from self.recipe.items(src, part)

    def check_split(self, saved: dict[str, Any]) -> None:
        """UserError in one line unless a checkpoint's split.json is this data's split (see `Split.check`)."""
        self.split.check(saved, self.cache, lambda: map(rec.record_key, self._items()))

    def run_config(self, cfg: TrainConfig) -> dict[str, Any]:
        """`cfg.to_dict()` plus, for instruction and chat runs, the template used (data section, `template_used`):
        what run_config.json holds, so generation and evaluation prompt the same way without being told."""
        config = cfg.to_dict()
        if self.template is not None:
            config["data"][TEMPLATE_KEY] = self.template.to_dict()
        return config


def recipe_for(cfg: TrainConfig, mode: rec.Mode, tokenizer, template: Template | None = None) -> Recipe:
    """How `cfg` reads records in `mode`: for instruction and chat records the template (`template`, else
    --template), with the chat template resolved for chat and none for instructions (`generate.respond` prompts
    through the chat template exactly when the saved template has one)."""
    d = cfg.data
    if mode == "text":
        return Recipe("text", text_column=d.text_column, keep_headings=d.keep_headings)
    chosen = template or get_template(d.template)
    chosen = chosen.for_tokenizer(tokenizer) if mode == "chat" else replace(chosen, chat_template=None)
    return Recipe(mode, chosen)


def prepare_data(cfg: TrainConfig, tokenizer, saved_split: dict[str, Any] | None = None,
                 template: Template | None = None) -> TrainData:  # fmt: skip
    """The run's training and validation windows for --data (and --validation-data), in the mode --format names
    or the data's columns imply. `saved_split`: a checkpoint's split.json, to resume on exactly its split
    (UserError if the data or its rules changed). `template`: a run's saved template (else --template)."""
    d = cfg.data
    src = resolve_known(d.data, d.cache_dir)
    val_src = resolve_known(d.validation_data, d.cache_dir) if d.validation_data is not None else None
    if val_src is not None and src.parts():
        raise UserError(f"{d.data} already holds a validation split: drop --validation-data, or pass data "
                        "without one")  # fmt: skip
    mode = rec.data_mode(src, d.format, d.text_column)
    if mode != "text" and d.keep_headings:  # (its default is False: it was given)
        log.warning("--keep-headings: no effect, %s holds %s records, not text paragraphs", d.data, mode)
    recipe = recipe_for(cfg, mode, tokenizer, template)
    cache = open_cache(src, tokenizer, recipe, validation_source=val_src, cache_dir=d.cache_dir)
    split = Split.of(cache, d.seed, d.train_size)
    rec.log_dropped(cache.meta.get("read", {}))  # on every start: a warm one reads the counts from the cache
    windows = _windows(cache, split, d.max_input_length, d.train_on_prompt)
    data = TrainData(mode, cache, split, *windows, recipe.template, (src, val_src), recipe)
    if saved_split is not None:
        data.check_split(saved_split)
    unit = "paragraphs" if mode == "text" else f"{mode} records"
    log.info("data: %d train / %d validation %s -> %d / %d windows of <= %d tokens (token cache %s)",
             len(data.split.train_idx), len(data.split.val_idx), unit, len(data.train), len(data.validation),
             d.max_input_length, cache.path)  # fmt: skip
    return data


def _windows(cache: TokenCache, split: Split, max_len: int, every_token: bool) -> tuple[Windows, Windows]:
    train, validation = cut_windows(cache, split.train_idx, max_len), cut_windows(cache, split.val_idx, max_len)
    train.every_token = validation.every_token = every_token
    for side, windows in (("training", train), ("validation", validation)):
        if not len(windows):
            raise UserError(f"every {side} record is longer than --max-input-length {max_len} tokens: raise it "
                            "(up to the model's context)")  # fmt: skip
    return train, validation


def held_out_data(cfg: TrainConfig, source: str, tokenizer, template: Template | None) -> TrainData:
    """Every distinct record of `source` held out, read as the run `cfg` read its data (its mode, template and
    options; responses only): for `qlora-ft eval --data`."""
    src = resolve_known(source, cfg.data.cache_dir)
    mode = "text" if template is None else "chat" if template.chat_template is not None else "instruction"
    found = rec.data_mode(src, "auto", None)
    if mode != "text" and found == "text":
        raise UserError(f"{source}: holds plain text, not {mode} records: this run is evaluated on records like "
                        "those it trained on (or leave out --data for its validation split)")  # fmt: skip
    if mode == "instruction" and found == "chat":
        raise UserError(f"{source}: holds chat records, but this run was trained on instruction records (its "
                        "template has no turns)")  # fmt: skip
    cfg = replace(cfg, data=replace(cfg.data, train_on_prompt=False))
    recipe = recipe_for(cfg, mode, tokenizer, template)
    cache = open_cache(src, tokenizer, recipe, cache_dir=cfg.data.cache_dir)
    rec.log_dropped(cache.meta.get("read", {}))
    _, first = np.unique(np.asarray(cache.hashes), return_index=True)
    every = np.sort(first)
    split = Split(cache.fingerprint, cfg.data.seed, 0.0, every[:0], every)
    validation = cut_windows(cache, every, cfg.data.max_input_length)
    if not len(validation):
        raise UserError(f"{source}: every record is longer than the run's --max-input-length "
                        f"{cfg.data.max_input_length} tokens")  # fmt: skip
    return TrainData(mode, cache, split, validation, validation, recipe.template, (src, None), recipe)


# ----------------------------------------------------------------------------------------------------------
# A trained run's data, as eval asks for it


def read_run(path: Path) -> TrainConfig:
    """The configuration a run's output folder (an adapter, or a fully fine-tuned model) was trained with."""
    if not path.is_dir():
        raise UserError(f"run directory not found: {path}")
    has_weights = is_adapter_folder(path) or (path / "config.json").is_file()
    saved = checkpoint.read_run_config(path) if has_weights else None
    if saved is None:
        raise UserError(f"{path} is not a qlora-ft run's output dir (needs {checkpoint.ADAPTER_CONFIG} or a "
                        f"model's config.json, and {checkpoint.CONFIG_JSON})")  # fmt: skip
    return train_config_from_dict(saved)


def _locate(recorded: str, run: Path) -> str | None:
    """A path the run recorded, found from here (as given, or relative to the run dir's parent); None if not.
    A packaged demo source (`demo:austen`) is found anywhere."""
    if recorded.startswith(DEMO_PREFIX):
        return recorded
    for candidate in (Path(recorded), run.parent / recorded, run.resolve().parent / recorded):
        if candidate.exists():
            return str(candidate)
    return None


def _find_data(cfg: TrainConfig, run: Path) -> str:
    """The run's --data, as recorded (relative to where training ran, or to the run dir's parent)."""
    if cfg.data.data and (found := _locate(cfg.data.data, run)) is not None:
        return found
    raise UserError(
        f"the run's training data {cfg.data.data!r} (run_config.json) is not found from here; "
        "run eval from the directory training ran in"
    )


def run_data(train_cfg: TrainConfig, run: Path, tokenizer, template: Template | None) -> TrainData:
    """The run's own data through the road, from its saved configuration: its training and validation sides
    are training's, checked against the split a checkpoint of the run saved, when one is found. Responses only."""
    cfg = copy.deepcopy(train_cfg)
    cfg.data.data = _find_data(train_cfg, run)
    if cfg.data.validation_data:
        cfg.data.validation_data = _locate(cfg.data.validation_data, run) or cfg.data.validation_data
    if cfg.data.template not in TEMPLATES:  # a template file, recorded relative to where training ran
        cfg.data.template = _locate(cfg.data.template, run) or cfg.data.template
    cfg.data.train_on_prompt = False  # responses only, even for a run that also trained on its prompts
    saved, where = _saved_split(run, train_cfg)
    try:
        return prepare_data(cfg, tokenizer, saved, template)
    except UserError as e:
        if saved is None:
            raise
        raise UserError(f"{cfg.data.data} no longer matches {where}: {e} (or pass a file as --data to hold out "
                        "every record of it)") from None  # fmt: skip


def _saved_split(run: Path, train_cfg: TrainConfig) -> tuple[dict[str, Any] | None, Path | None]:
    """(split.json, its path) of the run: beside its weights (a checkpoint given as --model_path), else in the
    newest checkpoint of its --check-dir that trained on the same data settings; (None, None) when none is."""
    folders = [run]
    check_dir = _locate(train_cfg.ckpt.check_dir, run) if train_cfg.ckpt.check_dir else None
    if check_dir is not None:
        try:
            latest = checkpoint.resolve_checkpoint(Path(check_dir), checkpoint.LATEST)
        except UserError:  # no complete checkpoint there
            latest = None
        same_data = latest is not None and (checkpoint.read_run_config(latest) or {}).get("data") == (
            checkpoint.read_run_config(run) or {}).get("data")  # fmt: skip
        folders += [latest] if same_data else []
    for folder in folders:
        path = folder / checkpoint.SPLIT_JSON
        if not path.is_file():
            continue
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is unreadable ({first_line(e)})") from None
        if not isinstance(saved, dict):
            raise UserError(f"{path} does not hold a split (a mapping with train and validation indices)")
        return saved, path
    log.info("no split.json of the run found: its validation split is recomputed from the data, seed and share")
    return None, None


def stored_template(run_config: dict[str, Any], where: str = "the saved run configuration") -> Template | None:
    """The template a run saved in its run configuration (None for a text run)."""
    saved = run_config.get("data", {}).get(TEMPLATE_KEY) if isinstance(run_config, dict) else None
    return Template.from_dict(saved, where) if saved is not None else None


def read_template(model_path: str | Path) -> Template | None:
    """The template saved with a run: from the run configuration in `model_path` (an output dir, a checkpoint,
    or an exported model); None when there is none (a text run, or a plain model)."""
    config = checkpoint.read_run_config(Path(model_path))
    return stored_template(config, f"{model_path}: the saved template") if config is not None else None
