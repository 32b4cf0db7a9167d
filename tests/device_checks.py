"""The device-rule checks: the worker's routing pieces on device activations.

Each check runs a real piece of the routed worker (scorers, the block decision, the step
router's scoring / segment rows / gather-scatter, parking, re-routing and restore through
page I/O, kept turns, the TP decision check) on activations and KV caches that live on the
device, with host bookkeeping, and asserts the result equals the all-host computation and
that each tensor is on the side the rule says (docs/architecture.md, "GPU path").

``run_all("fake")`` runs them on this CPU under ``tests.devices.FakeCuda`` (mixes CUDA
refuses raise); ``run_all("cuda")`` on real CUDA tensors (``tools/gpu_check.py --phase
micro`` on a GPU host). Torch only: nothing here imports vLLM.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from vllm_recroute.config import RoutingConfig
from vllm_recroute.kv.parked_pool import ParkedKey
from vllm_recroute.metrics.accounting import Ledger
from vllm_recroute.routing import SCORERS, Stage, get_scorer, query_indices, route_request
from vllm_recroute.routing.scorers import ScoreInputs
from vllm_recroute.vllm_view.kv import GroupInfo
from vllm_recroute.vllm_view.step import StepBatch
from vllm_recroute.worker.compaction import Segment
from vllm_recroute.worker.layer_runs import LayerRuns
from vllm_recroute.worker.parking import ParkingTier
from vllm_recroute.worker.projections import Projections
from vllm_recroute.worker.rows import PrefillRoute, StepRows
from vllm_recroute.worker.runtime import LayerCost, WorkerRuntime
from vllm_recroute.worker.segments import gather, scatter
from vllm_recroute.worker.stage_pages import PageRow, page_io
from vllm_recroute.worker.state import RouteStore
from vllm_recroute.worker.step import StepRouter
from vllm_recroute.worker.tp import DecisionCheck, TPGroup

DEV = torch.device("cuda")
BLOCK = 16


@dataclass(frozen=True)
class LayerShape:
    """The attention-input shapes of a routed architecture's decoder layer."""

    name: str
    heads: int
    kv_heads: int
    dim: int = 32
    hidden: int = 64
    mrope: bool = False  # [3, T] positions (Qwen2.5-VL, Keye-VL)
    qk_norm: bool = False  # per-head q/k RMSNorm before RoPE (Qwen3)


