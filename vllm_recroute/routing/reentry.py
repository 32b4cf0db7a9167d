"""Re-entry update of returning visual tokens (``reentry: mean_update``), training-free.

A token deferred over a stage keeps its stage-entry state; when it is selected again it
re-enters with a state the layers it skipped never updated. This option adds to it the
mean residual update that the request's *active* visual tokens received over each stage
it skipped: the update of stage k-1 is the mean over that stage's active visual tokens of
(state at stage k's entry - state at stage k-1's entry). Deferred tokens accumulate the
updates of every stage they skip and receive them when they return (then start afresh).

One object per request and forward (a routed prompt's visual span is prefilled in one
step, so nothing outlives the forward). Pure torch, on the activations' device; the
engine (worker/step.py) and the reference (reference/oracle.py) make the same calls.
"""

from __future__ import annotations

import torch

from vllm_recroute.routing.settings import RoutingSettings

__all__ = ["Reentry", "reenters", "reentry_flops"]


def reenters(cfg: RoutingSettings) -> bool:
    """Whether a request's returning tokens get the update (reroute with ``mean_update``)."""
    return cfg.reentry == "mean_update" and cfg.mode == "reroute"


class Reentry:
    """The re-entry bookkeeping of one request over one prefill forward."""

    def __init__(self) -> None:
        self._entry_mean: torch.Tensor | None = None  # [d] mean state of the active, at entry
        self._pending: torch.Tensor | None = None  # [V, d] updates owed to deferred tokens
        self._prev: torch.Tensor | None = None  # [V] bool, the previous stage's active set

    def at_stage_start(self, x_visual: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """At a routed stage's first layer, with ``x_visual`` ([V, d], the request's visual
        tokens' states entering it) and the stage's decided ``active`` mask ([V] bool):
        the additive update of each visual token ([V, d], zero but for returners)."""
        has_active = bool(active.any())  # host mask (decisions are made there): no sync
        active = active.to(x_visual.device)
        update = torch.zeros_like(x_visual)
        if self._prev is not None and self._entry_mean is not None:
            delta = x_visual[self._prev].float().mean(0) - self._entry_mean
            if self._pending is None:
                self._pending = torch.zeros_like(x_visual, dtype=torch.float32)
            self._pending[~self._prev] += delta
            back = active & ~self._prev
            update[back] = self._pending[back].to(x_visual.dtype)
            self._pending[active] = 0.0
        new = x_visual + update
        self._entry_mean = new[active].float().mean(0) if has_active else None
        self._prev = active
        return update


def reentry_flops(num_visual: int, hidden_size: int, num_stages: int) -> int:
    """Extra FLOPs of the update over one request's prefill, counted in the ledger so that
    rows stay budget-matched: per stage, two means over at most ``num_visual`` states and
    the accumulation and addition of the owed updates (an upper bound: every token)."""
    return 4 * num_visual * hidden_size * max(0, num_stages)
