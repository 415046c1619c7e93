"""From JSONL files to a tokenized, filtered dataset, cached on disk.

records -> content filters -> ChatML rendering with loss masks -> over-long policy -> token filters ->
category mixture -> TokenizedDataset. The result is cached under a key made of the data files' contents,
the tokenizer, the Hermes tag ids and every option that changes the result, so a large mixture is
tokenized once and later runs (and every rank) memory-map it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from importlib import resources
from pathlib import Path

from hermes.config import DataConfig
from hermes.data.chat import ChatFormat
from hermes.data.dataset import TokenizedDataset
from hermes.data.filters import ContentFilters, FilterSummary, filter_conversations, filter_samples, mix
from hermes.data.records import read_conversations
from hermes.data.sample import Sample

CACHE_FORMAT = 1
"""Bump when the cached layout or the rendering changes, so old caches are not reused."""


def bundled_example(name: str) -> Path:
    """Path of a bundled example file: "sft.jsonl" or "preference.jsonl"."""
    return Path(str(resources.files("hermes.data.examples") / name))


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(paths: list[Path], chat: ChatFormat, options: DataConfig) -> str:
    """Digest of everything the tokenized result depends on."""
    tokenizer = chat.tokenizer
    key = {
        "format": CACHE_FORMAT,
        "files": [_file_digest(p) for p in paths],
        "tokenizer": [
            type(tokenizer).__name__,
            tokenizer.vocab_size,
            sorted(tokenizer.special_tokens.items()),
        ],
        "tokenizer_file": _file_digest(Path(tokenizer.source))
        if Path(tokenizer.source).is_file()
        else tokenizer.source,
        "chat": [sorted(chat.special_tokens.items()), chat.tool_prompt],
        "options": {k: v for k, v in dataclasses.asdict(options).items() if k not in ("train", "cache_dir")},
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _fit(sample: Sample, seq_len: int, overlong: str) -> tuple[Sample | None, str | None]:
    if len(sample) <= seq_len:
        return sample, None
    if overlong == "drop":
        return None, "longer_than_seq_len"
    return dataclasses.replace(
        sample, tokens=sample.tokens[:seq_len], labels=sample.labels[:seq_len]
    ), "truncated"


def build_sft_samples(
    paths: list[Path], chat: ChatFormat, options: DataConfig, seed: int, summary: FilterSummary
) -> list[Sample]:
    """Read, filter, render, fit to seq_len and mix; every drop and truncation is counted in `summary`."""
    filters = ContentFilters() if options.drop_refusals else ContentFilters(refusal_phrases=())
    rendered = []
    for conversation in filter_conversations(read_conversations(paths), summary, filters):
        sample, note = _fit(chat.render(conversation), options.seq_len, options.overlong)
        summary.add("seq_len", conversation.source, "longer_than_seq_len" if sample is None else None)
        if note == "truncated":
            summary.add("truncated", conversation.source, "truncated_to_seq_len")
        if sample is not None:
            rendered.append((conversation.source, sample))
    kept = [s for _, s in filter_samples(rendered, summary, options.min_tokens, options.max_tokens)]
    if options.mixture:
        mixture = mix([s.category for s in kept], [len(s) for s in kept], options.mixture, seed)
        kept = [kept[i] for i in mixture.indices]
    return kept


def prepare_sft_dataset(
    chat: ChatFormat, options: DataConfig, seed: int, cache_root: Path, report_dir: Path | None = None
) -> Path:
    """Build (or find) the cached dataset and return its directory. Prints and writes the filter summary
    (filter_summary.json, also kept beside the cache for later runs) into `report_dir`."""
    paths = [Path(p) for p in options.train] or [bundled_example("sft.jsonl")]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"Training data {path} not found; set data.train to existing JSONL files")
    directory = cache_root / cache_key(paths, chat, options)
    if not (directory / "filter_summary.json").is_file():
        summary = FilterSummary()
        samples = build_sft_samples(paths, chat, options, seed, summary)
        partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
        TokenizedDataset.from_samples(samples).save(partial)
        summary.write(partial)
        (partial / "summary.txt").write_text(summary.format() + "\n")
        shutil.rmtree(directory, ignore_errors=True)
        partial.rename(directory)
        print(
            f"Tokenized {len(samples)} samples from {', '.join(map(str, paths))} into {directory}", flush=True
        )
    else:
        print(f"Using tokenized cache {directory}", flush=True)
    print((directory / "summary.txt").read_text(), flush=True)
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(directory / "filter_summary.json", report_dir / "filter_summary.json")
    return directory
