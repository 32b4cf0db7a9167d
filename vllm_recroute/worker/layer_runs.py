"""How the routed path runs a range of decoder layers on one set of rows.

A routed forward runs each segment's layers ``[a, b)`` as one piece over the segment's
active rows (worker/segments.py): either the layers' own forwards in a loop (eager), or
one ``torch.compile``'d callable per range (``prefill_path: compiled``, where vLLM
compiles the text model), with the row dimension dynamic so that another active count
reuses the same code. vLLM's attention is an opaque custom op that reads its metadata
from the forward context at run time (the segment's compacted metadata, installed before
the piece runs), so it sits inside the graph; the norms, rotary and activation run their
native PyTorch forms there, as in vLLM's own compiled graph.
"""

from __future__ import annotations

import logging
import types
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["LayerRuns"]

logger = logging.getLogger("vllm_recroute")

LayerForward = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class LayerRuns:
    """The decoder's layer forwards (unwrapped), run by range; one per routed decoder."""

    def __init__(
        self,
        forwards: list[LayerForward],
        compiler: tuple[str, dict[str, Any]] | None = None,
        breaks: Iterable[int] = (),
    ) -> None:
        self.forwards = forwards
        self.compiler = compiler  # (backend, options); None: eager loops
        # layers before which the model changes the stream outside its layers (Qwen3-VL's
        # deepstack): a piece never runs across one, so each segment ends there
        self.breaks = frozenset(breaks)
        self._compiled: dict[tuple[int, int], Callable[..., Any] | None] = {}
        self.counts: Counter[str] = Counter()  # pieces run, by kind (tests, bench)

    @property
    def compiled(self) -> bool:
        return self.compiler is not None

    def run(self, a: int, b: int, positions, hidden, residual, *args, **kwargs):
        """Layers ``[a, b)`` on these rows; returns their (hidden, residual)."""
        piece = None if self.compiler is None else self._piece(a, b)
        if piece is not None:
            _mark_rows_dynamic(positions, hidden, residual)
            try:
                out = piece(positions, hidden, residual, *args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as e:
                # raised while tracing or compiling, before the graph ran anything (no KV
                # written): this range runs eager from now on, the request goes on
                logger.warning("vllm-recroute: layers [%d, %d) run eager (%s)", a, b, e)
                self._compiled[(a, b)] = None
            else:
                self.counts["compiled"] += 1
                return out
        self.counts["eager"] += 1
        for forward in self.forwards[a:b]:
            hidden, residual = forward(positions, hidden, residual, *args, **kwargs)
        return hidden, residual

    def _piece(self, a: int, b: int) -> Callable[..., Any] | None:
        """The compiled range (None: it failed to compile, eager)."""
        if (a, b) in self._compiled:
            return self._compiled[(a, b)]
        backend, options = self.compiler  # type: ignore[misc]
        fn = _own_code(_layers(tuple(self.forwards[a:b])), f"recroute_layers_{a}_{b}")
        piece = torch.compile(fn, backend=backend, options=options or None, fullgraph=True)
        self._compiled[(a, b)] = piece
        return piece


def _layers(forwards: tuple[LayerForward, ...]) -> Callable[..., Any]:
    def run_layers(positions, hidden, residual, *args, **kwargs):
        for forward in forwards:
            hidden, residual = forward(positions, hidden, residual, *args, **kwargs)
        return hidden, residual

    return run_layers


def _own_code(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``fn`` with a code object of its own. Dynamo keeps compiled entries per code
    object, under one recompile limit (8) for all of them; every range closing over the
    same ``run_layers`` code would share it, and a batch mix with more ranges would fall
    back to eager. Each range gets its own cache instead."""
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _mark_rows_dynamic(positions: torch.Tensor, hidden: torch.Tensor, residual: Any) -> None:
    """The row count differs per step and segment: one graph for all of them (a single
    row, which Dynamo specializes, compiles once more)."""
    torch._dynamo.maybe_mark_dynamic(positions, positions.dim() - 1)
    torch._dynamo.maybe_mark_dynamic(hidden, 0)
    if residual is not None:
        torch._dynamo.maybe_mark_dynamic(residual, 0)
