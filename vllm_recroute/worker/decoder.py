"""The routed decoder: installs routing on a vLLM decoder stack, one per routed model.

Generic over decoder layers with the usual vLLM signature
``layer(positions, hidden_states, residual) -> (hidden_states, residual)``. Each layer's
``forward`` is wrapped on the instance (patch record P3; module names, and so weight
loading, are untouched). A forward pre-hook on the model builds the step's `StepRouter`
(worker/step.py: the routing decision) before the decoder stack runs; on the routed path
the wrapper of each segment's first layer hands the segment to the router
(``StepRouter.run_layer``: score, park, the segment's compacted attention, its layers as
one piece on the active rows, gathered once and scattered back once); the wrappers of its
later layers pass the stream on. Deferred rows carry their (hidden, residual) pair.

Compilation. The text model compiles as in plain vLLM (its ``@support_torch_compile``);
Dynamo traces the wrappers as the plain layers (``torch.compiler.is_compiling()``), so
the graph holds no routing. A step whose routing moves rows (a routed prefill) bypasses
that graph (``forward_context.skip_compiled``, vLLM's own bypass) and runs the routed
path, each segment's layers one compiled piece (``self.runs``, worker/layer_runs.py;
``prefill_path: compiled``) or eager on vLLM's kernels (``prefill_path: eager``, or
``enforce_eager``); every other step, pure decode of routed requests included, is the
ordinary compiled one: their compacted per-stage attention is installed in the forward
context before it, where vLLM's attention op reads it at run time.

A pure-decode step where the parked tier re-routes (every ``reroute_every``-th output)
is compiled too: for that forward only, the decoder hooks vLLM's attention op of each
stage-start layer where a request is due (``vllm_view.hook_attention_query``, patch P15:
the op runs outside the compiled graph and receives the layer's post-RoPE query); the
hook takes the due rows' q (one small copy to the host) and lets the parked tier score
and swap the stage's units in its pages for layers [start, end) (``StepRouter.
reroute_from_query``), then attention runs. The hooks are removed after the forward, a
raising one included. ``reroute_path: eager`` (or an attention op that cannot be hooked,
with a warning at startup) re-routes on the routed path instead, as a routed prefill's
step (with one in it) always does.

The decoder only installs: the layer wrappers, the stage-spec reports (kv_release, patch
P4), the CustomOp switch, the forward hooks and the attention hooks of a re-routing
decode. The worker's routing state and the connector's worker API are the runtime's
(worker/runtime.py, ``self.runtime``); each forward's routing is a `StepRouter` over it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch

from vllm_recroute import vllm_view
from vllm_recroute.config import RoutingConfig
from vllm_recroute.engine_setup import check_routing_requirements
from vllm_recroute.patches import apply_patches
from vllm_recroute.routing import router_points
from vllm_recroute.worker.layer_runs import LayerRuns
from vllm_recroute.worker.runtime import LayerCost, WorkerRuntime
from vllm_recroute.worker.step import StepRouter

__all__ = ["RoutedDecoder"]

logger = logging.getLogger("vllm_recroute")


class RoutedDecoder:
    """Routing on a vLLM decoder stack (``text_model.layers``)."""

    def __init__(
        self,
        model: torch.nn.Module,
        text_model: Any,
        vllm_config: Any,
        image_token_id: int,
        run_breaks: Iterable[int] = (),
    ) -> None:
        """``run_breaks``: layers before which the model changes the stream outside its
        layers (Qwen3-VL's deepstack adds after each of its first layers): the routed path
        never runs one piece across them."""
        apply_patches()
        config = check_routing_requirements(vllm_config)
        self.layers = list(text_model.layers)
        names = [layer.self_attn.attn.layer_name for layer in self.layers]
        stages = self._report_stage_specs(config, names) if config.kv_release else {}
        cost = LayerCost.of(self.layers[0], vllm_config)
        self.runtime = WorkerRuntime(config, self.layers, names, cost, image_token_id, stages)
        self._step: StepRouter | None = None
        # a re-routing decode step stays compiled: its swaps run in the attention op
        self.reroute_in_attention = self._attention_hookable(config)
        self._unhooks: list[Callable[[], None]] = []  # this forward's attention hooks
        self._hooked: dict[int, bool] = {}  # hooked layer -> fired in this forward
        # forwards by path: "eager" (rows move), "installed" (compacted attention installed,
        # then the ordinary forward), "plain" (no routing); read by tests and bench
        self.forwards: Counter[str] = Counter()
        # of those, the forwards where the parked tier re-routes a decode: "installed" (the
        # compiled step, swaps in the attention op), "eager" (a pure-decode step run eager:
        # the fallback), "with_prefill" (beside a routed prefill: eager anyway); "hooks":
        # stage-start attention ops that re-routed (tests, bench)
        self.reroute_forwards: Counter[str] = Counter()
        # Under inductor vLLM's CustomOps (norms, activation, rotary) run their native
        # PyTorch forward, for the graph to fuse; the eager routed forward switches them to
        # the kernels vLLM itself runs in eager mode (patch P3), and back afterwards.
        self._native_ops = vllm_view.native_custom_ops(text_model)
        self._kernels_on = False  # this forward switched them (the eager routed path)
        # the routed path runs each segment's layers as one piece: compiled where vLLM
        # compiles the text model (prefill_path: compiled; their CustomOps stay native, as
        # in vLLM's graph), else the layers' own forwards in a loop
        compiler = vllm_view.piece_compiler(vllm_config)
        self.runs = LayerRuns(
            [layer.forward for layer in self.layers],
            compiler if config.prefill_path == "compiled" else None,
            run_breaks,
        )
        # gathers / scatters / materializations of the routed path, over all forwards
        self.row_moves: Counter[str] = Counter()
        for idx, layer in enumerate(self.layers):
            layer.forward = self._wrap(idx, layer, layer.forward)
        self._install_hooks(model)
        self._keep_kv_rows_on_load(model)

    # -- setup ----------------------------------------------------------------------------

    def _report_stage_specs(self, config: RoutingConfig, names: list[str]) -> dict[str, int]:
        """kv_release: each layer reports its routing stage in its KV-cache spec, so vLLM
        gives every stage its own group(s) and RoutedStageManager (kv/spec.py; patch P4).
        Returns each layer's stage (the runtime checks vLLM's groups against it)."""
        from vllm_recroute.kv.spec import stage_spec_from

        points = router_points(config, len(self.layers))
        stage_of_layer = {}
        for idx, layer in enumerate(self.layers):
            stage = sum(1 for p in points if p <= idx)
            stage_of_layer[names[idx]] = stage
            attn = layer.self_attn.attn
            inner = attn.get_kv_cache_spec

            def get_kv_cache_spec(vllm_config, _inner=inner, _stage=stage):
                spec = _inner(vllm_config)
                return None if spec is None else stage_spec_from(spec, _stage)

            attn.get_kv_cache_spec = get_kv_cache_spec
        return stage_of_layer

    def _attention_hookable(self, config: RoutingConfig) -> bool:
        """Whether decode re-routes run in the attention op (``reroute_path: compiled``)
        on this model: every layer's op must show its query (else eager, warned once)."""
        if config.parked_bytes == 0 or config.reroute_path != "compiled":
            return False
        for layer in self.layers:
            ok, why = vllm_view.attention_query_hookable(layer.self_attn.attn)
            if not ok:
                logger.warning("vllm-recroute: decode re-routes run eager (%s)", why)
                return False
        return True

    def _keep_kv_rows_on_load(self, model: torch.nn.Module) -> None:
        """Right after the model's own ``load_weights`` (vLLM's loader calls it before its
        post-load processing, which drops the fused qkv weight on CPU): the runtime keeps
        each layer's K/V weight rows, so routing projects keys without queries
        (worker/projections.py). A model loaded without it (dummy weights) projects through
        the fused layer."""
        inner = model.load_weights

        def load_weights(*args: Any, **kwargs: Any) -> Any:
            loaded = inner(*args, **kwargs)
            kept = self.runtime.proj.keep_kv_rows()
            logger.debug("vllm-recroute: K/V weight rows kept for %d layers", kept)
            return loaded

        model.load_weights = load_weights

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
            return
        path = "eager" if step.needs_eager else "installed"
        self.forwards[path] += 1
        if step.tier.due:
            self.reroute_forwards["with_prefill" if step.prefills else path] += 1
        if step.needs_eager:
            vllm_view.run_eager_this_forward()
            self._kernels_on = not self.runs.compiled and bool(self._native_ops)
            if self._kernels_on:
                vllm_view.use_forwards(self._native_ops, kernels=True)
        else:
            step.install_all()
            self._hook_reroutes(step)

    def _after_forward(self, _module: Any, _args: Any, output: Any) -> None:
        """``output`` is None when the forward raised (``always_call``)."""
        if self._kernels_on:
            vllm_view.use_forwards(self._native_ops, kernels=False)
            self._kernels_on = False
        if self._step is not None and output is not None:
            self.row_moves.update(self._step.moves)
        self._unhook_reroutes(finished=output is not None)
        self._step = None  # never seen by another forward

    def _hook_reroutes(self, step: StepRouter) -> None:
        """For this forward only: the attention op of each stage-start layer where a
        request re-routes calls the step tier's ``reroute_from_query`` with its query, once."""
        for idx in step.reroute_layers():
            self._hooked[idx] = False

            def on_query(query: torch.Tensor, _idx: int = idx) -> None:
                if self._hooked.get(_idx) is not False:
                    return  # once per forward (and never after the forward)
                self._hooked[_idx] = True
                self.reroute_forwards["hooks"] += 1
                step.tier.reroute_from_query(_idx, query)

            attn = self.layers[idx].self_attn.attn
            self._unhooks.append(vllm_view.hook_attention_query(attn, on_query))

    def _unhook_reroutes(self, finished: bool) -> None:
        for remove in self._unhooks:
            remove()
        missed = sorted(idx for idx, fired in self._hooked.items() if not fired)
        self._unhooks, self._hooked = [], {}
        if finished and missed:
            # the op never showed the query (a backend that bypasses it): those re-routes
            # did not happen; from now on they run on the eager path
            logger.warning(
                "vllm-recroute: attention of layers %s was not hooked; decode re-routes "
                "run eager from now on",
                missed,
            )
            self.reroute_in_attention = False

    def _wrap(self, idx: int, layer: Any, inner: Any) -> Any:
        def forward(positions, hidden_states, residual, *args, **kwargs):
            step = self._step
            if step is None or not step.needs_eager or torch.compiler.is_compiling():
                # plain layer: no routing, or attention installed before the forward,
                # or Dynamo tracing the compiled graph (which must not contain routing)
                return inner(positions, hidden_states, residual, *args, **kwargs)
            return step.run_layer(idx, layer, positions, hidden_states, residual, *args, **kwargs)

        return forward

    def _begin_step(self, num_rows: int) -> StepRouter | None:
        step = vllm_view.current_step()
        if step is None:
            return None  # dummy/profiling run: plain model
        return StepRouter.start(
            self.runtime, step.runner, num_rows, self.reroute_in_attention, self.runs
        )
