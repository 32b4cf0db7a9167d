"""Reference implementation of the routing contract (design.md §1) over HF transformers.

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
    route_request,
)


@dataclass
class LanguageModel:
    decoder: torch.nn.Module  # HF LlamaModel / GemmaModel
    lm_head: torch.nn.Module
    image_token_id: int
    embed_scale: float  # Gemma multiplies input embeddings by sqrt(hidden)


def language_model(hf_model: torch.nn.Module) -> LanguageModel:
    cfg = hf_model.config
    if cfg.model_type == "idefics3":
        return LanguageModel(hf_model.model.text_model, hf_model.lm_head, cfg.image_token_id, 1.0)
    if cfg.model_type == "paligemma":
        hidden = cfg.text_config.hidden_size
        return LanguageModel(
            hf_model.model.language_model, hf_model.lm_head, cfg.image_token_index, hidden**0.5
        )
    raise ValueError(f"no oracle adapter for {cfg.model_type}")


class _Captured(Exception):
    pass


@torch.no_grad()
def merged_embeddings(hf_model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """Input embeddings with image features merged in, as the HF model builds them."""
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


def _run_layer(layer, x: torch.Tensor, pos: torch.Tensor, rotary) -> torch.Tensor:
    cos, sin = rotary(x[None], pos[None])
    out = layer(
        x[None],
        attention_mask=_causal_mask(x.shape[0], x.dtype),
        position_ids=pos[None],
        position_embeddings=(cos, sin),
    )
    return (out[0] if isinstance(out, tuple) else out)[0]


def _scores(layer, x, pos, rotary, visual, query, scorer) -> torch.Tensor:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    d = attn.head_dim
    h = layer.input_layernorm(x[None])
    q = attn.q_proj(h).view(1, x.shape[0], -1, d).transpose(1, 2)
    k = attn.k_proj(h).view(1, x.shape[0], -1, d).transpose(1, 2)
    cos, sin = rotary(x[None], pos[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    inputs = ScoreInputs(
        q=q[0].transpose(0, 1),
        k=k[0].transpose(0, 1),
        visual_idx=visual,
        query_idx=query,
        scale=d**-0.5,
    )
    return get_scorer(scorer).score(inputs)


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
        pos = torch.arange(x.shape[0])
        for idx, layer in enumerate(dec.layers):
            if decide:
                for k, s in enumerate(stages):
                    if s.start == idx + 1:
                        query = query_indices(prompt_len, visual, cfg.score_query)
                        sc = _scores(layer, x, pos, dec.rotary_emb, visual, query, cfg.scorer)
                        block_ids = visual // cfg.block_size if cfg.granularity == "block" else None
                        masks.append(
                            route_request(
                                sc,
                                num_keep(s.keep, int(visual.numel())),
                                cfg.mode,
                                masks[k - 1] if k else None,
                                block_ids=block_ids,
                                block_reduce=cfg.block_reduce,
                            )
                        )
            k = stage_of(idx)
            active = torch.ones(x.shape[0], dtype=torch.bool)
            if k is not None:
                active[visual[~masks[k]]] = False
            rows = torch.nonzero(active).flatten()
            x = x.index_copy(0, rows, _run_layer(layer, x[rows], pos[rows], dec.rotary_emb))
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
