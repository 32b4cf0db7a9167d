"""The tiny Phi-3-Vision: Phi-3 text with fused qkv / gate-up, CLIP ViT-L/14-336 tower,
HD transform.

Text hidden 128, 2 heads of dim 64, 4 layers, vocabulary 32064 (vLLM hard-codes the
image token id 32044); vLLM builds the CLIP tower at its fixed width 1024 up to
``img_processor["layer_idx"]``: here one layer. ``num_crops`` 1: every image is one
336-px tile plus the global view -> 313 visual tokens. Config, image processor and
processor are this project's own (`remote/phi3v.py`), copied into the checkpoint and
loaded with ``trust_remote_code``.
"""

from __future__ import annotations

from pathlib import Path

from vllm_recroute.tiny.common import (
    TEXT,
    build_tokenizer,
    init_std,
    linear,
    prefixed,
    save_remote_processor,
    save_weights,
)

PHI3V_CHAT_TEMPLATE = (
    "{% set ns = namespace(images=0) %}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{% set ns.images = ns.images + 1 %}"
    "{{ '<|image_' ~ ns.images ~ '|>\n' }}"
    "{% endif %}{% endfor %}{% endif %}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build(out: Path, preset: str) -> None:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, Phi3Config, Phi3ForCausalLM

    from vllm_recroute.tiny.remote.phi3v import (
        IMAGE_TOKEN_ID,
        MAX_IMAGES,
        Phi3VConfig,
        Phi3VImageProcessor,
        Phi3VProcessor,
    )

    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    specials += [f"<|image_{i}|>" for i in range(1, MAX_IMAGES + 1)]
    tok = build_tokenizer(specials)
    tok.eos_token, tok.pad_token, tok.unk_token = "<|end|>", "<|endoftext|>", "<|endoftext|>"
    text = dict(TEXT[preset])
    text.pop("head_dim")  # Phi-3 derives it: hidden / heads = 64
    text.update(
        # the model's vocabulary spans vLLM's fixed image token id; ids past the
        # tokenizer's are placeholders only
        vocab_size=32064,
        initializer_range=init_std(text),
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    assert text["vocab_size"] > IMAGE_TOKEN_ID
    # vLLM's CLIP-L/14-336 shapes are fixed (it ignores the checkpoint's); only depth is
    # configurable: layer_idx 0 -> the tower is the embeddings + one encoder layer
    clip = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_attention_heads=16,
        num_hidden_layers=1,
        image_size=336,
        patch_size=14,
        hidden_act="quick_gelu",
        projection_dim=768,
        initializer_range=1024**-0.5,  # see init_std
    )
    config = Phi3VConfig(
        img_processor={
            "image_dim_out": 1024,
            "model_name": "openai/clip-vit-large-patch14-336",
            "name": "clip_vision_model",
            "num_img_tokens": 144,
            "layer_idx": 0,
        },
        embd_layer={
            "embedding_cls": "image",
            "hd_transform_order": "sub_glb",
            "projection_cls": "mlp",
            "use_hd_transform": True,
            "with_learnable_separator": True,
        },
        architectures=["Phi3VForCausalLM"],
        **text,
    )
    lm = Phi3ForCausalLM(Phi3Config(**text))
    tensors = dict(lm.state_dict())
    # no logit for the ids past the tokenizer's (placeholders only): a zero row scores 0,
    # below the best of the ~600 real tokens' random logits, so greedy output decodes
    tensors["lm_head.weight"][len(tok) :] = 0.0
    tower = CLIPVisionModel(clip)
    prefix = "model.vision_embed_tokens."
    # vLLM's tower is `img_processor.vision_model.*` without the post-norm (the features
    # are taken before it); transformers 5 names the weights without `vision_model.`
    tensors |= {
        f"{prefix}img_processor.vision_model." + k.removeprefix("vision_model."): v
        for k, v in tower.state_dict().items()
        if "post_layernorm" not in k and "position_ids" not in k
    }
    merged = 1024 * 4
    tensors[f"{prefix}glb_GN"] = torch.randn(1, 1, merged) * 0.02
    tensors[f"{prefix}sub_GN"] = torch.randn(1, 1, 1, merged) * 0.02
    tensors |= prefixed(f"{prefix}img_projection.0.", linear(merged, text["hidden_size"]))
    tensors |= prefixed(
        f"{prefix}img_projection.2.", linear(text["hidden_size"], text["hidden_size"])
    )
    save_weights(tensors, out)
    config.auto_map = {"AutoConfig": "recroute_phi3v.Phi3VConfig"}
    config.save_pretrained(out)
    proc = Phi3VProcessor(
        image_processor=Phi3VImageProcessor(num_crops=1),
        tokenizer=tok,
        chat_template=PHI3V_CHAT_TEMPLATE,
    )
    save_remote_processor(proc, out, "phi3v", "Phi3VImageProcessor", "Phi3VProcessor")
    lm.generation_config.save_pretrained(out)
