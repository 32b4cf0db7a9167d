"""worker/projections.py: keys and K/V projected from a layer's kept K/V weight rows equal
the fused layer's (queries never computed), through vLLM's own RoPE (a key rotated with
a stand-in query is the key the fused call rotates), with a bias and Qwen3's per-head
norms; the rows survive vLLM's CPU dispatch dropping the fused weight; a quantized
layer or a dropped weight without kept rows projects through the fused layer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import vllm_recroute.worker.projections as projections
from vllm_recroute.worker.projections import Projections, project_qkv

HEADS, KV_HEADS, DIM, HIDDEN, T = 6, 2, 16, 48, 9


class FusedQKV(torch.nn.Linear):
    """vLLM's QKVParallelLinear as routing sees it: ``(out, None)``, an unquantized
    method, its weight (and bias)."""

    def __init__(self, weight, bias=None, quantized: bool = False) -> None:
        from vllm.model_executor.layers.linear import UnquantizedLinearMethod

        super().__init__(weight.shape[1], weight.shape[0], bias=bias is not None)
        self.quant_method = object() if quantized else UnquantizedLinearMethod()
        with torch.no_grad():
            self.weight.copy_(weight)
            if bias is not None:
                self.bias.copy_(bias)
        self.packed = (self.weight.detach().clone(), None if bias is None else bias.clone())

    def forward(self, x):  # after a drop, as vLLM's packed kernel: from its own copy
        w, b = self.packed
        return torch.nn.functional.linear(x, w, b), None

    def drop_weight(self) -> None:
        """What vLLM's CPU gemm dispatch does after packing (remove_weight=True)."""
        self.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)


def _rope():
    """vLLM's rotary embedding, its CPU kernel (a CustomOp picks its forward when built,
    under a config)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        return get_rope(DIM, max_position=64, is_neox_style=True, rope_parameters=None)


def make_layer(seed: int, bias: bool = False, qk_norm: bool = False, quantized: bool = False):
    g = torch.Generator().manual_seed(seed)
    out = (HEADS + 2 * KV_HEADS) * DIM
    weight = torch.randn(out, HIDDEN, generator=g) * 0.2
    b = torch.randn(out, generator=g) if bias else None
    norm = None
    if qk_norm:
        scale = torch.rand(DIM, generator=g) + 0.5

        def norm(t):
            return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * scale

    attn = SimpleNamespace(
        qkv_proj=FusedQKV(weight, b, quantized),
        rotary_emb=_rope(),
        q_norm=norm,
        k_norm=norm,
        q_size=HEADS * DIM,
        kv_size=KV_HEADS * DIM,
        head_dim=DIM,
        scaling=DIM**-0.5,
    )
    return SimpleNamespace(self_attn=attn, input_layernorm=lambda x: x * 0.5)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.arange(3, 3 + T), torch.randn(T, HIDDEN, generator=g)


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    real = projections.project_qkv

    def counting(layer, positions, x):
        calls.append(int(x.shape[0]))
        return real(layer, positions, x)

    monkeypatch.setattr(projections, "project_qkv", counting)
    return calls


@pytest.mark.parametrize(("bias", "qk_norm"), [(False, False), (True, False), (False, True)])
@torch.no_grad()
def test_keys_and_values_from_kept_rows_equal_the_fused_layer(bias, qk_norm, fused_calls):
    layer = make_layer(0, bias, qk_norm)
    positions, x = _inputs()
    _, k_ref, v_ref, _ = project_qkv(layer, positions, x)
    proj = Projections([layer])
    assert proj.keep_kv_rows() == 1
    keys = proj.keys(0, positions, x)
    k, v = proj.key_values(0, positions, x)
    assert fused_calls == []  # no query projected
    assert keys.shape == k.shape == v.shape == (T, KV_HEADS, DIM)
    torch.testing.assert_close(keys, k_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)
    # the guard: RoPE really rotated them (positions matter)
    assert not torch.allclose(proj.keys(0, positions + 7, x), keys, atol=1e-3)


@torch.no_grad()
def test_rope_of_a_key_with_a_stand_in_query_is_the_fused_calls_rotation():
    """Bit-exact: vLLM's rotary treats the key the same with any query beside it."""
    rope = _rope()
    positions = torch.arange(T)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(T, HEADS * DIM, generator=g)
    k = torch.randn(T, KV_HEADS * DIM, generator=g)
    _, with_q = rope(positions, q.clone(), k.clone())
    _, alone = rope(positions, k.new_zeros(T, DIM), k.clone())
    assert torch.equal(with_q, alone) and not torch.equal(alone, k)


@torch.no_grad()
def test_kept_rows_survive_the_cpu_dispatch_dropping_the_fused_weight(fused_calls):
    layer = make_layer(3)
    positions, x = _inputs()
    want = project_qkv(layer, positions, x)[1:3]
    proj = Projections([layer])
    proj.keep_kv_rows()  # at load: the CPU copy of the rows
    layer.self_attn.qkv_proj.drop_weight()
    k, v = proj.key_values(0, positions, x)
    assert fused_calls == []
    torch.testing.assert_close((k, v), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("why", ["quantized", "dropped before kept"])
@torch.no_grad()
def test_without_plain_rows_the_fused_layer_projects(why, fused_calls):
    layer = make_layer(4, quantized=why == "quantized")
    positions, x = _inputs()
    want = project_qkv(layer, positions, x)[1:3]
    fused_calls.clear()
    if why != "quantized":
        layer.self_attn.qkv_proj.drop_weight()
    proj = Projections([layer])
    assert proj.keep_kv_rows() == 0
    k, v = proj.key_values(0, positions, x)
    assert fused_calls == [T]  # the fallback, counted
    assert torch.equal(k, want[0]) and torch.equal(v, want[1])
