"""From JSONL files to a tokenized, filtered dataset, cached on disk.

records -> content filters -> ChatML rendering with loss masks -> over-long policy -> token filters ->
category mixture -> TokenizedDataset. The result is cached under a key made of the data files' contents,
the tokenizer, the Hermes tag ids and every option that changes the result, so a large mixture is
tokenized once and later runs (and every rank) memory-map it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import TypeVar

from hermes.config import DataConfig
from hermes.data.chat import ChatFormat
from hermes.data.dataset import TokenizedDataset
from hermes.data.filters import (
    ContentFilters,
    FilterSummary,
    Mixture,
    filter_conversations,
    filter_pairs,
    filter_samples,
    mix,
)
from hermes.data.packing import fit_sample, gc_paused
from hermes.data.records import read_conversations, read_preference_pairs
from hermes.data.sample import Sample

CACHE_FORMAT = 4
"""Bump when the cached layout or the rendering changes, so old caches are not reused."""

REPORT_FILES = ("filter_summary.json", "mixture_summary.json")
"""Files copied from the cache into the run directory."""

T = TypeVar("T")

CHUNK_RECORDS = 1024
"""Records read, then filtered, then rendered together. Running each stage over a chunk rather than one
record at a time keeps its code and data (the tokenizer's rank table) in the CPU caches: the build is about
a fifth faster, and memory stays bounded."""


def bundled_example(name: str) -> Path:
    """Path of a bundled example file: "sft.jsonl" or "preference.jsonl"."""
    return Path(str(resources.files("hermes.data.examples") / name))


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items (the last one shorter), read from `items` as they are needed."""
    iterator = iter(items)
    return iter(lambda: list(itertools.islice(iterator, size)), [])


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(paths: list[Path], chat: ChatFormat, options: DataConfig, seed: int) -> str:
    """Digest of everything the tokenized result depends on (the seed only matters with a mixture)."""
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
        "chat": sorted(chat.special_tokens.items()),
        "options": {k: v for k, v in dataclasses.asdict(options).items() if k not in ("train", "cache_dir")},
        "mixture_seed": seed if options.mixture else None,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


@dataclasses.dataclass
class BuiltSamples:
    """What a builder (`build_sft_samples`, `build_preference_samples`) keeps, and its account of what it
    did to the records."""

    samples: list[Sample]
    summary: FilterSummary
    """Records and samples seen, kept and dropped per reason, per stage, and the samples the seq_len stage
    truncated."""
    mixture: Mixture | None
    """The category mixture applied; None when `data.mixture` is empty."""

    def format(self) -> str:
        """The filter table, the truncation count, then the mixture table."""
        parts = [self.summary.format()]
        truncated, examples = self.summary.truncated("seq_len")
        if truncated:
            parts.append(f"truncated to seq_len: {truncated} samples (e.g. {', '.join(examples)})")
        if self.mixture is not None:
            parts.append(self.mixture.format())
        return "\n\n".join(parts)

    def write(self, directory: Path) -> None:
        """Write filter_summary.json, mixture_summary.json (with a mixture) and summary.txt (`format()`)."""
        self.summary.write(directory)
        if self.mixture is not None:
            self.mixture.write(directory)
        (directory / "summary.txt").write_text(self.format() + "\n")


def build_sft_samples(paths: list[Path], chat: ChatFormat, options: DataConfig, seed: int) -> BuiltSamples:
    """Read, filter, render, fit to seq_len, filter by tokens and mix; every drop is counted.

    The token filters run after fitting, so a sample truncated to its untrained prompt is dropped as
    `no_trained_tokens`.
    """
    summary = FilterSummary()
    filters = ContentFilters() if options.drop_refusals else ContentFilters(refusal_phrases=())
    kept: list[Sample] = []
    with gc_paused():  # records, token lists and samples hold no cycles
        for chunk in _chunks(read_conversations(paths), CHUNK_RECORDS):
            conversations = list(filter_conversations(chunk, summary, filters))
            samples = [chat.render(conversation) for conversation in conversations]
            fitted = []
            for conversation, sample in zip(conversations, samples):
                fitted_sample = fit_sample(sample, options.seq_len, options.overlong)
                reason = "longer_than_seq_len" if fitted_sample is None else None
                truncated = fitted_sample is not None and fitted_sample is not sample
                summary.add("seq_len", conversation.source, reason, truncated=truncated)
                if fitted_sample is not None:
                    fitted.append((conversation.source, fitted_sample))
            kept += [s for _, s in filter_samples(fitted, summary, options.min_tokens, options.max_tokens)]
    mixture = None
    if options.mixture:
        mixture = mix([s.category for s in kept], [len(s) for s in kept], options.mixture, seed)
        kept = [kept[i] for i in mixture.indices]
    return BuiltSamples(kept, summary, mixture)


def build_preference_samples(
    paths: list[Path], chat: ChatFormat, options: DataConfig, seed: int
) -> BuiltSamples:
    """Read and filter preference pairs and render each as its (chosen, rejected) samples, interleaved:
    sample 2k is pair k's chosen side, 2k + 1 its rejected side. Both sides of a pair train in one packed
    row, so a pair longer than seq_len in total is dropped (never truncated: a cut response would
    compare unlike with unlike); a pair with a side that has no trained token is dropped too."""
    summary = FilterSummary()
    filters = ContentFilters() if options.drop_refusals else ContentFilters(refusal_phrases=())
    kept: list[Sample] = []
    for pair in filter_pairs(read_preference_pairs(paths), summary, filters):
        chosen, rejected = chat.render_preference(pair)
        reason = None
        if len(chosen) + len(rejected) > options.seq_len:
            reason = "pair_longer_than_seq_len"
        elif chosen.trained_tokens == 0 or rejected.trained_tokens == 0:
            reason = "no_trained_tokens"
        summary.add("pairs", pair.source, reason)
        if reason is None:
            kept += [chosen, rejected]
    return BuiltSamples(kept, summary, None)


def prepare_sft_dataset(
    chat: ChatFormat, options: DataConfig, seed: int, cache_root: Path, report_dir: Path | None = None
) -> Path:
    """Build (or find) the cached SFT dataset (data.train, default: the bundled sft.jsonl) and return its
    directory. See `_prepare`."""
    return _prepare("sft", build_sft_samples, chat, options, seed, cache_root, report_dir)


def prepare_preference_dataset(
    chat: ChatFormat, options: DataConfig, seed: int, cache_root: Path, report_dir: Path | None = None
) -> Path:
    """Build (or find) the cached preference dataset (data.train, default: the bundled preference.jsonl)
    as interleaved (chosen, rejected) samples, and return its directory. See `_prepare`."""
    return _prepare("preference", build_preference_samples, chat, options, seed, cache_root, report_dir)


def _prepare(
    kind: str,
    builder: Callable[[list[Path], ChatFormat, DataConfig, int], BuiltSamples],
    chat: ChatFormat,
    options: DataConfig,
    seed: int,
    cache_root: Path,
    report_dir: Path | None,
) -> Path:
    """Build (or find) a cached dataset of `kind` and return its directory.

    Prints the filter summary (and the mixture table), and copies filter_summary.json and, with a
    mixture, mixture_summary.json from the cache into `report_dir`.

    Raises:
        FileNotFoundError: a data file does not exist.
    """
    paths = [Path(p) for p in options.train] or [bundled_example(f"{kind}.jsonl")]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"Training data {path} not found; set data.train to existing JSONL files")
    directory = cache_root / f"{kind}-{cache_key(paths, chat, options, seed)}"
    if not (directory / "filter_summary.json").is_file():
        built = builder(paths, chat, options, seed)
        partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
        TokenizedDataset.from_samples(built.samples).save(partial)
        built.write(partial)
        shutil.rmtree(directory, ignore_errors=True)
        partial.rename(directory)
        print(
            f"Tokenized {len(built.samples)} samples from {', '.join(map(str, paths))} into {directory}",
            flush=True,
        )
    else:
        print(f"Using tokenized cache {directory}", flush=True)
    print((directory / "summary.txt").read_text(), flush=True)
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        for name in REPORT_FILES:
            if (directory / name).is_file():
                shutil.copy(directory / name, report_dir / name)
            else:  # a mixture summary left by an earlier run with a mixture
                (report_dir / name).unlink(missing_ok=True)
    return directory
