"""The one place that projects residual-stream rows through a decoder layer's attention
input path (input norm -> qkv_proj -> RoPE), as the layer itself would. Used for routing
scores (`step.py`) and for parking deferred tokens' K/V (`parking.py`)."""

from __future__ import annotations

from typing import Any

import torch


def project_qkv(layer: Any, positions: torch.Tensor, x: torch.Tensor):
    """Post-RoPE q ``[n, heads, dim]``, k and v ``[n, kv_heads, dim]`` and the attention
    scale the layer would compute for rows ``x`` at ``positions``."""
    attn = layer.self_attn
    normed = layer.input_layernorm(x)
    qkv, _ = attn.qkv_proj(normed)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    n, d = x.shape[0], attn.head_dim  # explicit head counts: n may be 0
    if getattr(attn, "q_norm", None) is not None:  # Qwen3 (Keye-VL, Qwen3-VL): per-head
        # RMSNorm of q and k before RoPE, as Qwen3Attention.forward does
        q = attn.q_norm(q.reshape(n, attn.q_size // d, d)).reshape(n, attn.q_size)
        k = attn.k_norm(k.reshape(n, attn.kv_size // d, d)).reshape(n, attn.kv_size)
    q, k = attn.rotary_emb(positions, q.contiguous(), k.contiguous())
    return (
        q.reshape(n, attn.q_size // d, d),
        k.reshape(n, attn.kv_size // d, d),
        v.reshape(n, attn.kv_size // d, d),
        float(attn.scaling),
    )
