"""Tensor parallelism at the worker boundary: one routing decision on every rank.

Under TP each rank holds a shard of the attention heads (``attn.q_size``/``kv_size`` are
local), so a score averaged over heads on one rank is not the model's score, and ranks
that took different top-k would add partial outputs of different tokens in the
row-parallel all-reduce: silently wrong answers. Every head-averaged score (router
scores, parked-unit scores) is therefore averaged over the ranks before any decision.
vLLM gives every rank the same number of query heads (and of KV heads, replicating them
evenly when there are fewer KV heads than ranks), so the mean of the ranks' means is the
mean over all heads. The decision code (routing/) stays pure and never sees a rank.

`DecisionCheck` turns a divergence that slipped through anyway into a clear error: at
every router point of a prefill step the ranks compare a hash of their decisions.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import torch

from vllm_recroute import vllm_view

__all__ = ["DecisionCheck", "RankDivergence", "TPGroup"]


class RankDivergence(RuntimeError):
    pass


class TPGroup:
    """The tensor-parallel group as routing needs it (size 1: every method is identity).

    ``all_reduce_sum`` / ``all_gather`` are injectable so unit tests can run ranks
    in-process.
    """

    def __init__(
        self,
        size: int,
        all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
        all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.size = size
        self._sum = all_reduce_sum or vllm_view.tp_all_reduce_sum
        self._gather = all_gather or vllm_view.tp_all_gather
        # the group's communication device: NCCL reduces and gathers device tensors only,
        # gloo (vLLM's CPU backend) host ones
        self.device = torch.device(device)

    @classmethod
    def current(cls) -> TPGroup:
        size = vllm_view.tensor_parallel_size()
        return cls(size, device=vllm_view.tp_device() if size > 1 else "cpu")

    def mean(self, local_mean: torch.Tensor) -> torch.Tensor:
        """The mean over all heads of a score averaged over this rank's heads, on the
        device the scores came on (reduced on the group's device)."""
        if self.size == 1:
            return local_mean
        t = local_mean.float().contiguous().to(self.device)
        return (self._sum(t) / self.size).to(local_mean.device)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """``[world, *t.shape]`` on ``t``'s device (gathered on the group's device)."""
        if self.size == 1:
            return t.unsqueeze(0)
        return self._gather(t.to(self.device)).to(t.device)


class DecisionCheck:
    """Ranks compare a hash of the active masks they computed at one router point."""

    def __init__(self, group: TPGroup) -> None:
        self.group = group

    @staticmethod
    def digest(masks: Sequence[torch.Tensor]) -> int:
        crc = 0
        for m in masks:
            crc = zlib.crc32(m.to(torch.uint8).cpu().numpy().tobytes(), crc)
        return crc

    def verify(self, layer_idx: int, req_ids: Sequence[str], masks: Sequence[torch.Tensor]):
        if self.group.size == 1 or not masks:
            return
        crc = self.digest(masks)
        # float32 halves of the 32-bit hash: exact, and vLLM's CPU shared-memory all-gather
        # has no int64 kernel. Masks are host tensors (the device rule); the gather runs on
        # the group's device.
        mine = torch.tensor([crc >> 16, crc & 0xFFFF], dtype=torch.float32)
        every = [int(hi) << 16 | int(lo) for hi, lo in self.group.gather(mine).tolist()]
        if len(set(every)) > 1:
            raise RankDivergence(
                f"vllm-recroute: tensor-parallel ranks took different routing decisions at "
                f"router point {layer_idx} for requests {list(req_ids)} (decision hashes "
                f"{every}); refusing to produce wrong tokens. Please report this with the "
                "routing config."
            )
