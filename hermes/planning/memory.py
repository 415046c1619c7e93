"""How much GPU and CPU memory a hermes training step needs: the formulas behind `python -m hermes.plan`.

The planner mirrors what hermes builds (`hermes.parallel.build.build_model`): tensor parallelism with
sequence and loss parallelism, activation checkpointing, then FSDP2 in torchtitan's units (the embedding,
one per transformer block, the final norm with the output head; a tied table stays in the root unit),
AdamW or RMSProp on the sharded parameters, and LoRA. Activation
terms are in `hermes.planning.activations`. Measured on CPU (`hermes.planning.measure`,
benchmarks/memory.py), a step's growth matches the prediction within 2% where activations and the output
head dominate; where FSDP's buffers dominate, gloo's collective temporaries add 2-28%. Sizes are bytes; GiB = 2**30 bytes (an "80 GB" H100 shows
79.6 GiB to nvidia-smi).

Notation: L blocks, d model width, V vocabulary, s = micro_batch * seq_len tokens per micro-batch,
t = tp, W = dp_shard (the FSDP shard group; dp_replicate copies of it make HSDP). Byte widths: m of the
master weights (float32: 4), p of the compute dtype (`param_dtype`; activations are p wide too), r of the
gradient reduce-scatter (`reduce_dtype`).

Parameters. A block has B = d(H + 2KV)hd + H hd d + 3dF + 2d parameters, the root unit R = 2Vd + d (Vd + d
with tied embeddings: the head is the embedding table, counted once); tensor parallelism splits every
matrix t ways (norm weights stay whole), giving B_t and R_t per TP rank, and FSDP shards those W ways.
LoRA of rank k on all seven projections adds k(7d + 2H hd + 2KV hd + 3F) per block (tensor parallelism
splits the base projections, not the adapters).

States per GPU (FSDP shards): master weights m, gradients m (FSDP2 casts the reduced gradient back to the
master dtype), optimizer states 2m (AdamW: exp_avg, exp_avg_sq) or m (RMSProp). Full fine-tuning with
float32 masters and AdamW is 16 bytes per parameter: 405B on 56 GPUs is 16 * 405.9e9 / 56 = 116 GB per GPU
before one activation. LoRA: the frozen base is stored in the compute dtype (p bytes per parameter, no
gradient, no optimizer state); only the adapters have master weights, gradients and states.

FSDP buffers. The head unit (final norm and output head, Vd/t + d) is not resharded after forward
(backward starts there) and is resharded after its backward, which reduce-scatters its gradient at once;
the embedding unit is gathered for its forward and again for its backward, the step's last. A tied table
lives in the root unit instead: gathered through the whole step, its unsharded gradient (which the
embedding's adds into) held from the first head chunk to the root's reduce-scatter at the very end. A
block is gathered in p while it computes; in backward the next block is prefetched (`prefetch` = 2
blocks in flight; with W = 1 FSDP2's all-gather is a no-op and a prefetch allocates nothing). Backward
holds the block's own unsharded gradients, which fill the memory its activations free as backward moves
through it (the planner counts the larger of the two), plus a reduce-scatter input in r (FSDP2 keeps the
previous block's until the next reduce).

Phases. Sharded gradients exist only from each unit's reduce-scatter on (the training loop sets them to None
after every optimizer step; one micro-batch per optimizer step is assumed: FSDP2's no-sync gradient
accumulation would keep every block's unsharded gradient, which is not modelled). The GPU peak is the
largest of:
  head backward:        all blocks' kept activations, the tensors around the blocks, the head's working
                        set; the head unit (or tied root) and the last block gathered (the last block is
                        not resharded after forward), the head's weight gradient once a second chunk runs.
  last block backward:  the other blocks' kept activations; the block's own, its recompute and backward
                        transient (or its gradients, if larger); `prefetch` blocks gathered; the head's
                        sharded gradient (tied: the root gathered and its unsharded gradient); a
                        reduce-scatter input.
  first block backward: as above with one block's activations left and all the other blocks' sharded
                        gradients present (the later phase wins when a block's sharded gradients outweigh
                        its kept activations).
  embedding reduce:     every block's and the head's sharded gradients; the embedding unit (tied: the root)
                        gathered, its unsharded gradients (p) and its reduce-scatter input (r).
  optimizer step:       all sharded gradients; hermes' AdamW runs fused on GPU (no temporaries), its
                        RMSProp foreach (a square-root buffer of the state, m per trained parameter).
Every phase adds the resident parameters and optimizer states and `gpu_overhead` (default 4 GiB: CUDA
context ~0.5 GiB, cuBLAS workspaces, NCCL communicator buffers ~1 GiB, caching-allocator fragmentation).

CPU offload (FSDP2 CPUOffloadPolicy): sharded parameters, gradients and optimizer states live in host RAM
and the optimizer steps there; the GPU keeps the gathered units, unsharded gradients and activations. Host
RAM per node = gpus_per_node x per rank: the offloaded states, the CPU optimizer's temporaries (torch's
foreach AdamW / RMSProp builds a square-root buffer of the second moment: m per trainable parameter) and
`host_overhead` per process (default 4 GiB: Python, torch and CUDA libraries, NCCL host buffers). Without
offload only the per-process overhead is counted. Hugging Face checkpoints are read straight into the
shards, so loading adds nothing; a Meta checkpoint or a fresh initialisation is built whole on every rank
first, which is not counted (it suits small models only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hermes.model.config import LlamaConfig
from hermes.planning.activations import (
    CHECKPOINTING,
    around_block_terms,
    block_terms,
    head_peak,
    lora_inputs,
    lora_outputs,
    persistent_terms,
    total,
)

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
OPTIMIZER_STATES = {"adamw": 2, "rmsprop": 1}
"""Optimizer state tensors per trainable parameter, each of the master dtype."""
GPU_OVERHEAD_GIB = 4.0
HOST_OVERHEAD_GIB = 4.0
GPU_PARTS = ("parameters", "gradients", "optimizer_states", "activations", "fsdp_buffers", "overhead")


@dataclass(frozen=True)
class MemoryPlan:
    """The answer of `plan`: per-GPU and per-node CPU memory, how it splits, and whether it fits.

    `gpu_breakdown` is taken at the peak phase (`peak_phase`) and sums to `gpu_bytes_per_rank`; `gpu_phases`
    gives every phase's total. `cpu_breakdown` is per node and sums to `cpu_bytes_per_node`.
    """

    setup: dict[str, Any]
    parameters: int
    trainable_parameters: int
    gpu_breakdown: dict[str, int]
    gpu_phases: dict[str, int]
    peak_phase: str
    cpu_breakdown: dict[str, int]
    activation_detail: dict[str, int]
    gpu_memory_bytes: int
    node_memory_bytes: int

    @property
    def gpu_bytes_per_rank(self) -> int:
        return self.gpu_phases[self.peak_phase]

    @property
    def cpu_bytes_per_node(self) -> int:
        return sum(self.cpu_breakdown.values())

    @property
    def fits_gpu(self) -> bool:
        return self.gpu_bytes_per_rank <= self.gpu_memory_bytes

    @property
    def fits_cpu(self) -> bool:
        return self.cpu_bytes_per_node <= self.node_memory_bytes

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_cpu

    @property
    def step_increase_bytes(self) -> int:
        """GPU bytes a forward + backward adds on top of the resident parameters, optimizer states and fixed
        overhead: what a measurement after a warm-up step (gradients set to None) sees."""
        resident = sum(self.gpu_breakdown[k] for k in ("parameters", "optimizer_states", "overhead"))
        return max(v for k, v in self.gpu_phases.items() if k != "optimizer step") - resident

    def to_dict(self) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "fits_gpu": self.fits_gpu,
            "fits_cpu": self.fits_cpu,
            "gpu_bytes_per_rank": self.gpu_bytes_per_rank,
            "cpu_bytes_per_node": self.cpu_bytes_per_node,
            "gpu_memory_bytes": self.gpu_memory_bytes,
            "node_memory_bytes": self.node_memory_bytes,
            "peak_phase": self.peak_phase,
            "breakdown": {"gpu_per_rank": self.gpu_breakdown, "cpu_per_node": self.cpu_breakdown},
            "gpu_phases": self.gpu_phases,
            "activations": self.activation_detail,
            "parameters": self.parameters,
            "trainable_parameters": self.trainable_parameters,
            "setup": self.setup,
        }


def block_parameters(c: LlamaConfig) -> int:
    """Parameters of one transformer block (projections, SwiGLU, two norm weights)."""
    hd = c.attention_head_dim
    attention = c.dim * (c.n_heads + 2 * c.n_kv_heads) * hd + c.n_heads * hd * c.dim
    return attention + 3 * c.dim * c.hidden_dim + 2 * c.dim


def vocab_tables(c: LlamaConfig) -> int:
    """[vocab, dim] matrices the model holds: the embedding table and the output head, or one tied table."""
    return 1 if c.tie_word_embeddings else 2


def root_parameters(c: LlamaConfig) -> int:
    """Parameters of FSDP's root unit: embedding table, output head (the same table when tied), final norm."""
    return vocab_tables(c) * c.vocab_size * c.dim + c.dim


