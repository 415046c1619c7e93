"""From data files to a tokenized, filtered dataset, cached on disk.

records -> content filters -> ChatML rendering with loss masks -> over-long policy -> token filters ->
category mixture -> TokenizedDataset. The result is cached under a key made of the data files' contents,
the tokenizer, the Hermes tag ids and every option that changes the result, so a large mixture is
tokenized once and later runs (and every rank) memory-map it.

Where it runs: on global rank 0 alone (hermes.train.build), which writes the cache into `data.cache_dir`,
on storage every node sees, and broadcasts its directory; every rank then memory-maps the same files. One
writer keeps the cache free of races and of duplicated work, and its node's cores do the work: rank 0 cuts
data.train into shards of CHUNK_RECORDS records (hermes.data.sources), and `data.workers` processes
(default: every core rank 0 may run on) read, filter, render and tokenize them (hermes.data.workers:
forkserver workers, the chat format rebuilt in each by `portable_chat`), while the other ranks wait in the
broadcast. At the Hermes 3 scale, 390M tokens, one 96-core node should take about half a minute (projected
in benchmarks/README.md, "Data pipeline"), so spreading the shards over nodes would save little.

Determinism: shards are cut by record count alone, each worker writes its shard's samples to a file of its
own, and rank 0 takes the results in shard order, merges the filter counts in that order and assembles the
cache from the shard files in that order. So the cache (every file's bytes) and its key are the same for
any number of workers; `data.workers` is not part of the key.

Memory: rank 0 holds the shards in flight (raw records and results; hermes.data.workers.ordered_map says
how many: two per worker), and per sample its length and category (the mixture and the cache's offsets
need them; about 50 bytes a sample at the end); a worker holds one shard's records and samples; the cache
is assembled from the shard files one shard at a time, appended to its arrays. Neither grows with the
corpus' tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from hermes.config import DataConfig
from hermes.data.chat import ChatFormat
from hermes.data.dataset import assemble_shards, save_shard
from hermes.data.filters import (
    ContentFilters,
    FilterSummary,
    Mixture,
    filter_conversations,
    filter_pairs,
    filter_samples,
    mix,
)
from hermes.data.holdout import Selection, Split, select_records, split_files
from hermes.data.packing import fit_sample, gc_paused
from hermes.data.records import RECORD_FIELDS, parse_conversation, parse_preference_pair, shard_records
from hermes.data.sample import Sample
from hermes.data.sources import Shard, data_files, read_shards
from hermes.data.template_chat import TemplateChatFormat
from hermes.data.workers import available_cpus, ordered_map

CACHE_FORMAT = 5
"""Bump when the cached layout or the rendering changes, so old caches are not reused."""

REPORT_FILES = ("filter_summary.json", "mixture_summary.json")
"""Files copied from the cache into the run directory."""

CHUNK_RECORDS = 1024
"""Records per shard: the unit a worker reads, filters, renders, tokenizes and writes in one go. Running
each stage over a shard rather than one record at a time keeps its code and data (the tokenizer's rank
table) in the CPU caches, which makes the build about a fifth faster; the shard is also what memory holds
of the corpus at a time (see the module docstring). The result does not depend on it."""

ChatLike = ChatFormat | TemplateChatFormat
RecordStream = Iterable[tuple[str, dict]]


def bundled_example(name: str) -> Path:
    """Path of a bundled example file: "sft.jsonl" or "preference.jsonl"."""
    return Path(str(resources.files("hermes.data.examples") / name))


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(
    paths: list[Path], chat: ChatLike, options: DataConfig, seed: int, selections: Sequence[Selection] = ()
) -> str:
    """Digest of everything the tokenized result depends on (the seed only matters with a mixture; the
    number of workers never does). `selections` are the records each file gives the split
    (hermes.data.holdout), none meaning all."""
    tokenizer = chat.tokenizer
    key = {
        "format": CACHE_FORMAT,
        "files": [_file_digest(p) for p in paths],
        "selections": list(selections),
        "tokenizer": [
            type(tokenizer).__name__,
            tokenizer.vocab_size,
            sorted(tokenizer.special_tokens.items()),
            # tokenizer_config.json may move them without touching the tokenizer file
            [tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id],
        ],
        "tokenizer_file": _file_digest(Path(tokenizer.source))
        if Path(tokenizer.source).is_file()
        else tokenizer.source,
        "chat": sorted(chat.special_tokens.items()),
        "options": {
            k: v
            for k, v in dataclasses.asdict(options).items()
            if k not in ("train", "validation", "cache_dir", "workers")
        },
        "mixture_seed": seed if options.mixture else None,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class BuildReport:
    """A build's account of what it did to the records."""

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


