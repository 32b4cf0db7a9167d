"""The tiny MiniCPM-V 2.6: Qwen2 text, SigLIP tower run as vLLM's Idefics2 vision
transformer, one-layer perceiver resampler.

Text hidden 128, 2 heads of dim 64, 4 layers; tower 2 layers of width 64, patch 8; every
image is resized to one 64-px slice (no slicing) -> 8x8 patches -> ``query_num`` 64
resampler queries -> 64 ``<unk>`` placeholders (vLLM's embedding positions) between
``<image>`` and ``</image>``. Config, image processor and processor are this project's
own (`remote/minicpmv.py`), copied into the checkpoint and loaded with
``trust_remote_code``.
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

MINICPMV_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}(<image>./</image>)\n"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build(out: Path, preset: str) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from vllm_recroute.tiny.remote.minicpmv import (
        MiniCPMVConfig,
        MiniCPMVImageProcessor,
        MiniCPMVProcessor,
    )

    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<unk>",
        "<image>",
        "</image>",
        "<image_id>",
        "</image_id>",
        "<slice>",
        "</slice>",
    ]
    tok = build_tokenizer(specials)
    tok.eos_token, tok.pad_token, tok.unk_token = "<|im_end|>", "<|endoftext|>", "<unk>"
    # vLLM's vendored processor prepends the BOS id to the (discarded) text it encodes
    tok.bos_token = "<|endoftext|>"
    text = dict(TEXT[preset])
    text.pop("head_dim")  # Qwen2 derives it: hidden / heads = 64
    text.update(
        vocab_size=len(tok),
        initializer_range=init_std(text),
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    vis = dict(VISION[preset], hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    queries = (vis["image_size"] // vis["patch_size"]) ** 2  # 64
    config = MiniCPMVConfig(
        vision_config=vis,
        version=2.6,
        query_num=queries,
        image_size=vis["image_size"],
        max_slice_num=1,
        image_token_id=tok.convert_tokens_to_ids("<unk>"),
        architectures=["MiniCPMV"],
        **text,
    )
    lm = Qwen2ForCausalLM(Qwen2Config(**text))
    tensors = {"llm." + k: v for k, v in lm.state_dict().items()}
    tower = SiglipVisionModel(
        SiglipVisionConfig(**vis, vision_use_head=False, initializer_range=init_std(vis))
    )
    # transformers 5 names the tower's weights without `vision_model.`; vLLM's Idefics2
    # tower is `vpm.{embeddings,encoder,post_layernorm}`
    tensors |= {
        "vpm." + k.removeprefix("vision_model."): v
        for k, v in tower.state_dict().items()
        if "position_ids" not in k
    }
    d, width = text["hidden_size"], vis["hidden_size"]
    res = "resampler."
    tensors[res + "query"] = torch.randn(queries, d) * 0.02
    tensors[res + "kv_proj.weight"] = torch.randn(d, width) * width**-0.5
    tensors[res + "attn.in_proj_weight"] = torch.randn(3 * d, d) * d**-0.5
    tensors[res + "attn.in_proj_bias"] = torch.zeros(3 * d)
    tensors |= prefixed(res + "attn.out_proj.", linear(d, d))
    for name in ("ln_q", "ln_kv", "ln_post"):
        tensors |= prefixed(f"{res}{name}.", {"weight": torch.ones(d), "bias": torch.zeros(d)})
    tensors[res + "proj"] = torch.randn(d, d) * d**-0.5
    save_weights(tensors, out)
    config.auto_map = {"AutoConfig": "recroute_minicpmv.MiniCPMVConfig"}
    config.save_pretrained(out)
    image_proc = MiniCPMVImageProcessor(
        image_size=vis["image_size"], patch_size=vis["patch_size"], image_feature_size=queries
    )
    proc = MiniCPMVProcessor(
        image_processor=image_proc, tokenizer=tok, chat_template=MINICPMV_CHAT_TEMPLATE
    )
    save_remote_processor(proc, out, "minicpmv", "MiniCPMVImageProcessor", "MiniCPMVProcessor")
    lm.generation_config.save_pretrained(out)