def lora_parameters(c: LlamaConfig, rank: int) -> int:
    """Adapter parameters of one block: A [rank, in] and B [out, rank] for each of its seven projections."""
    return rank * (lora_inputs(c) + lora_outputs(c))


def _check_positive(values: dict[str, float]) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or value <= 0:
            raise ValueError(f"{key} must be positive, got {value!r}")


def _check_choices(values: dict[str, tuple[str, tuple[str, ...]]]) -> None:
    for key, (value, accepted) in values.items():
        if value not in accepted:
            raise ValueError(f"{key} = {value!r} is not one of {', '.join(map(repr, accepted))}")


def _check_mesh(
    c: LlamaConfig, name: str, nodes: int, gpus_per_node: int, tp: int, dp_replicate: int
) -> None:
    if gpus_per_node % tp:
        raise ValueError(
            f"tp = {tp} must divide gpus_per_node = {gpus_per_node}: tensor parallelism stays inside a node"
        )
    for what, count in (
        ("query heads", c.n_heads),
        ("key/value heads", c.n_kv_heads),
        ("FFN width", c.hidden_dim),
    ):
        if count % tp:
            good = [
                n
                for n in range(1, gpus_per_node + 1)
                if not (gpus_per_node % n or c.n_heads % n or c.n_kv_heads % n or c.hidden_dim % n)
            ]
            raise ValueError(f"tp = {tp} does not divide the {count} {what} of {name}; use a tp in {good}")
    world = nodes * gpus_per_node
    if world % (dp_replicate * tp):
        raise ValueError(
            f"dp_replicate x tp = {dp_replicate} x {tp} does not divide the {world} ranks ({nodes} nodes x "
            f"{gpus_per_node} GPUs); choose a dp_replicate that divides {world // tp}"
        )


