"""What the model takes besides token ids: where packed samples start and end, and the label value that
marks an untrained position."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
"""Label value of a token that is not trained on (torch's cross-entropy ignore_index)."""


@dataclass(frozen=True)
class Packing:
    """The packing metadata of a batch of rows, handed to the model as one object.

    Attributes:
        position_ids: [rows, seq] int64, restarting at 0 at each packed sample.
        cu_seqlens: [samples + 1] int32 offsets of the samples into the flattened rows * seq tokens.
        max_seqlen: the longest sample (fused attention kernels use it).
    """

    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
