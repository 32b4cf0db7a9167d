"""Reference implementation of the routing contract (docs/architecture.md) over HF transformers.

Slow and readable on purpose: no KV cache, no compaction, no vLLM. Every generated token
re-runs the whole sequence; at each layer the stage's active rows are gathered, run through
the HF decoder layer with a causal mask over just those rows and their original positions,
and scattered back, so deferred tokens carry their hidden state and are invisible to the
stage's attention. Decisions are taken once, on the prompt, at the layer before each router
point, from the residual stream (deferred tokens included), using the project's pure
policy (`vllm_recroute.routing`): the oracle checks the vLLM integration (compaction,
KV layout, metadata, state across steps), the unit tests check the policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_recroute.config import RoutingConfig
from vllm_recroute.routing import (
    ScoreInputs,
    get_scorer,
    num_keep,
    query_indices,
    resolve_stages,
    route_with,
    scoring_layer,
)
from vllm_recroute.routing.reentry import Reentry, reenters


@dataclass
class LanguageModel:
    decoder: torch.nn.Module  # HF LlamaModel / GemmaModel / Qwen3Model / Phi3Model
    lm_head: torch.nn.Module
    image_token_id: int
    embed_scale: float  # Gemma multiplies input embeddings by sqrt(hidden)
    # M-RoPE (Keye-VL, Qwen2.5-VL): rotary half-dims taken from the t, h, w position rows
    mrope_section: tuple[int, ...] | None = None

    def rope(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) ``[1, n, head_dim]`` for rows ``x`` at ``pos`` ([n], or [3, n] with
        M-RoPE: each half-dim section rotates by its own position row, then the halves
        are repeated as HF's rotate_half expects)."""
        rotary = self.decoder.rotary_emb
        if pos.dim() == 1:
            return rotary(x[None], pos[None])
        assert self.mrope_section is not None, "3-D positions need mrope_section"
        cs = [rotary(x[None], p[None]) for p in pos]  # per row: [1, n, D] (halves repeated)
        half = cs[0][0].shape[-1] // 2
        row = torch.repeat_interleave(
            torch.arange(len(self.mrope_section)), torch.tensor(self.mrope_section)
        )
        assert row.numel() == half, (self.mrope_section, half)
        out = []
        for j in (0, 1):  # cos, sin
            stacked = torch.stack([c[j][..., :half] for c in cs])  # [3, 1, n, half]
            picked = stacked.gather(0, row.view(1, 1, 1, -1).expand(1, *stacked.shape[1:]))[0]
            out.append(torch.cat([picked, picked], dim=-1))
        return out[0], out[1]


