"""A custom training loop built from hermes pieces, without launch/: the Llama model, the chat renderer,
the packing loader, FSDP2, the global-batch loss and AdamW with warmup + cosine.

    torchrun --standalone --nproc_per_node 2 examples/custom_sft_loop.py [--steps 10]

Runs on CPU (gloo) or GPU (NCCL). Copy it and change what you need.
"""

import argparse

import torch
import torch.distributed as dist

from hermes.config import OptimConfig
from hermes.data import ChatFormat, Tokenizer
from hermes.data.dataset import TokenizedDataset
from hermes.data.loader import PackedLoader
from hermes.data.pipeline import bundled_example
from hermes.data.records import read_conversations
from hermes.model import Llama, LlamaConfig
from hermes.parallel.fsdp import apply_fsdp
from hermes.parallel.mesh import ParallelDims, build_mesh, init_distributed
from hermes.train.losses import sft_loss
from hermes.train.optim import build_optimizer, build_scheduler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--preset", default="debug")
    args = parser.parse_args()

    rank = init_distributed()
    dims = ParallelDims(dp_replicate=1, dp_shard=-1, tp=1, world_size=dist.get_world_size())
    mesh = build_mesh(dims)

    # Data: render the bundled conversations (assistant tokens labelled), keep those that fit a row.
    chat = ChatFormat(Tokenizer.default())
    samples = [chat.render(c) for c in read_conversations([bundled_example("sft.jsonl")])]
    samples = [s for s in samples if len(s) <= args.seq_len and s.trained_tokens > 0]
    loader = PackedLoader(
        TokenizedDataset.from_samples(samples),
        seq_len=args.seq_len,
        global_batch=2 * dims.dp_size,
        micro_batch=1,
        dp_rank=mesh.dp_rank,
        dp_size=dims.dp_size,
        seed=0,
        pad_id=chat.tokenizer.pad_id,
    )

    # Model: the same initial weights on every rank, then sharded.
    torch.manual_seed(0)
    model = apply_fsdp(Llama(LlamaConfig.preset(args.preset)), mesh.fsdp)
    optim_config = OptimConfig(lr=2e-3, warmup_steps=3)
    optimizer = build_optimizer(model, optim_config)
    scheduler = build_scheduler(optimizer, optim_config, total_steps=args.steps)

    for step in range(1, args.steps + 1):
        batch = loader.next_batch()
        step_loss = torch.zeros(())
        for micro in batch.micro_batches:
            logprobs = model(micro.tokens, micro.packing, labels=micro.labels)
            loss = sft_loss(logprobs, batch.global_labelled_tokens)  # this rank's sum / the global count
            loss.backward()  # apply_fsdp sums gradients over the ranks (divide factor 1)
            step_loss += loss.detach()
        dist.all_reduce(step_loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if rank == 0:
            print(f"step {step} loss {step_loss.item():.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