def plan(
    preset: str | LlamaConfig,
    *,
    nodes: int = 1,
    gpus_per_node: int = 8,
    seq_len: int = 8192,
    micro_batch: int = 1,
    tp: int = 1,
    dp_replicate: int = 1,
    param_dtype: str = "bfloat16",
    reduce_dtype: str = "float32",
    master_dtype: str = "float32",
    optimizer: str = "adamw",
    cpu_offload: bool = False,
    activation_checkpointing: str = "full",
    lora: bool = False,
    lora_rank: int = 32,
    lora_dropout: float = 0.05,
    prefetch: int = 2,
    gpu_memory_gib: float = 80.0,
    node_memory_gib: float = 2048.0,
    gpu_overhead_gib: float = GPU_OVERHEAD_GIB,
    host_overhead_gib: float = HOST_OVERHEAD_GIB,
) -> MemoryPlan:
    """Plan the memory of one training step (one micro-batch per rank per optimizer step).

    Args:
        preset: a LlamaConfig preset name ("llama3.1-405b", ...) or a LlamaConfig.
        nodes, gpus_per_node: the machines; world = nodes * gpus_per_node ranks.
        seq_len, micro_batch: each rank's forward holds micro_batch rows of seq_len tokens.
        tp: tensor-parallel degree (inside a node; sequence and loss parallel).
        dp_replicate: HSDP replicas; FSDP shards over world / (tp * dp_replicate) ranks.
        param_dtype, reduce_dtype, master_dtype: compute, gradient-reduction and master-weight dtypes
            ("float32" or "bfloat16").
        optimizer: "adamw" (two states) or "rmsprop" (one).
        cpu_offload: keep sharded parameters, gradients and optimizer states in host RAM.
        activation_checkpointing: "none", "full" or "selective".
        lora: train rank-`lora_rank` adapters on every block projection, the base frozen in param_dtype.
        lora_rank, lora_dropout: the adapters' rank and dropout probability.
        prefetch: blocks gathered at once in backward (the one computing and the ones prefetched).
        gpu_memory_gib, node_memory_gib: capacity of one GPU and of one node's RAM.
        gpu_overhead_gib, host_overhead_gib: fixed costs per GPU (CUDA, NCCL, fragmentation) and per process
            on the host.

    Returns:
        The MemoryPlan.

    Raises:
        ValueError: an unknown preset or choice, a size that is not positive, a seq_len beyond the model's
            context, a tp that does not divide the node or the heads, or a world that dp_replicate x tp does
            not divide. The message names the argument and what would be accepted.
    """
    c = LlamaConfig.preset(preset) if isinstance(preset, str) else preset
    name = preset if isinstance(preset, str) else "the model"
    _check_positive(
        {
            "nodes": nodes,
            "gpus_per_node": gpus_per_node,
            "seq_len": seq_len,
            "micro_batch": micro_batch,
            "tp": tp,
            "dp_replicate": dp_replicate,
            "prefetch": prefetch,
            "gpu_memory_gib": gpu_memory_gib,
            "node_memory_gib": node_memory_gib,
            **({"lora_rank": lora_rank} if lora else {}),
        }
    )
    _check_choices(
        {
            "param_dtype": (param_dtype, tuple(DTYPE_BYTES)),
            "reduce_dtype": (reduce_dtype, tuple(DTYPE_BYTES)),
            "master_dtype": (master_dtype, tuple(DTYPE_BYTES)),
            "optimizer": (optimizer, tuple(OPTIMIZER_STATES)),
            "activation_checkpointing": (activation_checkpointing, CHECKPOINTING),
        }
    )
    if lora and not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    if seq_len > c.max_seq_len:
        raise ValueError(f"seq_len = {seq_len} exceeds the {c.max_seq_len}-token context of {name}")
    _check_mesh(c, name, nodes, gpus_per_node, tp, dp_replicate)
    world = nodes * gpus_per_node
    shards = world // (dp_replicate * tp)
    m, p, r = DTYPE_BYTES[master_dtype], DTYPE_BYTES[param_dtype], DTYPE_BYTES[reduce_dtype]
    L, d, V = c.n_layers, c.dim, c.vocab_size
    tokens = micro_batch * seq_len
    k = lora_rank if lora else 0
    dropout = lora_dropout if lora else 0.0

    # Parameters per rank: TP splits the matrices (norm weights stay whole), FSDP shards the rest.
    block_t = (block_parameters(c) - 2 * d) / tp + 2 * d
    root_t = vocab_tables(c) * V * d / tp + d
    tied = c.tie_word_embeddings
    # Units around the blocks: the head unit (norm + head) and the embedding unit, or one tied root.
    head_unit_t, embedding_unit_t = (0.0, root_t) if tied else (V * d / tp + d, V * d / tp)
    adapter_t = lora_parameters(c, k)  # tensor parallelism splits the base projections, not the adapters
    block_trained = adapter_t if lora else block_t
    root_trained = 0.0 if lora else root_t
    trained = (L * block_trained + root_trained) / shards
    frozen = (L * block_t + root_t) / shards if lora else 0.0
    params, grads = frozen * p + trained * m, trained * m
    states = OPTIMIZER_STATES[optimizer] * trained * m

    # Activations of one micro-batch.
    kept = total(block_terms(c, activation_checkpointing, p, k, dropout), tokens, tp)
    recompute = total(block_terms(c, "none", p, k, dropout), tokens, tp) - kept
    transient = 2 * p * c.hidden_dim * tokens / tp
    around = total(around_block_terms(c, p, lora), tokens, tp)
    persistent = total(persistent_terms(c), tokens, tp)
    in_block = kept + recompute + transient

    # FSDP buffers.
    block_gathered = (block_t + adapter_t) * p
    in_flight = prefetch if shards > 1 else 1
    head_grad = V * d / tp * p if not lora else 0.0
    head, head_grad_at_peak = head_peak(V, tokens, tp, head_grad, float32=p == 4)
    trains_head = 0.0 if lora else 1.0
    # Held through the blocks' backward: a tied root stays gathered with its unsharded gradient; an untied
    # head unit has been reduced (its sharded gradient stays) and resharded.
    around_gathered = root_t * p + head_grad if tied else 0.0
    head_shard_grad = 0.0 if tied else trains_head * head_unit_t / shards * m
    embedding_trained = trains_head * embedding_unit_t
    embedding_shard_grad = embedding_trained / shards * m
    on_gpu = 0.0 if cpu_offload else 1.0

    def block_backward(done: int) -> dict[str, float]:
        """The backward of the block `done` blocks from the end."""
        left = L - 1 - done
        gathered = 1 + (in_flight - 1 if left > 0 else 0)
        own_gradients = max(0.0, block_trained * p - in_block)
        return {
            "gradients": (done * block_trained / shards * m + head_shard_grad) * on_gpu,
            "activations": left * kept + persistent + in_block,
            "fsdp_buffers": around_gathered + gathered * block_gathered + own_gradients + block_trained * r,
        }

    phases = {
        "head backward": {
            "gradients": 0.0,
            "activations": L * kept + around + head,
            "fsdp_buffers": (root_t if tied else head_unit_t) * p + block_gathered + head_grad_at_peak,
        },
        "last block backward": block_backward(0),
        "first block backward": block_backward(L - 1),
        # The embedding unit's (tied: the root's) unsharded gradients are copied into the reduce-scatter
        # input and freed before its sharded gradient lands; its gathered weights are still there.
        "embedding reduce": {
            "gradients": (grads - embedding_shard_grad) * on_gpu,
            "activations": 0.0,
            "fsdp_buffers": embedding_unit_t * p
            + max(embedding_trained * (p + r), embedding_trained * r + embedding_shard_grad),
        },
        # hermes' AdamW is fused on GPU (no temporaries); RMSProp runs foreach: a square-root buffer.
        "optimizer step": {
            "gradients": grads * on_gpu,
            "optimizer_states": (states + (optimizer == "rmsprop") * trained * m) * on_gpu,
            "activations": 0.0,
            "fsdp_buffers": 0.0,
        },
    }
    resident = {
        "parameters": params * on_gpu,
        "optimizer_states": states * on_gpu,
        "overhead": gpu_overhead_gib * GIB,
    }
    breakdowns = {
        phase: {part: round({**resident, **parts}[part]) for part in GPU_PARTS}
        for phase, parts in phases.items()
    }
    gpu_phases = {phase: sum(parts.values()) for phase, parts in breakdowns.items()}
    peak_phase = max(gpu_phases, key=gpu_phases.__getitem__)

    offloaded = {
        "parameters": params,
        "gradients": grads,
        "optimizer_states": states,
        "optimizer_workspace": trained * m,
    }
    cpu_breakdown = {part: round(v * gpus_per_node * cpu_offload) for part, v in offloaded.items()}
    cpu_breakdown["overhead"] = round(host_overhead_gib * GIB * gpus_per_node)

    all_parameters = L * block_parameters(c) + root_parameters(c)
    return MemoryPlan(
        setup={
            "model": name,
            "nodes": nodes,
            "gpus_per_node": gpus_per_node,
            "world": world,
            "dp_replicate": dp_replicate,
            "dp_shard": shards,
            "tp": tp,
            "seq_len": seq_len,
            "micro_batch": micro_batch,
            "param_dtype": param_dtype,
            "reduce_dtype": reduce_dtype,
            "master_dtype": master_dtype,
            "optimizer": optimizer,
            "cpu_offload": cpu_offload,
            "activation_checkpointing": activation_checkpointing,
            "lora": lora,
            "lora_rank": k,
            "lora_dropout": dropout,
            "prefetch": prefetch,
        },
        parameters=all_parameters,
        trainable_parameters=L * lora_parameters(c, k) if lora else all_parameters,
        gpu_breakdown=breakdowns[peak_phase],
        gpu_phases=gpu_phases,
        peak_phase=peak_phase,
        cpu_breakdown=cpu_breakdown,
        activation_detail={
            "kept_per_block": round(kept),
            "kept_all_blocks": round(L * kept),
            "recompute_one_block": round(recompute),
            "backward_transient": round(transient),
            "around_blocks": round(around),
            "head_working_set": round(head),
        },
        gpu_memory_bytes=round(gpu_memory_gib * GIB),
        node_memory_bytes=round(node_memory_gib * GIB),
    )