def take(pos: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Positions of ``rows`` ([n] or M-RoPE [3, n])."""
    return pos[:, rows] if pos.dim() == 2 else pos[rows]


def prompt_positions(inputs: dict, n: int) -> torch.Tensor:
    """The prompt's positions: given (M-RoPE: [3, n]) or 0..n-1."""
    pos = inputs.get("positions")
    return torch.arange(n) if pos is None else pos


def text_positions(prompt_pos: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """Positions of text tokens at sequence indices ``seq`` after the prompt: M-RoPE
    continues all three rows at the same value, one past the prompt's largest."""
    if prompt_pos.dim() == 1:
        return seq
    delta = int(prompt_pos.max()) + 1 - prompt_pos.shape[1]
    return (seq + delta).expand(prompt_pos.shape[0], -1)


def language_model(hf_model: torch.nn.Module) -> LanguageModel:
    cfg = hf_model.config
    if cfg.model_type == "idefics3":
        return LanguageModel(hf_model.model.text_model, hf_model.lm_head, cfg.image_token_id, 1.0)
    if cfg.model_type == "paligemma":
        hidden = cfg.text_config.hidden_size
        return LanguageModel(
            hf_model.model.language_model, hf_model.lm_head, cfg.image_token_index, hidden**0.5
        )
    if cfg.model_type == "Keye":  # the HF Qwen3 text model over Keye's config and weights
        section = tuple(cfg.rope_parameters["mrope_section"])
        return LanguageModel(hf_model.model, hf_model.lm_head, cfg.image_token_id, 1.0, section)
    if cfg.model_type == "phi3_v":  # the HF Phi-3 text model; vLLM's fixed image token id
        return LanguageModel(hf_model.model, hf_model.lm_head, 32044, 1.0)
    if cfg.model_type == "minicpmv":  # HF Qwen2 text; the `<unk>` placeholder id
        return LanguageModel(hf_model.model, hf_model.lm_head, cfg.image_token_id, 1.0)
    raise ValueError(f"no oracle adapter for {cfg.model_type}")


class _Captured(Exception):
    pass


@torch.no_grad()
def merged_embeddings(hf_model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """Input embeddings with image features merged in, as the HF model builds them
    (or as given: ``inputs["inputs_embeds"]``, for text-only HF references)."""
    if "inputs_embeds" in inputs:
        return inputs["inputs_embeds"]
    lm = language_model(hf_model)
    box: dict = {}

    def hook(_module, args, kwargs):
        box["embeds"] = kwargs["inputs_embeds"]
        raise _Captured

    handle = lm.decoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        hf_model(**inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
    return box["embeds"][0]


def _causal_mask(n: int, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return mask[None, None]


def run_layer(layer, x: torch.Tensor, pos: torch.Tensor, rotary) -> torch.Tensor:
    cos, sin = rotary(x, pos)
    out = layer(
        x[None],
        attention_mask=_causal_mask(x.shape[0], x.dtype),
        position_embeddings=(cos, sin),
    )
    return (out[0] if isinstance(out, tuple) else out)[0]


def layer_scores(layer, x, pos, rotary, visual, query, scorer) -> torch.Tensor:
    inputs = ScoreInputs(
        q=_query(layer, x, pos, rotary),
        k=_key_values(layer, x, pos, rotary)[0],
        visual_idx=visual,
        query_idx=query,
        scale=layer.self_attn.head_dim**-0.5,
    )
    return get_scorer(scorer).score(inputs)


def decide_stage(cfg: RoutingConfig, stage, layer, x, pos, rotary, visual, prev) -> torch.Tensor:
    """A stage's active mask, scored with ``layer`` on its input ``x`` (the layer
    ``routing.scoring_layer`` names for the stage's router point)."""
    query = query_indices(x.shape[0], visual, cfg.score_query)  # x: the prompt's rows
    scores = layer_scores(layer, x, pos, rotary, visual, query, cfg.scorer)
    block_ids = visual // cfg.block_size if cfg.granularity == "block" else None
    return route_with(cfg, scores, num_keep(stage.keep, int(visual.numel())), prev, block_ids)


def reentered(cfg: RoutingConfig, reentry: Reentry, x, visual, active) -> torch.Tensor:
    """``x`` with the re-entry update of returning visual tokens (``reentry:
    mean_update``; routing/reentry.py) at a routed stage's first layer."""
    if not reenters(cfg):
        return x
    return x.index_add(0, visual, reentry.at_stage_start(x[visual], active))


@torch.no_grad()
def oracle_generate(
    hf_model: torch.nn.Module,
    inputs: dict,
    cfg: RoutingConfig,
    max_tokens: int,
    eos_token_ids: tuple[int, ...] = (),
) -> list[int]:
    """Greedy tokens of the routed model for one prompt (inputs from the HF processor)."""
    lm = language_model(hf_model)
    dec = lm.decoder
    ids = inputs["input_ids"][0]
    embeds = merged_embeddings(hf_model, inputs) * lm.embed_scale
    prompt_len = ids.shape[0]
    prompt_pos = prompt_positions(inputs, prompt_len)
    is_visual = ids == lm.image_token_id
    is_visual[-1] = False  # the sampled (last) prompt token is never routed
    visual = torch.nonzero(is_visual).flatten()
    num_layers = len(dec.layers)
    stages = resolve_stages(cfg, num_layers, int(visual.numel())) if visual.numel() else ()
    masks: list[torch.Tensor] = []

    def stage_of(layer_idx: int) -> int | None:
        for k, s in enumerate(stages):
            if s.start <= layer_idx < s.end:
                return k
        return None

    def forward(x: torch.Tensor, decide: bool) -> torch.Tensor:
        after = text_positions(prompt_pos, torch.arange(prompt_len, x.shape[0]))
        pos = torch.cat([prompt_pos, after], dim=-1)
        reentry = Reentry()  # every forward recomputes the prompt's rows, update included
        for idx, layer in enumerate(dec.layers):
            if decide:
                for k, s in enumerate(stages):
                    if scoring_layer(s.start, cfg.score_layer) == idx:
                        prev = masks[k - 1] if k else None
                        masks.append(decide_stage(cfg, s, layer, x, pos, lm.rope, visual, prev))
            k = stage_of(idx)
            if k is not None and stages[k].start == idx:
                x = reentered(cfg, reentry, x, visual, masks[k])
            active = torch.ones(x.shape[0], dtype=torch.bool)
            if k is not None:
                active[visual[~masks[k]]] = False
            rows = torch.nonzero(active).flatten()
            x = x.index_copy(0, rows, run_layer(layer, x[rows], take(pos, rows), lm.rope))
        return lm.lm_head(dec.norm(x[-1:]))[0]

    out: list[int] = []
    x = embeds
    for step in range(max_tokens):
        logits = forward(x, decide=(step == 0))
        token = int(torch.argmax(logits))
        out.append(token)
        if token in eos_token_ids:
            break
        new = dec.embed_tokens(torch.tensor([token])) * lm.embed_scale
        x = torch.cat([x, new.to(x.dtype)], 0)
    return out


# --------------------------------------------------------------------------- parked tier


def _project(layer, x: torch.Tensor):
    """Pre-RoPE q, k, v ``[1, heads, n, dim]`` of rows x, as the HF attention computes
    them: separate q/k/v projections (Llama, Gemma, Qwen3) or one fused ``qkv_proj``
    (Phi-3), then Qwen3's per-head q/k RMSNorm where the layer has one."""
    attn = layer.self_attn
    d = attn.head_dim
    h = layer.input_layernorm(x[None])
    if hasattr(attn, "qkv_proj"):
        q_size = attn.config.num_attention_heads * d
        kv_size = attn.config.num_key_value_heads * d
        q, k, v = attn.qkv_proj(h).split([q_size, kv_size, kv_size], dim=-1)
    else:
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
    q, k, v = (t.view(1, x.shape[0], -1, d) for t in (q, k, v))
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _key_values(layer, x: torch.Tensor, pos: torch.Tensor, rotary):
    """Post-RoPE K and V ``[n, kv_heads, dim]`` the layer computes for inputs x."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    _, k, v = _project(layer, x)
    cos, sin = rotary(x, pos)
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return k[0].transpose(0, 1), v[0].transpose(0, 1)


def _query(layer, x: torch.Tensor, pos: torch.Tensor, rotary) -> torch.Tensor:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, _, _ = _project(layer, x)
    cos, sin = rotary(x, pos)
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    return q[0].transpose(0, 1)  # [n, heads, dim]


def _decode_layer(layer, x, pos, rotary, keys, values) -> torch.Tensor:
    """One Llama decoder layer for one new token attending to explicit K/V ``[n, kv, d]``."""
    attn = layer.self_attn
    q = _query(layer, x, pos, rotary)[0]  # [heads, dim]
    group = q.shape[0] // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1)
    v = values.repeat_interleave(group, dim=1)
    weights = torch.softmax(torch.einsum("hd,nhd->hn", q, k) * attn.scaling, dim=-1)
    out = attn.o_proj(torch.einsum("hn,nhd->hd", weights, v).reshape(1, -1))
    x = x + out
    return x + layer.mlp(layer.post_attention_layernorm(x))


def _chunk_layer(layer, x, pos, rotary, keys, values) -> torch.Tensor:
    """One Llama decoder layer for new rows ``x`` [m, hidden] attending to explicit prefix
    K/V ``[n, kv, d]`` and causally to each other."""
    attn = layer.self_attn
    q = _query(layer, x, pos, rotary)  # [m, heads, dim]
    kk, vv = _key_values(layer, x, pos, rotary)
    k = torch.cat([keys, kk])
    v = torch.cat([values, vv])
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    logits = torch.einsum("mhd,nhd->hmn", q, k) * attn.scaling
    m, n = x.shape[0], keys.shape[0]
    future = torch.ones(m, m, dtype=torch.bool).triu(1)
    logits[:, :, n:] = logits[:, :, n:].masked_fill(future, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    out = attn.o_proj(torch.einsum("hmn,nhd->mhd", weights, v).reshape(m, -1))
    x = x + out
    return x + layer.mlp(layer.post_attention_layernorm(x))


@torch.no_grad()
def oracle_generate_parked(
    hf_model: torch.nn.Module,
    inputs: dict,
    cfg: RoutingConfig,
    max_tokens: int,
    next_turn: tuple[list[int], int, bool] | None = None,
) -> tuple[list[int], int]:
    """Greedy tokens with the parked tier and decode-time re-routing, nothing ever dropped.

    Everything stays in memory: the K/V of every prompt row at every layer is kept (active
    rows: what the layer computed; deferred rows: from their carried hidden state), and a
    per-stage ``present`` mask says which rows the stage's attention sees. Re-routing
    flips whole units in that mask with the project's pure policy
    (`vllm_recroute.routing.rerouting`). This is the "blocks that never left" reference
    for the vLLM path, which moves the same bytes between pages and the host pool.
    Returns the tokens and the number of units restored.

    ``next_turn = (new_ids, max_tokens_2, with_answer)``: then continue as a later turn of
    the same conversation, from the routing state turn 1 ended with. ``with_answer``: its
    prompt is this prompt, the generated tokens and ``new_ids`` (the answer's K/V is
    reused); otherwise it is this prompt and ``new_ids`` (the answer as the later prompt
    spells it, and the question; only the prompt's K/V is reused). The new rows are one
    chunk; before each stage it re-routes once for the chunk's last row, then decodes as
    turn 1 did. Returns the later turn's tokens and the total restores instead.
    """
    from vllm_recroute.routing.rerouting import chunk_units, plan_swaps, unit_scores

    lm = language_model(hf_model)
    dec = lm.decoder
    rotary = lm.rope
    ids = inputs["input_ids"][0]
    x = merged_embeddings(hf_model, inputs) * lm.embed_scale
    n = ids.shape[0]
    is_visual = ids == lm.image_token_id
    is_visual[-1] = False
    visual = torch.nonzero(is_visual).flatten()
    stages = resolve_stages(cfg, len(dec.layers), int(visual.numel())) if visual.numel() else ()
    pos = prompt_positions(inputs, n)
    masks: list[torch.Tensor] = []
    kv: list[tuple[torch.Tensor, torch.Tensor]] = []
    reentry = Reentry()
    # prefill: the routed forward of oracle_generate, keeping every row's K/V per layer
    for idx, layer in enumerate(dec.layers):
        for k, s in enumerate(stages):
            if scoring_layer(s.start, cfg.score_layer) == idx:
                masks.append(
                    decide_stage(cfg, s, layer, x, pos, rotary, visual, masks[k - 1] if k else None)
                )
        k = next((k for k, s in enumerate(stages) if s.start <= idx < s.end), None)
        if k is not None and stages[k].start == idx:
            x = reentered(cfg, reentry, x, visual, masks[k])
        kv.append(_key_values(layer, x, pos, rotary))
        active = torch.ones(n, dtype=torch.bool)
        if k is not None:
            active[visual[~masks[k]]] = False
        rows = torch.nonzero(active).flatten()
        x = x.index_copy(0, rows, run_layer(layer, x[rows], take(pos, rows), rotary))
    out = [int(torch.argmax(lm.lm_head(dec.norm(x[-1:]))[0]))]
    # units per stage: active chunks first, then deferred chunks (vllm_recroute/worker/parking.py)
    u = cfg.park_block_tokens
    units, active_units, present = [], [], []
    for k in range(len(stages)):
        act = chunk_units(torch.nonzero(masks[k]).flatten(), u)
        dfr = chunk_units(torch.nonzero(~masks[k]).flatten(), u) if cfg.mode == "reroute" else []
        units.append(act + dfr)
        active_units.append(set(range(len(act))))
        p = torch.ones(n, dtype=torch.bool)
        p[visual[~masks[k]]] = False
        present.append(p)
    restored = 0
    dec_k: list[list[torch.Tensor]] = [[] for _ in dec.layers]
    dec_v: list[list[torch.Tensor]] = [[] for _ in dec.layers]

    def reroute(k: int, idx: int, q: torch.Tensor) -> int:
        """Swap stage k's units for query q (its first layer idx); returns the restores."""
        layer = dec.layers[idx]
        full = [j for j, m in enumerate(units[k]) if m.numel() == u]
        digests = torch.stack([kv[idx][0][visual[units[k][j]]].mean(0) for j in full])
        scores = unit_scores(q, digests, layer.self_attn.scaling).tolist()
        score = dict(zip(full, scores, strict=True))
        plan = plan_swaps(
            {j: score[j] for j in full if j in active_units[k]},
            {j: score[j] for j in full if j not in active_units[k]},
            cfg.reroute_max_swaps,
        )
        for swap in plan:
            active_units[k].discard(swap.evict)
            active_units[k].add(swap.restore)
            present[k][visual[units[k][swap.evict]]] = False
            present[k][visual[units[k][swap.restore]]] = True
        return len(plan)

    def forward(x: torch.Tensor, p: torch.Tensor, due: bool) -> torch.Tensor:
        """New rows x at positions p through every layer (re-routing first when due)."""
        nonlocal restored
        for idx, layer in enumerate(dec.layers):
            k = next((k for k, s in enumerate(stages) if s.start <= idx < s.end), None)
            if k is not None and idx == stages[k].start and due and cfg.mode == "reroute":
                restored += reroute(k, idx, _query(layer, x[-1:], p[..., -1:], rotary)[0])
            sel = present[k] if k is not None else torch.ones(n, dtype=torch.bool)
            keys = torch.cat([kv[idx][0][sel], *dec_k[idx]])
            values = torch.cat([kv[idx][1][sel], *dec_v[idx]])
            kk, vv = _key_values(layer, x, p, rotary)
            if x.shape[0] == 1:
                x = _decode_layer(
                    layer, x, p, rotary, torch.cat([keys, kk]), torch.cat([values, vv])
                )
            else:
                x = _chunk_layer(layer, x, p, rotary, keys, values)
            dec_k[idx].append(kk)
            dec_v[idx].append(vv)
        return x

    def decode(out: list[int], start: int, steps: int) -> None:
        """Greedy steps after ``out[0]``, the first token sampled at prompt length start."""
        for i in range(1, steps):
            x = dec.embed_tokens(torch.tensor([out[-1]])) * lm.embed_scale
            due = cfg.reroute_every > 0 and i % cfg.reroute_every == 0
            x = forward(x, text_positions(pos, torch.tensor([start + i - 1])), due)
            out.append(int(torch.argmax(lm.lm_head(dec.norm(x))[0])))

    decode(out, n, max_tokens)
    if next_turn is None:
        return out, restored
    new_ids, max_tokens_2, with_answer = next_turn
    if with_answer:
        chunk, start = torch.tensor([out[-1], *new_ids]), n + len(out) - 1
    else:
        chunk, start = torch.tensor(new_ids), n
        for rows in (*dec_k, *dec_v):
            rows.clear()
    x = dec.embed_tokens(chunk) * lm.embed_scale
    x = forward(x, text_positions(pos, torch.arange(start, start + len(chunk))), True)
    out2 = [int(torch.argmax(lm.lm_head(dec.norm(x[-1:]))[0]))]
    decode(out2, start + len(chunk), max_tokens_2)
    return out2, restored
