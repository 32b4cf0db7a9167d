"""The tiny Idefics3 (SmolVLM): Llama text, SigLIP-style tower, pixel-shuffle connector.

Presets:
- ``tiny``: text of hidden 128, 2 heads of dim 64 (vLLM's CPU attention needs
  head_dim >= 32), 4 layers; a 2-layer tower of width 64, 64-px tiles, patch 8,
  pixel-shuffle 2 -> 16 visual tokens per tile, a 128-px image -> 4 tiles + global = 80.
- ``smolvlm-256m``: the shapes of HuggingFaceTB/SmolVLM-256M-Instruct (30 text layers,
  hidden 576, 9 heads, 3 KV heads; 12-layer 768-wide vision tower, 512-px tiles, patch 16,
  pixel-shuffle 4 -> 64 tokens per tile). Random weights: for speed and memory benchmarks.
"""

from __future__ import annotations

from pathlib import Path

from vllm_recroute.tiny.common import TEXT, VISION, build_tokenizer, init_std, save

SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}"
    "{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

_SCALE = {"tiny": 2, "smolvlm-256m": 4}
# Longest edge images are resized to, in tiles: tiny 128 px -> 2x2 tiles + global = 80 tokens;
# smolvlm-256m 1536 px -> 3x3 + global = 640 tokens (SmolVLM itself goes up to 4x4).
_MAX_TILES_PER_SIDE = {"tiny": 2, "smolvlm-256m": 3}


def build(out: Path, preset: str) -> None:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    rows_cols = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<end_of_utterance>",
        "<fake_token_around_image>",
        "<image>",
        "<global-img>",
        *rows_cols,
    ]
    tok = build_tokenizer(specials)
    tok.bos_token, tok.eos_token, tok.pad_token = (
        "<|im_start|>",
        "<end_of_utterance>",
        "<|endoftext|>",
    )
    tok.unk_token = "<|endoftext|>"
    vis, scale = VISION[preset], _SCALE[preset]
    text = dict(TEXT[preset])
    text.setdefault("vocab_size", len(tok))
    text.update(
        model_type="llama",
        rms_norm_eps=1e-5,
        initializer_range=init_std(text),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    config = Idefics3Config(
        text_config=text,
        vision_config=dict(vis, layer_norm_eps=1e-6, initializer_range=init_std(vis)),
        scale_factor=scale,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = Idefics3ForConditionalGeneration(config)
    tile = vis["image_size"]
    image_proc = Idefics3ImageProcessorPil(
        size={"longest_edge": _MAX_TILES_PER_SIDE[preset] * tile},
        max_image_size={"longest_edge": tile},
        do_image_splitting=True,
    )
    seq_len = (tile // vis["patch_size"]) ** 2 // scale**2
    proc = Idefics3Processor(
        image_processor=image_proc,
        tokenizer=tok,
        image_seq_len=seq_len,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    save(model, proc, out)
