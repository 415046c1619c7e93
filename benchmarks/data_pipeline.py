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

--records N measures the cache build at scale instead: N records of the bundled mixture's shape
(`hermes.data.examples.make_examples.conversations` with seeds 0, 1, ...: 2,000 distinct records each) in
one JSONL file, prepared by `prepare_sft_dataset` (read, filter, render and tokenize in `data.workers`
processes, write the cache) with 1 and with 2 workers, each in a fresh process. Per run: wall time,
tokens/s of wall time (`x raw`: over the baseline's tokens/s), CPU time of the preparing process and of
its workers, tokens per CPU second, peak RSS of the preparing process and of a worker (RSS and USS, the
pages no other process shares, sampled by psutil when it is installed), the cores kept busy on average
(CPU time over wall time: below workers + 1 where other programs share the machine) and the load average
at the end. The baseline, in the same run, is raw tiktoken `encode_ordinary` on one core over the message
contents of the first --baseline-records records. From the CPU time of the phases of the 1-worker run (the
data files' digest, the shard loop, the final assembly) and of the preparing process with 2 workers, it
projects the build of --project-tokens tokens on a node of --project-cores cores (see `project`).

Usage: python benchmarks/data_pipeline.py [--repeat N] [--seq-len N] [--runs N] [--profile]
       python benchmarks/data_pipeline.py --records N [--baseline-records N] [--runs N]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import itertools
import json
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import threading
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
from hermes.data.dataset import TokenizedDataset
from hermes.data.examples.make_examples import conversations
from hermes.data.packing import PackedBatch, pack_lengths
from hermes.data.pipeline import build_sft_samples, bundled_example, prepare_sft_dataset
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
    "read JSONL lines": (pipeline_module, "read_shards"),
    "decode JSON lines": (pipeline_module, "shard_records"),
    "parse records": (pipeline_module, "parse_conversation"),
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


# --- the cache build at scale ------------------------------------------------------------------------


def write_records(path: Path, records: int) -> None:
    """`records` records of the bundled mixture's shape, 2,000 distinct ones per make_examples seed."""
    with path.open("w") as file:
        left = records
        for seed in itertools.count():
            if left <= 0:
                return
            batch = conversations(seed)[:left]
            file.write("".join(json.dumps(record) + "\n" for record in batch))
            left -= len(batch)


class WorkerSampler:
    """Samples the CPU time, RSS and USS (the pages no other process shares: most of a worker's RSS is the
    fork server's imports, shared) of this process' grandchildren, the workers forked by the fork server
    that is its child, every `interval` seconds, with psutil when it is installed. Its own CPU time, which
    the preparing process' includes, is kept apart."""

    def __init__(self, interval: float = 0.5) -> None:
        try:
            import psutil
        except ImportError:
            self.psutil = None
            return
        self.psutil, self.interval = psutil, interval
        self.cpu: dict[int, float] = {}
        self.peak_rss = self.peak_uss = 0
        self.own_cpu = 0.0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        me = self.psutil.Process()
        while not self.done.wait(self.interval):
            for worker in (w for child in me.children() for w in self._children(child)):
                with contextlib.suppress(self.psutil.Error):
                    times, memory = worker.cpu_times(), worker.memory_full_info()
                    self.cpu[worker.pid] = times.user + times.system
                    self.peak_rss = max(self.peak_rss, memory.rss)
                    self.peak_uss = max(self.peak_uss, memory.uss)
        self.own_cpu = time.thread_time()

    def _children(self, process) -> list:
        try:
            return process.children()
        except self.psutil.Error:
            return []

    def stop(self) -> dict[str, float | None]:
        """Workers' CPU seconds (summed), largest RSS and USS (bytes), None without psutil or workers; and
        the sampler's own CPU seconds."""
        if self.psutil is None:
            return {
                "workers_cpu_s": None,
                "workers_peak_rss": None,
                "workers_peak_uss": None,
                "sampler_cpu_s": 0.0,
            }
        self.done.set()
        self.thread.join()
        return {
            "workers_cpu_s": sum(self.cpu.values()) or None,
            "workers_peak_rss": self.peak_rss or None,
            "workers_peak_uss": self.peak_uss or None,
            "sampler_cpu_s": self.own_cpu,
        }


def measure_prepare(path: Path, workers: int, cache: Path, seq_len: int) -> dict[str, float | None]:
    """Prepare the cache of `path` with `workers` processes (in this fresh process) and time its phases."""
    chat = ChatFormat(Tokenizer.default())
    phases = dict.fromkeys(["digest_s", "digest_cpu_s", "assemble_s", "assemble_cpu_s"], 0.0)
    patches = contextlib.ExitStack()
    for phase, name in (("digest", "cache_key"), ("assemble", "assemble_shards")):
        original = getattr(pipeline_module, name)

        def timed_phase(*args, _original=original, _phase=phase, **kwargs):
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return _original(*args, **kwargs)
            finally:
                phases[f"{_phase}_s"] += time.perf_counter() - start
                phases[f"{_phase}_cpu_s"] += time.process_time() - cpu

        patches.enter_context(mock.patch.object(pipeline_module, name, timed_phase))
    sampler = WorkerSampler()
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    with patches, contextlib.redirect_stdout(sys.stderr):
        directory = prepare_sft_dataset(
            chat, DataConfig(train=[str(path)], seq_len=seq_len, workers=workers), 0, cache
        )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    sampled = sampler.stop()
    dataset = TokenizedDataset.load(directory)
    return {
        "wall_s": wall,
        "cpu_s": after.ru_utime
        + after.ru_stime
        - before.ru_utime
        - before.ru_stime
        - sampled["sampler_cpu_s"],
        "peak_rss": after.ru_maxrss * 1024,
        "samples": len(dataset),
        "tokens": int(dataset.offsets[-1]),
        **phases,
        **sampled,
        "load_average": os.getloadavg()[0],
    }


def raw_baseline(path: Path, records: int, runs: int, tokenizer: Tokenizer) -> Timing:
    """Raw tiktoken encode_ordinary, one core, over the message contents of the first `records` records."""
    texts = [
        "\n".join(m.content for m in c.messages) for c in itertools.islice(read_conversations(path), records)
    ]
    encoding = raw_encoding(tokenizer)
    work = {"raw": lambda: (len(texts), sum(len(encoding.encode_ordinary(t)) for t in texts))}
    return best_of(runs, work)["raw"]


def scale(args: argparse.Namespace) -> None:
    """The --records benchmark (module docstring)."""
    mib = 1 << 20
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "records.jsonl"
        start = time.perf_counter()
        write_records(path, args.records)
        print(
            f"{args.records} records ({path.stat().st_size / 1e6:.0f} MB of JSONL, written in "
            f"{time.perf_counter() - start:.0f} s), seq_len {args.seq_len}",
            flush=True,
        )
        raw = raw_baseline(path, args.baseline_records, args.runs, Tokenizer.default())
        runs = {}
        for workers in (1, 2):
            cache = Path(tmp) / f"cache-{workers}"
            command = [sys.executable, __file__, "--measure", str(path), str(workers), str(cache)]
            command += ["--seq-len", str(args.seq_len)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[workers] = json.loads(output.splitlines()[-1])
    raw_rate = raw.tokens / raw.cpu_s
    print(
        f"baseline: raw tiktoken encode_ordinary, 1 core, {raw.records} records' message contents: "
        f"{raw.tokens} tokens in {raw.cpu_s:.2f} CPU s = {raw_rate / 1e6:.2f}M tokens/s (best of {args.runs})"
    )
    header = (
        f"{'workers':>7s} {'wall s':>7s} {'records/s':>10s} {'tokens/s':>10s} {'x raw':>6s} "
        f"{'CPU s':>7s} {'workers CPU s':>13s} {'tokens/CPU s':>12s} {'peak RSS MiB':>12s} "
        f"{'worker RSS/USS MiB':>18s} {'cores':>5s} {'load':>5s}"
    )
    print(header)
    print("-" * len(header))
    cpu = {}
    for workers, run in runs.items():
        rate = run["tokens"] / run["wall_s"]
        cpu[workers] = run["cpu_s"] + (run["workers_cpu_s"] or 0)
        workers_cpu = "-" if run["workers_cpu_s"] is None else f"{run['workers_cpu_s']:.1f}"
        worker_memory = "-"
        if run["workers_peak_rss"]:
            worker_memory = f"{run['workers_peak_rss'] / mib:.0f}/{run['workers_peak_uss'] / mib:.0f}"
        print(
            f"{workers:7d} {run['wall_s']:7.1f} {args.records / run['wall_s']:10.0f} {rate:10.0f} "
            f"{rate / raw_rate:6.2f} {run['cpu_s']:7.1f} {workers_cpu:>13s} "
            f"{run['tokens'] / cpu[workers]:12.0f} {run['peak_rss'] / mib:12.0f} {worker_memory:>18s} "
            f"{cpu[workers] / run['wall_s']:5.2f} {run['load_average']:5.1f}"
        )
    one, two = runs[1], runs[2]
    print(
        f"2 workers / 1 worker: {one['wall_s'] / two['wall_s']:.2f}x the tokens per second of wall time, "
        f"{cpu[2] / cpu[1]:.2f}x the CPU time; {one['tokens']} tokens, {one['samples']} samples in both: "
        f"{(one['tokens'], one['samples']) == (two['tokens'], two['samples'])}"
    )
    project(args, one, two)


def project(args: argparse.Namespace, one: dict, two: dict) -> None:
    """Print the projected cache build of args.project_tokens tokens on args.project_cores cores.

    By CPU time (this machine is shared, so its wall clock is not the work's): the serial phases, the
    digest of the data files and the final assembly, scale with the tokens. The shard loop runs at the
    lesser of two rates: the workers', one core each at the speed of the 1-worker run's loop (which does
    the whole job on one core), and the preparing process', whose CPU per token in the loop is the
    2-worker run's (reading, sending shards, merging results). It assumes the node's cores as fast as
    these, one free core for the preparing process, and storage and memory bandwidth not in the way."""
    tokens, cores = one["tokens"], args.project_cores
    worker_rate = tokens / (one["cpu_s"] - one["digest_cpu_s"] - one["assemble_cpu_s"])
    parent_rate = tokens / (two["cpu_s"] - two["digest_cpu_s"] - two["assemble_cpu_s"])
    loop_rate = min(worker_rate * cores, parent_rate)
    serial = (one["digest_cpu_s"] + one["assemble_cpu_s"]) * args.project_tokens / tokens
    loop = args.project_tokens / loop_rate
    single = args.project_tokens * one["cpu_s"] / tokens
    print(
        f"projection by CPU time, {args.project_tokens / 1e6:.0f}M tokens on {cores} cores: digest + "
        f"assembly {serial:.0f} s (here {one['digest_cpu_s']:.1f} + {one['assemble_cpu_s']:.1f} CPU s for "
        f"{tokens / 1e6:.1f}M tokens), shard loop {loop:.0f} s at {loop_rate / 1e6:.0f}M tokens/s (a "
        f"worker {worker_rate / 1e6:.2f}M tokens/s; the preparing process feeds up to "
        f"{parent_rate / 1e6:.0f}M tokens/s), about {serial + loop:.0f} s in all, against {single:.0f} s "
        "with 1 worker"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5, help="copies of the bundled sft.jsonl")
    parser.add_argument("--seq-len", type=int, default=8192, help="packed row length")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each path; the best is kept")
    parser.add_argument("--profile", action="store_true", help="also time each stage and profile a pass")
    parser.add_argument("--records", type=int, default=0, help="measure the cache build of N records")
    parser.add_argument("--baseline-records", type=int, default=100_000, help="records of the raw baseline")
    parser.add_argument("--project-tokens", type=float, default=390e6, help="tokens of the projection")
    parser.add_argument("--project-cores", type=int, default=96, help="cores of the projection's node")
    parser.add_argument("--measure", nargs=3, metavar=("FILE", "WORKERS", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        path, workers, cache = args.measure
        print(json.dumps(measure_prepare(Path(path), int(workers), Path(cache), args.seq_len)))
        return
    if args.records:
        scale(args)
        return

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