@dataclass
class BuiltSamples(BuildReport):
    """What an in-memory builder (`build_sft_samples`, `build_preference_samples`) keeps, and its report."""

    samples: list[Sample]


def sft_shard(
    records: RecordStream, chat: ChatLike, options: DataConfig
) -> tuple[list[Sample], FilterSummary]:
    """Parse, filter, render, fit to seq_len and filter by tokens the records of one shard; every drop is
    counted in the returned summary.

    The token filters run after fitting, so a sample truncated to its untrained prompt is dropped as
    `no_trained_tokens`.
    """
    summary = FilterSummary()
    conversations = [parse_conversation(record, source) for source, record in records]
    kept = list(filter_conversations(conversations, summary, _content_filters(options)))
    fitted = []
    for conversation in kept:
        sample = chat.render(conversation)
        fitted_sample = fit_sample(sample, options.seq_len, options.overlong)
        reason = "longer_than_seq_len" if fitted_sample is None else None
        truncated = fitted_sample is not None and fitted_sample is not sample
        summary.add("seq_len", conversation.source, reason, truncated=truncated)
        if fitted_sample is not None:
            fitted.append((conversation.source, fitted_sample))
    samples = [s for _, s in filter_samples(fitted, summary, options.min_tokens, options.max_tokens)]
    return samples, summary


def preference_shard(
    records: RecordStream, chat: ChatLike, options: DataConfig
) -> tuple[list[Sample], FilterSummary]:
    """Parse and filter the preference pairs of one shard and render each as its (chosen, rejected)
    samples, interleaved: sample 2k is pair k's chosen side, 2k + 1 its rejected side. Both sides of a pair
    train in one packed row, so a pair longer than seq_len in total is dropped (never truncated: a cut
    response would compare unlike with unlike); a pair with a side that has no trained token is dropped
    too."""
    summary = FilterSummary()
    pairs = [parse_preference_pair(record, source) for source, record in records]
    samples: list[Sample] = []
    for pair in filter_pairs(pairs, summary, _content_filters(options)):
        chosen, rejected = chat.render_preference(pair)
        reason = None
        if len(chosen) + len(rejected) > options.seq_len:
            reason = "pair_longer_than_seq_len"
        elif chosen.trained_tokens == 0 or rejected.trained_tokens == 0:
            reason = "no_trained_tokens"
        summary.add("pairs", pair.source, reason)
        if reason is None:
            samples += [chosen, rejected]
    return samples, summary


ShardBuilder = Callable[[RecordStream, ChatLike, DataConfig], tuple[list[Sample], FilterSummary]]
SHARD_BUILDERS: dict[str, ShardBuilder] = {"sft": sft_shard, "preference": preference_shard}
"""Dataset kind -> the function that turns one shard of records into samples."""


def build_sft_samples(
    paths: Sequence[str | os.PathLike], chat: ChatLike, options: DataConfig, seed: int, split: Split = "train"
) -> BuiltSamples:
    """Every SFT sample of `paths` (as data.train) in memory, shard by shard as `sft_shard` builds them, then
    mixed (`data.mixture`); every drop is counted. The cache holds the same samples (`prepare_sft_dataset`);
    `split` is the training split or the validation split (hermes.data.holdout)."""
    samples, summary = _in_memory(sft_shard, paths, chat, options, split)
    mixture = _mixture([s.category for s in samples], [len(s) for s in samples], options, seed)
    if mixture is not None:
        samples = [samples[i] for i in mixture.indices]
    return BuiltSamples(summary=summary, mixture=mixture, samples=samples)


