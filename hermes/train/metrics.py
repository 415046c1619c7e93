"""Training metrics: FLOPs and MFU, memory, the per-step JSONL log, wandb, and the progress bar."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

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
    ({"step", "epoch", "val_loss"}), mirrors them to wandb when asked, and shows a tqdm progress bar (step,
    epoch, loss, tokens/s, elapsed and ETA) on standard error.

    Args:
        path: the metrics file (RUN_DIR/metrics.jsonl); wandb writes into its folder.
        total_steps: the run's step count.
        completed_steps: steps done before this process started (a resume starts the bar there).
        wandb_mode: "off", "offline" or "online".
        config_dict: the run configuration, recorded in the wandb run.
        progress: show the bar.
        run_name: the wandb run's display name.
    """

    def __init__(
        self,
        path: Path,
        total_steps: int,
        completed_steps: int,
        wandb_mode: str,
        config_dict: dict,
        progress: bool,
        run_name: str = "",
    ) -> None:
        self.path = path
        self.wandb = None
        if wandb_mode != "off":
            self.wandb = start_wandb(path.parent, wandb_mode, config_dict, run_name)
        self.bar = tqdm(
            total=total_steps,
            initial=completed_steps,
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not progress,
        )

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])
        if "loss" not in record:
            if not self.bar.disable:
                self.bar.write(f"step {record['step']} val_loss {record['val_loss']:.4f}", file=sys.stderr)
            return
        self.bar.set_postfix_str(
            f"epoch {record.get('epoch', 0)} loss {record['loss']:.4f} lr {record['lr']:.2e} "
            f"{record['tokens_per_s']:.0f} tok/s",
            refresh=False,
        )
        self.bar.update(record["step"] - self.bar.n)

    def close(self) -> None:
        self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


WANDB_ID_FILE = "wandb_run_id"
"""RUN_DIR/wandb_run_id: the wandb run a resumed run continues."""


def start_wandb(run_dir: Path, mode: str, config_dict: dict, name: str = "") -> Any:
    """A wandb run logging into run_dir/wandb, with the id kept in run_dir/wandb_run_id: the first start
    writes the id wandb drew there, every resume continues that run (`resume="allow"`).

    Raises:
        ImportError: wandb is not installed.
    """
    try:
        import wandb
    except ImportError as error:
        raise ImportError(
            f"logging.wandb = {mode!r} needs wandb: pip install 'hermes[wandb]', or set --logging.wandb off"
        ) from error
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else None  # None: wandb draws one
    run = wandb.init(
        project="hermes",
        name=name or None,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        config=config_dict,
        mode=mode,
    )
    id_file.write_text(run.id + "\n")
    return run


def device_memory() -> dict[str, float]:
    """Peak allocated GPU memory of this process since the last call, in GiB (empty on CPU)."""
    if not torch.cuda.is_available():
        return {}
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return {"peak_memory_gib": round(peak, 3)}