SHAPES = (
    LayerShape("llama-gqa", heads=4, kv_heads=2),  # Idefics3 / SmolVLM, Phi-3-V: fused QKV
    LayerShape("mha", heads=2, kv_heads=2),
    LayerShape("qwen3-mrope", heads=4, kv_heads=2, mrope=True, qk_norm=True),
)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class FlashLikeImpl:
    """Writes like vLLM 0.32's FlashAttention ``do_kv_cache_update``: the per-layer cache is
    ``[blocks, kv_heads, block_size, 2 * dim]``, split into K and V ``[blocks, block_size,
    kv_heads, dim]`` views (``reshape_and_cache_flash`` written out in torch)."""

    def do_kv_cache_update(self, layer, k, v, cache, slots):
        key_cache, value_cache = cache.transpose(1, 2).split(k.shape[-1], -1)
        b = key_cache.shape[1]
        key_cache[slots // b, slots % b] = k
        value_cache[slots // b, slots % b] = v


def flash_cache(num_blocks: int, heads: int, dim: int, device) -> torch.Tensor:
    """FlashAttention's per-layer cache on a GPU host (vLLM's default ``LBNHC`` layout):
    physically ``[blocks, block_size, heads, 2 * dim]``, viewed as ``[blocks, heads,
    block_size, 2 * dim]``: non-contiguous for ``heads > 1`` (tests/kv_layouts.py builds
    it with vLLM's own code)."""
    raw = torch.zeros(num_blocks, BLOCK, heads, 2 * dim, device=device)
    return raw.permute(0, 2, 1, 3)


def _plain_method() -> object:
    """A class named as vLLM's UnquantizedLinearMethod (what vllm_view.fused_kv_rows
    accepts; nothing here imports vLLM): the fakes' fused weight is a plain matrix, so
    routing projects keys and values from its K/V rows, as on a real layer."""
    return type("UnquantizedLinearMethod", (), {})()


class FusedQKV:
    """vLLM's QKVParallelLinear as routing sees it: ``(x @ W^T, None)``, its weight and
    quant method."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight, self.bias, self.quant_method = weight, None, _plain_method()

    def __call__(self, x: torch.Tensor):
        return x @ self.weight.T, None


def fake_layer(shape: LayerShape, seed: int, device, num_blocks: int = 8) -> SimpleNamespace:
    """A decoder layer as the routed worker sees it (vLLM's attribute names)."""
    g = torch.Generator().manual_seed(seed)
    d = shape.dim
    w = torch.randn((shape.heads + 2 * shape.kv_heads) * d, shape.hidden, generator=g) * 0.3
    w = w.to(device)

    def rotary(positions, q, k):
        p = (positions[0] if positions.dim() == 2 else positions).float()[:, None]
        return q * torch.cos(0.01 * p), k * (1.0 + 0.01 * p)

    norm = (lambda t: _rms(t.unflatten(-1, (-1, d))).flatten(-2)) if shape.qk_norm else None
    attn = SimpleNamespace(
        impl=FlashLikeImpl(), kv_cache=flash_cache(num_blocks, shape.kv_heads, d, device)
    )
    self_attn = SimpleNamespace(
        qkv_proj=FusedQKV(w),
        rotary_emb=rotary,
        q_norm=norm,
        k_norm=norm,
        q_size=shape.heads * d,
        kv_size=shape.kv_heads * d,
        head_dim=d,
        num_kv_heads=shape.kv_heads,
        scaling=d**-0.5,
        attn=attn,
    )
    mix = torch.randn(shape.hidden, shape.hidden, generator=g).to(device) * shape.hidden**-0.5

    def forward(positions, hidden, residual):
        """Row-wise, in vLLM's fused-residual form (the stream is hidden + residual)."""
        residual = hidden if residual is None else hidden + residual
        p = (positions[0] if positions.dim() == 2 else positions).float()[:, None]
        return torch.tanh(_rms(residual) @ mix) + 0.01 * p, residual

    return SimpleNamespace(self_attn=self_attn, input_layernorm=_rms, forward=forward)


def _positions(shape: LayerShape, n: int, device) -> torch.Tensor:
    p = torch.arange(n, device=device)
    return torch.stack([p, p, p]) if shape.mrope else p


def _on_host(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


# ------------------------------------------------------------------ the checks


def check_scorers() -> None:
    """Every scorer: device q/k, host indices -> device scores equal to the host ones."""
    for shape in SHAPES:
        g = torch.Generator().manual_seed(1)
        t = 40
        q = torch.randn(t, shape.heads, shape.dim, generator=g)
        k = torch.randn(t, shape.kv_heads, shape.dim, generator=g)
        vis = torch.arange(5, 29, device="cpu")
        for name in SCORERS:
            for query in ("last", "question"):
                qi = query_indices(t, vis, query)
                host = get_scorer(name).score(ScoreInputs(q, k, vis, qi, 0.2))
                dev = get_scorer(name).score(ScoreInputs(q.to(DEV), k.to(DEV), vis, qi, 0.2))
                assert dev.device.type == DEV.type, f"{name}: scores left the device"
                assert torch.allclose(dev.cpu(), host, atol=1e-6), f"{name}/{query} differs"


def check_block_decision() -> None:
    """granularity 'block': device or host scores with host block ids / candidates."""
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(48, generator=g)
    blocks = torch.arange(48, device="cpu") // 5
    prev = torch.rand(48, generator=g) > 0.3
    for mode in ("reroute", "remove"):
        host = route_request(scores, 17, mode, prev, block_ids=blocks)
        dev = route_request(scores.to(DEV), 17, mode, prev, block_ids=blocks)
        assert torch.equal(dev.cpu(), host), mode


def _router(shape: LayerShape, mode: str, parked: bool, granularity: str = "token", device=DEV):
    """A StepRouter over one routed prefill (the step's rows 0..T-1: text, 24 visual
    tokens, text) and a real runtime (its state objects) on fake layers."""
    num_layers, t, vis = 4, 34, torch.arange(4, 28, device="cpu")
    cfg = RoutingConfig(
        mode=mode,
        schedule="custom",
        custom=((1, 0.5), (3, 0.25)),
        granularity=granularity,
        block_size=4,
        parked_bytes=(1 << 20) if parked else 0,
        park_block_tokens=2,
        reroute_every=1 if parked else 0,
    )
    layers = [fake_layer(shape, seed, device) for seed in range(num_layers)]
    names = [f"layer.{i}" for i in range(num_layers)]
    rt = WorkerRuntime(cfg, layers, names, LayerCost(1, 1), image_token_id=0, tp=TPGroup(1))
    rt.groups = SimpleNamespace(of_layer=lambda i: GroupInfo(0, BLOCK, None))
    batch = StepBatch(
        req_ids=("r0",),
        qsl=torch.tensor([0, t], device="cpu"),
        num_computed=torch.zeros(1, dtype=torch.long, device="cpu"),
        prompt_lens=(t + 1,),
        token_ids=torch.zeros(t, dtype=torch.long, device="cpu"),
    )
    stages = (Stage(1, 3, 0.5), Stage(3, 4, 0.25))
    rows = StepRows(batch, prefills=[PrefillRoute("r0", 0, 0, t, vis, stages, cfg)])
    step = StepRouter(rt, None, rows, t, runs=LayerRuns([layer.forward for layer in layers]))
    table = torch.arange(8, device="cpu")  # the request's block table (host, as vLLM's)
    step.tables = step.segs.tables = step.tier.tables = lambda gid: table[None]
    # the fake layers attend to nothing: segments without compacted attention
    step.segs._build = lambda start, end: _unattended_segment(step.segs, start, end)
    return step, layers, cfg


def _unattended_segment(segs, start: int, end: int) -> Segment:
    active, _ = segs.rows(start)
    return Segment(start, end, None if bool(active.all()) else torch.nonzero(active).flatten())


def _activations(shape: LayerShape, t: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, shape.hidden, generator=g)
    residual = torch.randn(t, shape.hidden, generator=g)
    return hidden, residual, _positions(shape, t, "cpu")


def check_step_router() -> None:
    """Scoring at both router points, segment rows and a segment's gather/scatter: masks
    and rows on the host, activations on the device, results equal to the host run."""
    for shape in SHAPES:
        for mode, gran in (("reroute", "token"), ("remove", "block")):
            results = []
            for device in (DEV, "cpu"):
                step, _, _ = _router(shape, mode, False, gran, device)
                hidden, residual, pos = (x.to(device) for x in _activations(shape, 34))
                for layer_idx in (0, 2):
                    step.score_before(layer_idx, pos, hidden, residual)
                route = step.prefills[0]
                assert all(_on_host(m) for m in route.masks), "masks must be host tensors"
                active, offsets = step.segs.rows(1)
                assert _on_host(active) and _on_host(offsets)
                seg = Segment(1, 3, torch.nonzero(active).flatten())
                rows = step.segs.device_rows(seg, hidden.device)
                p, h, r = gather((pos, hidden, residual), rows)
                h, r = scatter((hidden, residual), rows, *_double(p, h, r))
                assert h.device.type == hidden.device.type
                results.append((route.masks, h.cpu(), r.cpu()))
            (m1, h1, r1), (m0, h0, r0) = results
            assert all(torch.equal(a, b) for a, b in zip(m0, m1, strict=True)), shape.name
            assert torch.allclose(h0, h1) and torch.allclose(r0, r1), shape.name


def _double(positions, hidden, residual):
    return hidden * 2 + positions.float().reshape(-1, positions.shape[-1]).sum(0)[:, None], residual


def check_segment_runs() -> None:
    """A routed forward through the step router as vLLM's layer loop drives it: one
    gather and one scatter per segment that moves rows (one host -> device copy of its
    rows), the scoring layer inside segment [1, 3) on the full stream; masks and stream
    equal to the per-layer reference (every layer gathers and scatters), on the host."""
    for shape in SHAPES:
        step, layers, _ = _router(shape, "reroute", False, "token", DEV)
        hidden, _, pos = (x.to(DEV) for x in _activations(shape, 34))
        h, r = hidden, None  # vLLM's first layer takes no residual
        for idx, layer in enumerate(layers):
            h, r = step.run_layer(idx, layer, pos, h, r)
        assert h.device.type == DEV.type and r.device.type == DEV.type
        assert step.moves == {"gather": 2, "scatter": 2, "materialize": 1}, step.moves
        assert step.runs.counts["eager"] == 4  # [0, 1), [1, 2), [2, 3), [3, 4)
        assert sorted(step.segs._device_rows) == [1, 3]  # one copy per segment
        masks, want_h, want_r = _per_layer_reference(shape, hidden.cpu(), pos.cpu())
        route = step.prefills[0]
        assert all(torch.equal(a, b) for a, b in zip(route.masks, masks, strict=True))
        assert torch.allclose(h.cpu(), want_h) and torch.allclose(r.cpu(), want_r), shape.name


def _per_layer_reference(shape: LayerShape, hidden, pos):
    """The routed forward as it ran before segments ran whole: per layer, score on the
    full stream, gather the layer's active rows, run it, scatter them back."""
    step, layers, _ = _router(shape, "reroute", False, "token", "cpu")
    h, r = hidden, None
    for idx, layer in enumerate(layers):
        step.score_before(idx, pos, h, r)
        seg = step.segs.at(idx)
        if seg is None or seg.active_rows is None:
            h, r = layer.forward(pos, h, r)
            continue
        p, hh, rr = gather((pos, h, r), seg.active_rows)
        h, r = scatter((h, r), seg.active_rows, *layer.forward(p, hh, rr))
    return step.prefills[0].masks, h, r


def check_parking() -> None:
    """Park at prefill (digests and stage-entry states to the host pool), swap one parked
    unit in (its K/V projected on the device from its state and written into the device
    cache: bit-exact against the unit's K/V projected directly), then re-route at decode
    (a swap forced by a query aimed at a parked unit) and park the evicted unit's K/V."""
    from vllm_recroute.routing.rerouting import Swap

    for shape in SHAPES:
        step, layers, _ = _router(shape, "reroute", parked=True)
        hidden, residual, pos = (x.to(DEV) for x in _activations(shape, 34))
        step.score_before(0, pos, hidden, residual)
        step.tier.park(step.prefills[0], 0, pos, hidden, residual)
        tier = step.rt.tier
        units = tier.units[("r0", 0)]
        assert len(units.parked) >= 2, "too little parked: the check would be vacuous"
        assert all(_on_host(d) for d in units.digests.values())
        uid, evict = min(units.parked), min(units.active)
        assert _on_host(tier.pool.digest(ParkedKey("r0", 0, uid)))
        pages = [PageRow(torch.arange(8, device="cpu"), BLOCK) for _ in range(1, 3)]
        delta = {"restored_blocks": 0, "parked_blocks": 0, "parked_blocks_dropped": 0}
        tier._swap_all("r0", 0, units, [Swap(evict, uid)], {evict: 0.0, uid: 1.0}, pages, delta)
        assert uid in units.active and evict in units.parked
        _check_restored(tier, units, [uid], layers, step.prefills[0], pos, hidden, residual)
        aim = max(units.parked - {evict})
        digest = tier.pool.digest(ParkedKey("r0", 0, aim))[0]
        group = shape.heads // shape.kv_heads
        q = 50.0 * digest.repeat_interleave(group, dim=0)  # aimed at a parked unit
        delta = tier.reroute("r0", 0, q, shape.dim**-0.5, pages)
        assert delta["restored_blocks"] >= 1, f"{shape.name}: no swap, vacuous"
        assert aim in units.active and aim not in units.parked


def check_reroute_in_attention() -> None:
    """A compiled decode step's re-route (vllm_view.hook_attention_query): the query vLLM's
    attention op receives is on the device; the due row's q crosses to the host in one copy
    and the swap restores into the device cache, bit-exact, as the eager re-route does."""
    for shape in SHAPES:
        step, layers, _ = _router(shape, "reroute", parked=True)
        hidden, residual, pos = (x.to(DEV) for x in _activations(shape, 34))
        step.score_before(0, pos, hidden, residual)
        route = step.prefills[0]
        step.tier.park(route, 0, pos, hidden, residual)
        tier = step.rt.tier
        units = tier.units[("r0", 0)]
        uid, parked = min(units.parked), set(units.parked)
        digest = tier.pool.digest(ParkedKey("r0", 0, uid))[0]
        group = shape.heads // shape.kv_heads
        # the op's query: [tokens, heads, dim] on the device, the request's last row aimed
        query = torch.zeros(34, shape.heads, shape.dim)
        query[33] = 50.0 * digest.repeat_interleave(group, dim=0)
        step.tier.due = {1: [(0, 0, route.stages[0])]}
        restored = step.rt.ledger.totals["restored_blocks"]
        step.tier.reroute_from_query(1, query.to(DEV))
        assert step.rt.ledger.totals["restored_blocks"] > restored, f"{shape.name}: vacuous"
        assert uid in units.active and uid not in units.parked
        # every restored unit, in the order the swap projected them (plan order)
        restored = [u for u in units.active if u in parked]
        _check_restored(tier, units, restored, layers, route, pos, hidden, residual)


def _check_restored(tier, units, uids, layers, route, pos, hidden, residual) -> None:
    """The K/V of the units ``uids`` restored by one swap equal their rows projected
    together, in that order, as the restore does (a projection's bits depend on how many
    rows it multiplies)."""
    mask = route.masks[0]
    deferred = route.visual_rows[~mask]
    # park_prefill numbers the active units first (units of 2 tokens), then the deferred
    first_deferred_uid = (int(mask.sum()) + 1) // 2
    lows = [(uid - first_deferred_uid) * 2 for uid in uids]
    rows = torch.cat([deferred[lo : lo + 2] for lo in lows]).to(hidden.device)
    page = PageRow(torch.arange(8, device="cpu"), BLOCK)
    slots = torch.cat([page.slots(units.active[uid]) for uid in uids])
    for i in (1, 2):
        k, v = Projections(layers).key_values(i, pos[..., rows], hidden[rows] + residual[rows])
        rk, rv = tier.io[i].read(slots, BLOCK)
        assert torch.equal(rk.cpu(), k.cpu()) and torch.equal(rv.cpu(), v.cpu()), "restore"


def check_turns() -> None:
    """A kept turn: saved from the device cache into host memory, loaded back into the
    device cache at another request's pages, values equal."""
    from vllm_recroute.messages import TurnLoad, TurnSave
    from vllm_recroute.worker.turns import TurnStore

    shape = SHAPES[0]
    layers = [fake_layer(shape, seed, DEV) for seed in range(3)]
    cfg = RoutingConfig(mode="reroute", parked_bytes=1 << 20, park_block_tokens=2)
    tier = ParkingTier(cfg, Projections(layers), page_io(layers))
    store = RouteStore(hold_finished=True)

    def pages(layer_idx, block_ids):  # block tables are host tensors
        return PageRow(torch.tensor(block_ids[0], dtype=torch.long, device="cpu"), BLOCK)

    turns = TurnStore(tier.io, store, Ledger(), tier)
    g = torch.Generator().manual_seed(4)
    n = 20
    truth = [(torch.randn(n, 2, 32, generator=g), torch.randn(n, 2, 32, generator=g))] * 3
    src = PageRow(torch.tensor([2, 5], device="cpu"), BLOCK)
    for io, (k, v) in zip(tier.io, truth, strict=True):
        io.write(k, v, src.slots(torch.arange(n, device="cpu")))
    turns.apply([], [TurnSave("t1", 7, n, ((2, 5),))], [], pages, lambda req_id: 1)
    record = turns.records[7]
    assert all(_on_host(t) for kv in record.kv for t in kv), "a kept turn is host memory"
    turns.apply([], [], [TurnLoad("t2", 7, 0, n, ((6, 3),))], pages, lambda req_id: 1)
    dst = PageRow(torch.tensor([6, 3], device="cpu"), BLOCK)
    for io, (k, v) in zip(tier.io, truth, strict=True):
        rk, rv = io.read(dst.slots(torch.arange(n, device="cpu")), BLOCK)
        assert rk.device.type == DEV.type and torch.equal(rk.cpu(), k)
        assert torch.equal(rv.cpu(), v)


def check_tp_decision() -> None:
    """TP: host masks hashed, the gather and the score reduction on the group's device."""
    seen = []

    def gather(t):
        seen.append(t.device.type)
        return torch.stack([t, t])

    def reduce_sum(t):
        seen.append(t.device.type)
        return t * 2

    group = TPGroup(2, all_reduce_sum=reduce_sum, all_gather=gather, device=DEV)
    DecisionCheck(group).verify(3, ["r0"], [torch.rand(9) > 0.5])
    scores = torch.rand(9)
    for s in (scores, scores.to(DEV)):
        out = group.mean(s)
        assert out.device.type == s.device.type and torch.allclose(out.cpu(), scores)
    assert seen == [DEV.type] * 3, seen


CHECKS: dict[str, Callable[[], None]] = {
    "scorers": check_scorers,
    "block_decision": check_block_decision,
    "step_router": check_step_router,
    "segment_runs": check_segment_runs,
    "parking": check_parking,
    "reroute_in_attention": check_reroute_in_attention,
    "turns": check_turns,
    "tp_decision": check_tp_decision,
}


@contextlib.contextmanager
def device_context(device: str) -> Iterator[None]:
    """``fake``: CUDA's rules on this CPU (tests/devices.py); ``cuda``: real tensors."""
    if device == "fake":
        from tests.devices import FakeCuda

        with FakeCuda():
            yield
    elif device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' asked for but torch sees no CUDA device")
        yield
    else:
        raise ValueError(f"device must be 'fake' or 'cuda', got {device!r}")


def run_check(name: str, device: str) -> str:
    """``"ok"`` or the error (type, message, innermost frame) of one check."""
    try:
        with device_context(device), torch.no_grad():
            CHECKS[name]()
        return "ok"
    except Exception as e:  # a report, not a crash: every check runs
        frame = traceback.extract_tb(e.__traceback__)[-1]
        return f"{type(e).__name__}: {e} ({frame.filename}:{frame.lineno})"


def run_all(device: str) -> dict[str, str]:
    return {name: run_check(name, device) for name in CHECKS}