def build_preference_samples(
    paths: Sequence[str | os.PathLike], chat: ChatLike, options: DataConfig, seed: int, split: Split = "train"
) -> BuiltSamples:
    """Every preference sample of `paths` in memory, as `preference_shard` builds them (no mixture), of the
    training or the validation split."""
    samples, summary = _in_memory(preference_shard, paths, chat, options, split)
    return BuiltSamples(summary=summary, mixture=None, samples=samples)


def _in_memory(
    builder: ShardBuilder,
    paths: Sequence[str | os.PathLike],
    chat: ChatLike,
    options: DataConfig,
    split: Split,
) -> tuple[list[Sample], FilterSummary]:
    train = data_files(paths)
    validation = data_files(options.validation) if split == "validation" else []
    files, selections = _split(train, validation, options.validation_fraction, split)
    summary = FilterSummary()
    samples: list[Sample] = []
    with gc_paused():  # records, token lists and samples hold no cycles
        for shard in read_shards(files, CHUNK_RECORDS, RECORD_FIELDS):
            records = _selected_records(shard, selections, options.validation_fraction)
            shard_samples, shard_summary = builder(records, chat, options)
            samples += shard_samples
            summary.merge(shard_summary)
    return samples, summary


def _split(
    train: list[Path], validation: list[Path], fraction: float, split: Split
) -> tuple[list[Path], dict[str, tuple[int, Selection]]]:
    """The files of `split` and, by path, each one's index in data.train and the records it gives."""
    chosen = split_files(train, validation, fraction, split)
    index = {str(path): number for number, path in enumerate(train)}
    return [path for path, _ in chosen], {str(p): (index.get(str(p), -1), s) for p, s in chosen}


def _selected_records(
    shard: Shard, selections: dict[str, tuple[int, Selection]], fraction: float
) -> RecordStream:
    file_index, selection = selections[shard.path]
    return select_records(shard_records(shard), shard.path, file_index, selection, fraction)


def _content_filters(options: DataConfig) -> ContentFilters:
    return ContentFilters() if options.drop_refusals else ContentFilters(refusal_phrases=())


def _mixture(
    categories: Sequence[str], lengths: Sequence[int], options: DataConfig, seed: int
) -> Mixture | None:
    return mix(categories, lengths, options.mixture, seed) if options.mixture else None


def portable_chat(chat: ChatLike) -> Callable[[], ChatLike]:
    """A picklable recipe that builds `chat` again, in a worker process. A chat format holds memo closures
    (and a compiled Jinja template) that do not pickle; its tokenizer does (tiktoken's Encoding and
    SentencePiece's processor pickle), and the rest follows from a few of its fields."""
    if isinstance(chat, TemplateChatFormat):
        return functools.partial(
            TemplateChatFormat,
            chat.tokenizer,
            chat.chat_template,
            template_source=chat.source,
            special_token_text=chat._variables,  # the template's variables: the names given, completed
        )
    return functools.partial(
        ChatFormat, chat.tokenizer, chat.special_tokens, default_system_prompt=chat.default_system_prompt
    )


@dataclass(frozen=True)
class ShardResult:
    """What a worker sends back for one shard: its samples are in `path` (hermes.data.dataset.save_shard)."""

    path: Path
    lengths: np.ndarray
    categories: list[str]
    summary: FilterSummary


class ShardTokenizer:
    """Builds the samples of one (index, shard) and writes them to `directory`/<index>.npy. Pickles as a
    recipe: the chat format is rebuilt on the other side (`portable_chat`)."""

    def __init__(
        self,
        kind: str,
        chat: ChatLike,
        options: DataConfig,
        directory: Path,
        selections: dict[str, tuple[int, Selection]],
    ) -> None:
        self.kind, self.chat, self.options, self.directory = kind, chat, options, directory
        self.selections = selections

    def __call__(self, job: tuple[int, Shard]) -> ShardResult:
        index, shard = job
        with gc_paused():  # records, token lists and samples hold no cycles
            records = _selected_records(shard, self.selections, self.options.validation_fraction)
            samples, summary = SHARD_BUILDERS[self.kind](records, self.chat, self.options)
        path = self.directory / f"{index:08d}.npy"
        lengths = save_shard(path, samples)
        return ShardResult(path, lengths, [s.category for s in samples], summary)

    def __getstate__(self) -> dict:
        return {**vars(self), "chat": portable_chat(self.chat)}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state, chat=state["chat"]())


