"""Data pipeline throughput: JSONL to a PackedBatch, against raw tiktoken encoding of the same records.

- pipeline: `build_sft_samples` (read JSONL -> content filters -> ChatML rendering -> fit to seq_len ->
  token filters), then `pack_lengths` and `PackedBatch.from_rows` over all rows. Its tokens are the
  rendered tokens that reach the batch (chat template and tool system prompts included).
- raw tiktoken: a `tiktoken.Encoding` built here from the same rank file and split pattern, encoding each
  record's message contents joined by newlines: `encode_ordinary` one record at a time (one thread, as
  the pipeline), and `encode_ordinary_batch` (tiktoken's thread pool).

Input: the bundled sft.jsonl repeated --repeat times (read outside the timings). Speeds are per second
of this process's CPU time, best of --runs, the paths taking turns (a shared machine distorts CPU time
less than wall time); for the thread pool, CPU time sums its threads. `x raw` = tokens/s over
encode_ordinary's tokens/s.

--profile then times each stage of one pipeline pass (wall time, by wrapping the stage's function) and
prints cProfile's top functions of another pass.

Usage: python benchmarks/data_pipeline.py [--repeat N] [--seq-len N] [--runs N] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import pstats
import sys
import tempfile
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from hermes.config import DataConfig
from hermes.data import filters
from hermes.data import pipeline as pipeline_module
from hermes.data.chat import ChatFormat
from hermes.data.packing import PackedBatch, pack_lengths
from hermes.data.pipeline import build_sft_samples, bundled_example
from hermes.data.records import read_conversations
from hermes.data.tokenizer import LLAMA3_PATTERN, TiktokenTokenizer, Tokenizer


@dataclass
class Timing:
    records: int
    tokens: int
    cpu_s: float
    wall_s: float


def best_of(runs: int, paths: dict[str, Callable[[], tuple[int, int]]]) -> dict[str, Timing]:
    """Run each path (returning records, tokens) `runs` times, taking turns so that every path meets the
    same machine load; keep each path's run with the least CPU time."""
    best: dict[str, Timing] = {}
    for _ in range(runs):
        for name, work in paths.items():
            cpu, wall = time.process_time(), time.perf_counter()
            records, tokens = work()
            timing = Timing(records, tokens, time.process_time() - cpu, time.perf_counter() - wall)
            if name not in best or timing.cpu_s < best[name].cpu_s:
                best[name] = timing
    return best


def pipeline(path: Path, chat: ChatFormat, seq_len: int) -> tuple[int, int]:
    """JSONL -> PackedBatch of every row; returns (records read, tokens in the batch)."""
    built = build_sft_samples([path], chat, DataConfig(seq_len=seq_len), seed=0)
    samples = built.samples
    bins = pack_lengths([len(s) for s in samples], seq_len)
    batch = PackedBatch.from_rows([[samples[i] for i in b] for b in bins], seq_len, chat.tokenizer.pad_id)
    return built.summary.stages["records"].seen, batch.num_real_tokens


def raw_encoding(tokenizer: Tokenizer) -> tiktoken.Encoding:
    """Llama 3's BPE straight from its rank file, with no special tokens."""
    ranks = load_tiktoken_bpe(tokenizer.source)
    return tiktoken.Encoding("llama3-raw", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})


STAGES = {
    "read + parse JSONL": (pipeline_module, "read_conversations"),
    "content filters": (filters, "conversation_problem"),
    "render (ChatFormat.render)": (ChatFormat, "render"),
    "  of which Tokenizer.encode": (TiktokenTokenizer, "encode"),
    "fit to seq_len": (pipeline_module, "fit_sample"),
    "token filters": (filters, "sample_problem"),
    "pack_lengths": (sys.modules[__name__], "pack_lengths"),
    "PackedBatch.from_rows": (PackedBatch, "from_rows"),
}
"""Stage label -> (owner, name) of the function whose calls make up that stage."""


def timed(function: Callable, totals: dict[str, float], stage: str) -> Callable:
    """`function` with the wall time of its calls (and of each step of a returned generator) added to
    totals[stage]."""

    def steps(iterator: Iterator) -> Iterator:
        while True:
            start = time.perf_counter()
            item = next(iterator, StopIteration)
            totals[stage] += time.perf_counter() - start
            if item is StopIteration:
                return
            yield item

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        totals[stage] += time.perf_counter() - start
        return steps(result) if isinstance(result, Generator) else result

    return wrapper


def profile_pipeline(path: Path, chat: ChatFormat, seq_len: int) -> None:
    """Print the time of each stage of one pipeline pass, then cProfile's top functions of another."""
    totals = dict.fromkeys(STAGES, 0.0)
    with contextlib.ExitStack() as patches:
        for stage, (owner, name) in STAGES.items():
            # A function set on a class binds as a method; from_rows stays bound to PackedBatch.
            patches.enter_context(mock.patch.object(owner, name, timed(getattr(owner, name), totals, stage)))
        start = time.perf_counter()
        pipeline(path, chat, seq_len)
        total = time.perf_counter() - start
    print(f"\nStages of one pipeline pass (wall time, {total:.2f} s in all)")
    for stage, seconds in totals.items():
        print(f"{stage:30s} {seconds:6.2f} s {seconds / total:6.1%}")
    profiler = cProfile.Profile()
    profiler.runcall(pipeline, path, chat, seq_len)
    print("\ncProfile of another pass (profiling inflates code that makes many small calls)")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5, help="copies of the bundled sft.jsonl")
    parser.add_argument("--seq-len", type=int, default=8192, help="packed row length")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each path; the best is kept")
    parser.add_argument("--profile", action="store_true", help="also time each stage and profile a pass")
    args = parser.parse_args()

    chat = ChatFormat(Tokenizer.default())
    encoding = raw_encoding(chat.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sft.jsonl"
        path.write_text(bundled_example("sft.jsonl").read_text() * args.repeat)
        texts = ["\n".join(m.content for m in c.messages) for c in read_conversations(path)]
        size_mb = path.stat().st_size / 1e6

        def ordinary() -> tuple[int, int]:
            return len(texts), sum(len(encoding.encode_ordinary(text)) for text in texts)

        def ordinary_batch() -> tuple[int, int]:
            return len(texts), sum(map(len, encoding.encode_ordinary_batch(texts)))

        results = best_of(
            args.runs,
            {
                "pipeline: JSONL -> PackedBatch": lambda: pipeline(path, chat, args.seq_len),
                "tiktoken encode_ordinary": ordinary,
                "tiktoken encode_ordinary_batch": ordinary_batch,
            },
        )
        print(
            f"{len(texts)} records ({args.repeat} x bundled sft.jsonl, {size_mb:.1f} MB), "
            f"seq_len {args.seq_len}, best of {args.runs} runs by CPU time"
        )
        raw = results["tiktoken encode_ordinary"]
        header = (
            f"{'path':32s} {'records':>8s} {'tokens':>10s} {'CPU s':>7s} {'wall s':>7s} "
            f"{'records/s':>10s} {'tokens/s':>10s} {'x raw':>6s}"
        )
        print(header)
        print("-" * len(header))
        for name, t in results.items():
            ratio = (t.tokens / t.cpu_s) / (raw.tokens / raw.cpu_s)
            print(
                f"{name:32s} {t.records:8d} {t.tokens:10d} {t.cpu_s:7.2f} {t.wall_s:7.2f} "
                f"{t.records / t.cpu_s:10.0f} {t.tokens / t.cpu_s:10.0f} {ratio:6.2f}"
            )
        if args.profile:
            profile_pipeline(path, chat, args.seq_len)


if __name__ == "__main__":
    main()
