"""The tiny Keye-VL: Qwen3 text with M-RoPE, SigLIP tower with 2-D RoPE, 2x2 merge.

Text hidden 128, 2 heads of dim 64, 4 layers, ``mrope_section`` [8, 12, 12]; tower 2
layers of width 64, patch 8; a 128-px image -> 16x16 patches -> 64 visual tokens.
transformers ships no Keye config or processor: those are this project's own
(`remote/keye.py`), copied into the checkpoint and loaded with ``trust_remote_code``.
"""

from __future__ import annotations

from pathlib import Path

from vllm_recroute.tiny.common import (
    TEXT,
    VISION,
    build_tokenizer,
    init_std,
    linear,
    prefixed,
    save_remote_processor,
    save_weights,
)

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build(out: Path, preset: str) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from vllm_recroute.tiny.remote.keye import KeyeConfig, KeyeImageProcessor, KeyeProcessor

    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    tok = build_tokenizer(specials)
    tok.eos_token, tok.pad_token, tok.unk_token = "<|im_end|>", "<|endoftext|>", "<|endoftext|>"
    text = dict(TEXT[preset])
    head_dim = text["head_dim"]
    text.update(
        vocab_size=len(tok),
        initializer_range=init_std(text),
        rms_norm_eps=1e-6,
        # M-RoPE (t, h, w) over the rotary half-dims: 8 + 12 + 12 = head_dim / 2
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16],
        },
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    vis = dict(VISION[preset], hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    merge = 2
    config = KeyeConfig(
        vision_config=dict(vis, spatial_merge_size=merge),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        architectures=["KeyeForConditionalGeneration"],
        **text,
    )
    lm = Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in text.items()}))
    tensors = dict(lm.state_dict())
    # HF initialises Qwen3's per-head q/k RMSNorm weights to 1: every key then has the
    # same norm, the key_norm scorer sees ties only and top-k is float noise. Trained
    # models' norms are far from uniform; so are these.
    for name in tensors:
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            tensors[name] = 1.0 + 0.5 * torch.randn_like(tensors[name])
    tower = SiglipVisionModel(
        SiglipVisionConfig(**vis, vision_use_head=False, initializer_range=init_std(vis))
    )
    width = vis["hidden_size"]
    # transformers 5 names the tower's weights without the `vision_model.` level that
    # published SigLIP-based checkpoints (and vLLM's loaders) have
    tensors |= {
        "visual.vision_model." + k.removeprefix("vision_model."): v
        for k, v in tower.state_dict().items()
    }
    # Keye's packed-sequence position table (loaded, unused with interpolated positions)
    tensors["visual.vision_model.embeddings.packing_position_embedding.weight"] = (
        torch.randn(32768, width) * 0.02
    )
    merged = width * merge * merge
    tensors |= prefixed(
        "mlp_AR.pre_norm.", {"weight": torch.ones(width), "bias": torch.zeros(width)}
    )
    tensors |= prefixed("mlp_AR.linear_1.", linear(merged, merged))
    tensors |= prefixed("mlp_AR.linear_2.", linear(merged, text["hidden_size"]))
    save_weights(tensors, out)
    config.auto_map = {"AutoConfig": "recroute_keye.KeyeConfig"}
    config.save_pretrained(out)
    image_proc = KeyeImageProcessor(patch_size=vis["patch_size"], merge_size=merge)
    proc = KeyeProcessor(
        image_processor=image_proc, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE
    )
    save_remote_processor(proc, out, "keye", "KeyeImageProcessor", "KeyeProcessor")
    lm.generation_config.save_pretrained(out)