def prepare_sft_dataset(
    chat: ChatLike,
    options: DataConfig,
    seed: int,
    cache_root: Path,
    report_dir: Path | None = None,
    split: Split = "train",
) -> Path:
    """Build (or find) the cached SFT dataset (data.train, default: the bundled sft.jsonl) and return its
    directory: the samples of `build_sft_samples`. `split` "train" leaves out the records
    data.validation_fraction holds out; "validation" reads them and data.validation's (hermes.data.holdout),
    into a cache of its own. See `_prepare`."""
    return _prepare("sft", chat, options, seed, cache_root, report_dir, split)


def prepare_preference_dataset(
    chat: ChatLike,
    options: DataConfig,
    seed: int,
    cache_root: Path,
    report_dir: Path | None = None,
    split: Split = "train",
) -> Path:
    """Build (or find) the cached preference dataset (data.train, default: the bundled preference.jsonl)
    as interleaved (chosen, rejected) samples, the samples of `build_preference_samples`, and return its
    directory; `split` as for `prepare_sft_dataset`. See `_prepare`."""
    return _prepare("preference", chat, options, seed, cache_root, report_dir, split)


def _prepare(
    kind: str,
    chat: ChatLike,
    options: DataConfig,
    seed: int,
    cache_root: Path,
    report_dir: Path | None,
    split: Split,
) -> Path:
    """Build (or find) a cached dataset of `kind` and return its directory.

    Prints the filter summary (and the mixture table), and copies filter_summary.json and, with a
    mixture, mixture_summary.json from the cache into `report_dir`.

    Raises:
        FileNotFoundError, ValueError: a data.train entry that is missing or of no accepted form.
    """
    entries = [Path(p) for p in options.train] or [bundled_example(f"{kind}.jsonl")]
    validation = data_files(options.validation) if split == "validation" else []
    files, selections = _split(data_files(entries), validation, options.validation_fraction, split)
    key = cache_key(files, chat, options, seed, [selections[str(f)][1] for f in files])
    directory = cache_root / f"{kind}-{key}" if split == "train" else cache_root / f"{kind}-{split}-{key}"
    if not (directory / "filter_summary.json").is_file():
        partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            samples, report = _build_cache(kind, files, selections, chat, options, seed, partial)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        report.write(partial)
        shutil.rmtree(directory, ignore_errors=True)
        partial.rename(directory)
        what = "samples" if split == "train" else f"{split} samples"
        sources = ", ".join(map(str, entries if split == "train" else files))
        print(f"Tokenized {samples} {what} from {sources} into {directory}", flush=True)
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


def _build_cache(
    kind: str,
    files: list[Path],
    selections: dict[str, tuple[int, Selection]],
    chat: ChatLike,
    options: DataConfig,
    seed: int,
    directory: Path,
) -> tuple[int, BuildReport]:
    """Tokenize the `selections` of `files` shard by shard in `data.workers` processes into shard files, then assemble the
    cache in `directory` from them; returns the number of samples and the report."""
    shards = directory / "shards"
    shards.mkdir(parents=True)
    tokenize = ShardTokenizer(kind, chat, options, shards, selections)
    jobs = enumerate(read_shards(files, CHUNK_RECORDS, RECORD_FIELDS))
    summary = FilterSummary()
    paths, lengths, categories = [], [], []
    names: dict[str, str] = {}  # one string object per category, however many samples share it
    for result in ordered_map(tokenize, jobs, options.workers or available_cpus()):
        summary.merge(result.summary)
        paths.append(result.path)
        lengths.append(result.lengths)
        categories += [names.setdefault(c, c) for c in result.categories]
    every = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    # Preference pairs are never mixed: a mixture would split pairs (as in build_preference_samples).
    mixture = _mixture(categories, every.tolist(), options, seed) if kind == "sft" else None
    select = None if mixture is None else np.array(mixture.indices, dtype=np.int64)
    samples = assemble_shards(directory, paths, lengths, categories, select)
    shutil.rmtree(shards)
    return samples, BuildReport(summary=summary, mixture=mixture)
