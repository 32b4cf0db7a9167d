"""The routed decoder: installs routing on a vLLM decoder stack, one per routed model.

Generic over decoder layers with the usual vLLM signature
``layer(positions, hidden_states, residual) -> (hidden_states, residual)``. Each layer's
``forward`` is wrapped on the instance (patch record P3; module names, and so weight
loading, are untouched). A forward pre-hook on the model builds the step's `StepRouter`
(worker/step.py: the routing decision) before the decoder stack runs; before each layer
the wrapper lets the router score and park, then runs the layer on the active rows only,
with the stage's compacted attention (worker/compaction.py). Deferred rows carry their
(hidden, residual) pair unchanged.

Compilation. The text model compiles as in plain vLLM (its ``@support_torch_compile``);
Dynamo traces the wrappers as the plain layers (``torch.compiler.is_compiling()``), so
the graph holds no routing. A step whose routing moves rows (a routed prefill, a decode
re-route by the parked tier) runs the text model eager through the wrappers
(``forward_context.skip_compiled``, vLLM's own bypass); every other step, pure decode of
routed requests included, is the ordinary compiled one: their compacted per-stage
attention is installed in the forward context before it, where vLLM's attention op reads
it at run time.

The decoder owns its worker state (`RouteStore`, `Ledger`, `ReleasedRows`,
`DeferredOutbox`, the parked tier, the turn store). The connector's worker side reaches
it through the runner's model (``vllm_view.decoder_of``) and calls the methods under
"connector API" below; there are no module-level registries.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from vllm_recroute import vllm_view
from vllm_recroute.config import RoutingConfig
from vllm_recroute.kv.table_view import ReleasedRows
from vllm_recroute.metrics.accounting import Ledger
from vllm_recroute.patches import apply_patches
from vllm_recroute.requests.options import decode_reroute_every, routing_for_request
from vllm_recroute.routing import router_points
from vllm_recroute.worker.compaction import LayerGroups
from vllm_recroute.worker.config_hook import check_routing_requirements
from vllm_recroute.worker.parking import PageRow, ParkingTier
from vllm_recroute.worker.state import DeferredOutbox, RouteStore
from vllm_recroute.worker.step import StepRouter
from vllm_recroute.worker.tp import DecisionCheck, TPGroup
from vllm_recroute.worker.turns import TurnStore

__all__ = ["LayerCost", "RoutedDecoder"]


@dataclass(frozen=True)
class LayerCost:
    """Per token and decoder layer: what a deferred token does not spend (estimates)."""

    flops_per_token_layer: int  # 2 x weights of one decoder layer (matmul FLOPs)
    kv_bytes_per_token_layer: int  # K and V of one token in one layer

    @classmethod
    def of(cls, layer: Any, vllm_config: Any) -> LayerCost:
        tp = vllm_config.parallel_config.tensor_parallel_size  # weights are sharded by tp
        params = sum(p.numel() for p in layer.parameters()) * tp
        attn = layer.self_attn
        itemsize = torch.empty((), dtype=vllm_config.model_config.dtype).element_size()
        return cls(2 * params, 2 * attn.kv_size * tp * itemsize)


class RoutedDecoder:
    """Routing on a vLLM decoder stack (``text_model.layers``)."""

    def __init__(
        self, model: torch.nn.Module, text_model: Any, vllm_config: Any, image_token_id: int
    ) -> None:
        apply_patches()
        self.config: RoutingConfig = check_routing_requirements(vllm_config)
        self.image_token_id = int(image_token_id)
        self.layers = list(text_model.layers)
        self.num_layers = len(self.layers)
        self.cost = LayerCost.of(self.layers[0], vllm_config)
        self.kv_release = self.config.kv_release
        self.tp = TPGroup.current()  # head-averaged scores are averaged over ranks
        self.check = DecisionCheck(self.tp)
        self.ledger = Ledger()
        self.released = ReleasedRows()
        self.outbox = DeferredOutbox()
        keep_turns = self.config.turn_cache_bytes > 0
        self.store = RouteStore(hold_finished=keep_turns)
        self.store.on_forget(self.released.forget)
        self.store.on_forget(self.outbox.forget)
        names = [layer.self_attn.attn.layer_name for layer in self.layers]
        self.stage_of_layer: dict[str, int] = {}
        if self.kv_release:
            self._report_stage_specs(names)
        self.groups = LayerGroups(names, self._check_groups)
        self.tier: ParkingTier | None = None
        if self.config.parked_bytes > 0:
            self.tier = ParkingTier(self.config, self.layers, self.tp.mean)
            self.store.on_forget(self._forget_parked)
        self.turns: TurnStore | None = None
        self.runner: Any = None  # the model runner, known from the first step
        if keep_turns:
            assert self.tier is not None  # turn_cache_bytes requires parked_bytes
            self.turns = TurnStore(
                self.tier, self.store, self._page, self.ledger, self._reroute_every_of
            )
        self._step: StepRouter | None = None
        # forwards by path: "eager" (rows move), "installed" (compacted attention installed,
        # then the ordinary forward), "plain" (no routing); read by tests and bench
        self.forwards: Counter[str] = Counter()
        self.layer_names = names
        # Under inductor vLLM's CustomOps (norms, activation, rotary) run their native
        # PyTorch forward, for the graph to fuse; the eager routed forward switches them to
        # the kernels vLLM itself runs in eager mode (patch P3), and back afterwards.
        self._native_ops = vllm_view.native_custom_ops(text_model)
        for idx, layer in enumerate(self.layers):
            layer.forward = self._wrap(idx, names[idx], layer, layer.forward)
        self._install_hooks(model)

    # -- setup ----------------------------------------------------------------------------

    def _report_stage_specs(self, names: list[str]) -> None:
        """kv_release: each layer reports its routing stage in its KV-cache spec, so vLLM
        gives every stage its own group(s) and RoutedStageManager (kv/spec.py; patch P4)."""
        from vllm_recroute.kv.spec import stage_spec_from

        points = router_points(self.config, self.num_layers)
        for idx, layer in enumerate(self.layers):
            stage = sum(1 for p in points if p <= idx)
            self.stage_of_layer[names[idx]] = stage
            attn = layer.self_attn.attn
            inner = attn.get_kv_cache_spec

            def get_kv_cache_spec(vllm_config, _inner=inner, _stage=stage):
                spec = _inner(vllm_config)
                return None if spec is None else stage_spec_from(spec, _stage)

            attn.get_kv_cache_spec = get_kv_cache_spec

    def _check_groups(self, kv_cache_groups: list[Any]) -> None:
        if self.kv_release:
            from vllm_recroute.kv.spec import check_stage_groups

            # A group mixing stages would put compacted and uncompacted KV in one table.
            check_stage_groups(kv_cache_groups, self.stage_of_layer)

    def config_of(self, runner: Any, req_id: str) -> RoutingConfig:
        """A request's effective routing config (server config + its options)."""
        return routing_for_request(
            self.config, vllm_view.request_extra_args(runner, req_id), req_id
        )

    def _reroute_every_of(self, req_id: str) -> int:
        return decode_reroute_every(self.config_of(self.runner, req_id))

    def _page(self, layer_idx: int, block_ids: tuple[tuple[int, ...], ...]) -> PageRow:
        group = self.groups.of_layer(layer_idx)
        return PageRow(torch.tensor(block_ids[group.gid], dtype=torch.long), group.block_size)

    def _forget_parked(self, req_ids: set[str]) -> None:
        assert self.tier is not None
        delta = self.tier.forget(sorted(req_ids))
        if delta:
            self.ledger.record(delta, self.tier.gauges())

    # -- the forward ------------------------------------------------------------------------

    def _install_hooks(self, model: torch.nn.Module) -> None:
        """The runner calls the model (not the text model) with the step's positions; the
        hooks are nn.Module's public API and run outside any compiled region.
        ``always_call``: a forward that raises still puts the CustomOps back on their
        native forms and drops the step, so the next forward starts clean."""
        model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        model.register_forward_hook(self._after_forward, always_call=True)

    def _before_forward(self, _module: Any, args: tuple, kwargs: dict) -> None:
        positions = kwargs["positions"] if "positions" in kwargs else args[1]
        if vllm_view.current_step() is None:
            return  # dummy/profiling run: plain model
        step = self._begin_step(int(positions.shape[-1]))
        self._step = step
        if step is None:
            self.forwards["plain"] += 1
        elif step.needs_eager:
            self.forwards["eager"] += 1
            vllm_view.run_eager_this_forward()
            vllm_view.use_forwards(self._native_ops, kernels=True)
        else:
            self.forwards["installed"] += 1
            step.install_all(self.layer_names)

    def _after_forward(self, *_: Any) -> None:
        if self._step is not None and self._step.needs_eager:
            vllm_view.use_forwards(self._native_ops, kernels=False)
        self._step = None  # never seen by another forward

    def _wrap(self, idx: int, name: str, layer: Any, inner: Any) -> Any:
        def forward(positions, hidden_states, residual, *args, **kwargs):
            step = self._step
            if step is None or not step.needs_eager or torch.compiler.is_compiling():
                # plain layer: no routing, or attention installed before the forward,
                # or Dynamo tracing the compiled graph (which must not contain routing)
                return inner(positions, hidden_states, residual, *args, **kwargs)
            step.score_before(idx, layer, positions, hidden_states, residual)
            seg = step.segment(idx)
            if self.tier is not None and idx in step.stage_starts:
                step.tier_before(idx, positions, hidden_states, residual)
            if seg is None or not seg.slot_mapping:
                return inner(positions, hidden_states, residual, *args, **kwargs)
            gid = self.groups.of_layer(idx).gid
            vllm_view.install_layer_attention(name, seg.attn_metadata[gid], seg.slot_mapping[gid])
            if seg.active_rows is None:
                return inner(positions, hidden_states, residual, *args, **kwargs)
            return step.run_on_rows(inner, seg, positions, hidden_states, residual, *args, **kwargs)

        return forward

    def _begin_step(self, num_rows: int) -> StepRouter | None:
        step = vllm_view.current_step()
        if step is None:
            return None  # dummy/profiling run: plain model
        if not len(self.store) and not vllm_view.has_prompt_rows(step.runner):
            return None  # decode of unrouted requests only: nothing to route or install
        self.runner = step.runner
        self.groups.bind(step.runner)
        router = StepRouter(self, step.runner, num_rows)
        return router if router.active else None

    # -- connector API (connector/worker.py; patch P1 for requests_gone) -------------------

    def requests_gone(self, finished: Iterable[str], preempted: Iterable[str]) -> None:
        """vLLM says these requests finished or were preempted: their state is stale
        (a finished one is held until this step's turn jobs ran)."""
        self.store.finish(finished)
        self.store.forget(preempted)

    def apply_released(self, events: Iterable[Any]) -> None:
        """kv_release: mirror the scheduler's page releases (kv/manager.ReleasedBlocks)."""
        for event in events:
            if self.store.get(event.request_id) is not None:  # else gone meanwhile
                self.released.apply(event.request_id, event.kv_cache_group_id, event.row_indices)

    def apply_turn_jobs(self, evicted: list[int], saves: list[Any], loads: list[Any]) -> set[str]:
        """Later-turn restore: run this step's jobs (kv/turn_index.py); returns the requests
        whose held pages may now be freed."""
        if self.turns is None:
            return set()
        step = vllm_view.current_step()
        if step is not None:
            self.runner = step.runner
            self.groups.bind(step.runner)
        self.turns.apply(evicted, saves, loads)
        return self.turns.take_sent()

    def drain_deferred(self) -> dict[str, dict[int, int]]:
        return self.outbox.drain()

    def drain_stats(self) -> dict[str, Any]:
        return self.ledger.drain()
