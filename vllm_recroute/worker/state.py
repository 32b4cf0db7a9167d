"""Per-request routing state of one routed decoder (worker side, no vLLM import).

`RouteStore` owns the state and its lifecycle; other modules change it only through its
methods. Accounting lives in `metrics/accounting.Ledger`, released rows in
`kv/table_view.ReleasedRows`, worker -> scheduler reports in `DeferredOutbox`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from vllm_recroute.routing import Stage

__all__ = ["DeferredOutbox", "RouteState", "RouteStore"]


@dataclass(frozen=True)
class RouteState:
    """What a routed request must remember between steps (worker side)."""

    stages: tuple[Stage, ...]
    deferred: tuple[int, ...]  # per stage: this request's tokens absent from the stage's KV
    reroute_every: int = 0  # parked tier: decode steps between re-routings (0 = never)


class RouteStore:
    """Routing state by request id, forgotten when vLLM says a request finished or was
    preempted.

    With ``hold_finished`` (later-turn restore), a finished request's state is *held* until
    ``release_held`` (after the step's turn jobs ran), so a save job still finds it.
    """

    def __init__(self, hold_finished: bool = False) -> None:
        self._states: dict[str, RouteState] = {}
        self._held: set[str] | None = set() if hold_finished else None
        self._reroute_now: set[str] = set()
        self._forget_hooks: list[Callable[[set[str]], None]] = []

    def get(self, req_id: str) -> RouteState | None:
        return self._states.get(req_id)

    def put(self, req_id: str, state: RouteState) -> None:
        if self._held is not None:
            self._held.discard(req_id)  # a new decision supersedes a pending release
        self._states[req_id] = state

    def __len__(self) -> int:
        return len(self._states)

    def request_ids(self) -> list[str]:
        return sorted(self._states)

    # -- lifecycle ----------------------------------------------------------------------

    def on_forget(self, hook: Callable[[set[str]], None]) -> None:
        """Call ``hook(req_ids)`` whenever requests are forgotten (the parked tier frees
        their pool entries, the decoder their released rows)."""
        self._forget_hooks.append(hook)

    def finish(self, req_ids: Iterable[str]) -> None:
        """vLLM finished these requests: forget them, or hold them for a turn save."""
        gone = set(req_ids)
        if self._held is not None:
            hold = {r for r in gone if r in self._states}
            self._held |= hold
            gone -= hold
        self._forget_now(gone)

    def forget(self, req_ids: Iterable[str]) -> None:
        """Forget now: preempted requests (recomputed from scratch when they run again;
        holding them would let ``release_held`` drop the recomputed decision) and requests
        that start afresh."""
        gone = set(req_ids)
        if self._held is not None:
            self._held -= gone
        self._forget_now(gone)

    def release_held(self) -> None:
        """Forget the held requests now (their turn jobs, if any, have run)."""
        if self._held:
            held, self._held = self._held, set()
            self._forget_now(held)

    def _forget_now(self, gone: set[str]) -> None:
        if not gone:
            return
        self._reroute_now -= gone
        for req_id in gone:
            self._states.pop(req_id, None)
        for hook in self._forget_hooks:
            hook(gone)

    # -- re-route at the next forward (a loaded later turn) -----------------------------

    def request_reroute(self, req_id: str) -> None:
        self._reroute_now.add(req_id)

    def wants_reroute(self, req_id: str) -> bool:
        return req_id in self._reroute_now

    def take_reroutes(self, req_ids: Iterable[str]) -> set[str]:
        """The given requests that asked for a re-route; the request is consumed."""
        taken = self._reroute_now & set(req_ids)
        self._reroute_now -= taken
        return taken


class DeferredOutbox:
    """kv_release: request -> {stage: deferred tokens} decided since the last drain
    (worker -> scheduler, through the connector's worker metadata)."""

    def __init__(self) -> None:
        self._reports: dict[str, dict[int, int]] = {}

    def report(self, req_id: str, per_stage: dict[int, int]) -> None:
        self._reports[req_id] = dict(per_stage)

    def forget(self, req_ids: set[str]) -> None:
        for req_id in req_ids:
            self._reports.pop(req_id, None)

    def drain(self) -> dict[str, dict[int, int]]:
        out, self._reports = self._reports, {}
        return out
