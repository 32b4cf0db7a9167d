"""The one place that projects residual-stream rows through a decoder layer's attention
input path (input norm -> projection -> RoPE), as the layer itself would. Used for routing
scores (`step.py`), the parked tier's digests and restores (`parking.py`, `stage_pages.py`).

Most of what routing projects is keys (every visual token's, for scores and digests) or
keys and values (a restored unit's, at every layer of its stage); the queries of the
fused ``qkv_proj`` are 3/5 of its output for SmolVLM's 9:3 heads and were discarded. So
each layer's K and V weight rows are kept (``KVRows``) and keys / values are projected
alone: a fifth / two fifths of the fused GEMM (measured on this machine's CPU, float32,
576 -> 960 vs 384 vs 192 outputs: 3.9 / 1.7 / 0.8 ms at 256 rows). Queries are projected
only for the rows that need one (a scorer's query tokens), through the fused layer.

Where the weight rows come from: on a GPU vLLM keeps ``qkv_proj.weight``, and the rows
are views of it (no memory). vLLM's CPU gemm dispatch drops the weight after packing it
for oneDNN (``process_weights_after_loading``), so the routed decoder calls
``keep_kv_rows`` when the weights are loaded, before that, and the rows are copied (K/V
of every layer: ``2 * kv_size * hidden`` values each). A layer without plain rows (a
quantized one, a dummy-loaded CPU model) projects through the fused layer, as before:
same values, more work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vllm_recroute import vllm_view

__all__ = ["KVRows", "Projections", "project_qkv"]


@dataclass(frozen=True, eq=False)
class KVRows:
    """One layer's K and V weight rows ``[2 * kv_size, hidden]`` (and bias) of its fused
    ``qkv_proj``, this rank's shard under TP."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def of_layer(cls, layer: Any, copy: bool) -> KVRows | None:
        attn = layer.self_attn
        rows = vllm_view.fused_kv_rows(attn.qkv_proj, attn.q_size)
        if rows is None:
            return None
        weight, bias = rows
        if copy:  # the fused weight is about to be dropped (CPU): keep only these rows
            weight = weight.clone()
            bias = None if bias is None else bias.clone()
        return cls(weight, bias)

    def project(self, normed: torch.Tensor, kv_size: int, values: bool) -> torch.Tensor:
        """``normed @ W_k^T`` (and ``W_v``): ``[n, kv_size]`` or ``[n, 2 * kv_size]``."""
        n = 2 * kv_size if values else kv_size
        bias = None if self.bias is None else self.bias[:n]
        return torch.nn.functional.linear(normed, self.weight[:n], bias)


def project_qkv(layer: Any, positions: torch.Tensor, x: torch.Tensor):
    """Post-RoPE q ``[n, heads, dim]``, k and v ``[n, kv_heads, dim]`` and the attention
    scale the layer would compute for rows ``x`` at ``positions`` (the fused layer)."""
    attn = layer.self_attn
    normed = layer.input_layernorm(x)
    qkv, _ = attn.qkv_proj(normed)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    n, d = x.shape[0], attn.head_dim  # explicit head counts: n may be 0
    q, k = _head_norms(attn, q, k, n)
    q, k = attn.rotary_emb(positions, q.contiguous(), k.contiguous())
    return (
        q.reshape(n, attn.q_size // d, d),
        k.reshape(n, attn.kv_size // d, d),
        v.reshape(n, attn.kv_size // d, d),
        float(attn.scaling),
    )


def _head_norms(attn: Any, q: torch.Tensor | None, k: torch.Tensor, n: int):
    """Qwen3 (Keye-VL, Qwen3-VL): per-head RMSNorm of q and k before RoPE, as
    Qwen3Attention.forward does."""
    if getattr(attn, "q_norm", None) is None:
        return q, k
    d = attn.head_dim
    if q is not None:
        q = attn.q_norm(q.reshape(n, attn.q_size // d, d)).reshape(n, attn.q_size)
    k = attn.k_norm(k.reshape(n, attn.kv_size // d, d)).reshape(n, attn.kv_size)
    return q, k


class Projections:
    """The attention input path of a decoder stack's layers, by layer index; the owner of
    their kept K/V weight rows (``keep_kv_rows``)."""

    def __init__(self, layers: Sequence[Any]) -> None:
        self.layers = list(layers)
        self._rows: dict[int, KVRows | None] = {}

    def keep_kv_rows(self) -> int:
        """Called once the weights are loaded, before vLLM's post-load processing (which
        drops the fused weight on CPU). Returns the layers with rows kept."""
        for idx, layer in enumerate(self.layers):
            weight = getattr(layer.self_attn.qkv_proj, "weight", None)
            copy = weight is not None and weight.device.type == "cpu"
            self._rows[idx] = KVRows.of_layer(layer, copy)
        return sum(rows is not None for rows in self._rows.values())

    def kv_rows(self, idx: int) -> KVRows | None:
        """Layer ``idx``'s rows; where ``keep_kv_rows`` did not run (a GPU host loading
        another way), views of the live weight, looked up once."""
        if idx not in self._rows:
            self._rows[idx] = KVRows.of_layer(self.layers[idx], copy=False)
        return self._rows[idx]

    def qkv(self, idx: int, positions: torch.Tensor, x: torch.Tensor):
        """As ``project_qkv`` for layer ``idx``."""
        return project_qkv(self.layers[idx], positions, x)

    def scale(self, idx: int) -> float:
        return float(self.layers[idx].self_attn.scaling)

    def keys(self, idx: int, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Post-RoPE keys ``[n, kv_heads, dim]`` the layer would cache for rows ``x``."""
        return self._kv(idx, positions, x, values=False)[0]

    def key_values(self, idx: int, positions: torch.Tensor, x: torch.Tensor):
        """Post-RoPE K and V ``[n, kv_heads, dim]`` the layer would cache for rows ``x``."""
        k, v = self._kv(idx, positions, x, values=True)
        assert v is not None
        return k, v

    def _kv(self, idx: int, positions, x, values: bool):
        rows = self.kv_rows(idx)
        if rows is None:  # no plain rows: the fused layer, its queries discarded
            _, k, v, _ = self.qkv(idx, positions, x)
            return k, v
        layer = self.layers[idx]
        attn = layer.self_attn
        n, d = x.shape[0], attn.head_dim
        out = rows.project(layer.input_layernorm(x), attn.kv_size, values)
        k = out[:, : attn.kv_size]
        _, k = _head_norms(attn, None, k, n)
        # every rotary embedding takes a query (M-RoPE requires a key too): one zero
        # head of query per row, the least RoPE can be given
        _, k = attn.rotary_emb(positions, k.new_zeros(n, d), k.contiguous())
        k = k.reshape(n, attn.kv_size // d, d)
        v = out[:, attn.kv_size :].reshape(n, attn.kv_size // d, d) if values else None
        return k, v
