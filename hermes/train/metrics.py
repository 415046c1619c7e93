"""Training metrics: FLOPs and MFU, memory, the per-step JSONL log, wandb, and the progress line."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hermes.model.config import LlamaConfig

H100_BF16_PEAK_FLOPS = 989e12
"""Dense bf16 peak of an H100 SXM, the denominator of MFU."""


def non_embedding_params(config: LlamaConfig) -> int:
    """Parameters excluding the embedding table (the output head counts: it is a matmul)."""
    hd = config.attention_head_dim
    attention = config.dim * hd * (2 * config.n_heads + 2 * config.n_kv_heads)
    ffn = 3 * config.dim * config.hidden_dim
    norms = 2 * config.dim
    return config.n_layers * (attention + ffn + norms) + config.dim + config.dim * config.vocab_size


def training_flops(config: LlamaConfig, sample_lengths: list[int]) -> float:
    """FLOPs of one forward + backward over samples of these lengths: 6 N per token plus
    12 * layers * dim * span per token, where span is the token's own sample length (PaLM / torchtitan
    convention, no causal discount; with packing the span is the sample's, not the row's). N excludes the
    embedding table; a tied head is that table, so it is excluded with it."""
    tokens = sum(sample_lengths)
    attention = 12 * config.n_layers * config.dim * sum(n * n for n in sample_lengths)
    tied_head = config.dim * config.vocab_size if config.tie_word_embeddings else 0
    params = non_embedding_params(config) - tied_head
    return 6 * params * tokens + attention


class MetricsLog:
    """Appends one JSON object per optimizer step to `metrics.jsonl` (rank 0), and one per validation
    ({"step", "epoch", "val_loss"}), mirrors them to wandb when asked, and prints a progress line."""

    def __init__(
        self, path: Path, total_steps: int, wandb_mode: str, config_dict: dict, progress: bool
    ) -> None:
        self.path = path
        self.total_steps = total_steps
        self.progress = progress
        self.started = time.monotonic()
        self.wandb = None
        if wandb_mode != "off":
            import wandb

            mode = wandb_mode if os.environ.get("WANDB_API_KEY") or wandb_mode == "offline" else "offline"
            self.wandb = wandb.init(project="hermes", dir=str(path.parent), config=config_dict, mode=mode)

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])
        if self.progress and "loss" not in record:
            print(f"step {record['step']} val_loss {record['val_loss']:.4f}", file=sys.stderr, flush=True)
        elif self.progress:
            done = record["step"] / max(1, self.total_steps)
            bar = "#" * int(30 * done) + "-" * (30 - int(30 * done))
            elapsed = time.monotonic() - self.started
            line = (
                f"[{bar}] step {record['step']}/{self.total_steps} epoch {record.get('epoch', 0)} "
                f"loss {record['loss']:.4f} lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s "
                f"{elapsed:.0f}s"
            )
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def device_memory() -> dict[str, float]:
    """Peak allocated GPU memory of this process since the last call, in GiB (empty on CPU)."""
    if not torch.cuda.is_available():
        return {}
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return {"peak_memory_gib": round(peak, 3)}
