"""Tiny deterministic builders for the routed architectures beyond Idefics3 / PaliGemma.

Same contract as `tiny_models.py` (whose `build_tiny_model` dispatches here): random
weights from a seed, a byte-level BPE tokenizer, processor and chat template, no
downloads. These checkpoints follow the published layouts that vLLM's model classes
load; where transformers ships no class for them (Keye-VL's config and processor), the
code is this project's own (`vllm_recroute/tiny_remote/`), copied into the checkpoint
and loaded with ``trust_remote_code``.

- ``keye`` (Keye-VL: Qwen3 text with M-RoPE, SigLIP tower with 2-D RoPE, 2x2 merge):
  text hidden 128, 2 heads of dim 64, 4 layers, ``mrope_section`` [8, 12, 12]; tower 2
  layers of width 64, patch 8; a 128-px image -> 16x16 patches -> 64 visual tokens.
- ``phi3v`` (Phi-3-Vision: Phi-3 text with fused qkv / gate-up, CLIP ViT-L/14-336 tower,
  HD transform): text hidden 128, 2 heads of dim 64, 4 layers, vocabulary 32064 (vLLM
  hard-codes the image token id 32044); vLLM builds the CLIP tower at its fixed width
  1024 up to ``img_processor["layer_idx"]``: here one layer. ``num_crops`` 1: every
  image is one 336-px tile plus the global view -> 313 visual tokens.
- ``minicpmv`` (MiniCPM-V 2.6: Qwen2 text, SigLIP tower run as vLLM's Idefics2 vision
  transformer, one-layer perceiver resampler): text hidden 128, 2 heads of dim 64, 4
  layers; tower 2 layers of width 64, patch 8; every image is resized to one 64-px slice
  (no slicing) -> 8x8 patches -> ``query_num`` 64 resampler queries -> 64 ``<unk>``
  placeholders (vLLM's embedding positions) between ``<image>`` and ``</image>``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from vllm_recroute.tiny_models import _TEXT, _VISION, _init_std, build_tokenizer

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _linear(n_in: int, n_out: int) -> dict[str, torch.Tensor]:
    # 1/sqrt(fan_in) keeps a random tower's features input-dependent (see _init_std)
    return {
        "weight": torch.randn(n_out, n_in) * n_in**-0.5,
        "bias": torch.randn(n_out) * 0.02,
    }


def _prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v.contiguous() for k, v in tensors.items()}


def _save_weights(tensors: dict[str, torch.Tensor], out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        out / "model.safetensors",
        metadata={"format": "pt"},
    )


def _copy_remote(module: str, out: Path, name: str) -> None:
    src = Path(__file__).parent / "tiny_remote" / f"{module}.py"
    shutil.copyfile(src, out / f"{name}.py")


def _add_auto_map(path: Path, auto_map: dict[str, str]) -> None:
    data = json.loads(path.read_text())
    data["auto_map"] = auto_map
    if isinstance(data.get("image_processor"), dict):  # transformers 5 nests it here
        data["image_processor"]["auto_map"] = auto_map
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _save_remote_processor(
    proc: Any, out: Path, module: str, image_cls: str, proc_cls: str
) -> None:
    """Save a processor whose classes live in ``tiny_remote/<module>.py``: the module is
    copied into the checkpoint as ``recroute_<module>.py`` and the processor configs point
    to it (loaded with ``trust_remote_code``)."""
    proc.save_pretrained(out)
    name = f"recroute_{module}"
    _copy_remote(module, out, name)
    auto = {"AutoImageProcessor": f"{name}.{image_cls}", "AutoProcessor": f"{name}.{proc_cls}"}
    for cfg in ("preprocessor_config.json", "processor_config.json"):
        if (out / cfg).exists():
            _add_auto_map(out / cfg, auto)


def _keye(out: Path, preset: str) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from vllm_recroute.tiny_remote.keye import KeyeConfig, KeyeImageProcessor, KeyeProcessor

    if preset != "tiny":
        raise ValueError("keye: only the 'tiny' preset is provided")
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
    text = dict(_TEXT[preset])
    head_dim = text["head_dim"]
    text.update(
        vocab_size=len(tok),
        initializer_range=_init_std(text),
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
    vis = dict(_VISION[preset], hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
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
        SiglipVisionConfig(**vis, vision_use_head=False, initializer_range=_init_std(vis))
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
    tensors |= _prefixed(
        "mlp_AR.pre_norm.", {"weight": torch.ones(width), "bias": torch.zeros(width)}
    )
    tensors |= _prefixed("mlp_AR.linear_1.", _linear(merged, merged))
    tensors |= _prefixed("mlp_AR.linear_2.", _linear(merged, text["hidden_size"]))
    _save_weights(tensors, out)
    config.auto_map = {"AutoConfig": "recroute_keye.KeyeConfig"}
    config.save_pretrained(out)
    image_proc = KeyeImageProcessor(patch_size=vis["patch_size"], merge_size=merge)
    proc = KeyeProcessor(
        image_processor=image_proc, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE
    )
    _save_remote_processor(proc, out, "keye", "KeyeImageProcessor", "KeyeProcessor")
    lm.generation_config.save_pretrained(out)


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


def _phi3v(out: Path, preset: str) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel, Phi3Config, Phi3ForCausalLM

    from vllm_recroute.tiny_remote.phi3v import (
        IMAGE_TOKEN_ID,
        MAX_IMAGES,
        Phi3VConfig,
        Phi3VImageProcessor,
        Phi3VProcessor,
    )

    if preset != "tiny":
        raise ValueError("phi3v: only the 'tiny' preset is provided")
    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    specials += [f"<|image_{i}|>" for i in range(1, MAX_IMAGES + 1)]
    tok = build_tokenizer(specials)
    tok.eos_token, tok.pad_token, tok.unk_token = "<|end|>", "<|endoftext|>", "<|endoftext|>"
    text = dict(_TEXT[preset])
    text.pop("head_dim")  # Phi-3 derives it: hidden / heads = 64
    text.update(
        # the model's vocabulary spans vLLM's fixed image token id; ids past the
        # tokenizer's are placeholders only
        vocab_size=32064,
        initializer_range=_init_std(text),
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
        initializer_range=1024**-0.5,  # see _init_std
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
    tensors |= _prefixed(f"{prefix}img_projection.0.", _linear(merged, text["hidden_size"]))
    tensors |= _prefixed(
        f"{prefix}img_projection.2.", _linear(text["hidden_size"], text["hidden_size"])
    )
    _save_weights(tensors, out)
    config.auto_map = {"AutoConfig": "recroute_phi3v.Phi3VConfig"}
    config.save_pretrained(out)
    proc = Phi3VProcessor(
        image_processor=Phi3VImageProcessor(num_crops=1),
        tokenizer=tok,
        chat_template=PHI3V_CHAT_TEMPLATE,
    )
    _save_remote_processor(proc, out, "phi3v", "Phi3VImageProcessor", "Phi3VProcessor")
    lm.generation_config.save_pretrained(out)


MINICPMV_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}(<image>./</image>)\n"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _minicpmv(out: Path, preset: str) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from vllm_recroute.tiny_remote.minicpmv import (
        MiniCPMVConfig,
        MiniCPMVImageProcessor,
        MiniCPMVProcessor,
    )

    if preset != "tiny":
        raise ValueError("minicpmv: only the 'tiny' preset is provided")
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
    text = dict(_TEXT[preset])
    text.pop("head_dim")  # Qwen2 derives it: hidden / heads = 64
    text.update(
        vocab_size=len(tok),
        initializer_range=_init_std(text),
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    vis = dict(_VISION[preset], hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
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
        SiglipVisionConfig(**vis, vision_use_head=False, initializer_range=_init_std(vis))
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
    tensors |= _prefixed(res + "attn.out_proj.", _linear(d, d))
    for name in ("ln_q", "ln_kv", "ln_post"):
        tensors |= _prefixed(f"{res}{name}.", {"weight": torch.ones(d), "bias": torch.zeros(d)})
    tensors[res + "proj"] = torch.randn(d, d) * d**-0.5
    _save_weights(tensors, out)
    config.auto_map = {"AutoConfig": "recroute_minicpmv.MiniCPMVConfig"}
    config.save_pretrained(out)
    image_proc = MiniCPMVImageProcessor(
        image_size=vis["image_size"], patch_size=vis["patch_size"], image_feature_size=queries
    )
    proc = MiniCPMVProcessor(
        image_processor=image_proc, tokenizer=tok, chat_template=MINICPMV_CHAT_TEMPLATE
    )
    _save_remote_processor(proc, out, "minicpmv", "MiniCPMVImageProcessor", "MiniCPMVProcessor")
    lm.generation_config.save_pretrained(out)


BUILDERS: dict[str, Any] = {"keye": _keye, "phi3v": _phi3v, "minicpmv": _minicpmv}
