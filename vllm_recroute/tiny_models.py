"""Deterministic random-weight VLMs built locally (no model hub): tests, benchmarks, `serve`.

`build_tiny_model(out, arch, seed, preset)` writes a complete HF checkpoint directory:
config, safetensors weights, a tokenizer trained with `tokenizers` on a fixed corpus,
image processor, processor and chat template. The same (arch, seed, preset) always gives
the same bytes, so a session-wide cache keyed by those is safe.

Presets:
- ``tiny``: Llama/Gemma text of hidden 128, 2 heads of dim 64 (vLLM's CPU attention needs
  head_dim >= 32), 4 layers; a 2-layer SigLIP-style tower. Idefics3: 64-px tiles, patch 8,
  pixel-shuffle 2 -> 16 visual tokens per tile, a 128-px image -> 4 tiles + global = 80.
- ``smolvlm-256m``: the shapes of HuggingFaceTB/SmolVLM-256M-Instruct (30 text layers,
  hidden 576, 9 heads, 3 KV heads; 12-layer 768-wide vision tower, 512-px tiles, patch 16,
  pixel-shuffle 4 -> 64 tokens per tile). Random weights: for speed and memory benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageDraw

Arch = Literal["idefics3", "paligemma", "keye", "phi3v", "minicpmv"]
Preset = Literal["tiny", "smolvlm-256m"]
# more architectures are built by tiny_models_more.py (imported lazily: it imports this)
ARCHS: tuple[str, ...] = ("idefics3", "paligemma", "keye", "phi3v", "minicpmv")
PRESETS: tuple[str, ...] = ("tiny", "smolvlm-256m")
_FORMAT_VERSION = 4  # bump when the builder's output changes, so caches are rebuilt

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

_WORDS = [
    "what",
    "is",
    "in",
    "the",
    "picture",
    "image",
    "photo",
    "describe",
    "colors",
    "color",
    "shape",
    "shapes",
    "left",
    "right",
    "top",
    "bottom",
    "middle",
    "side",
    "of",
    "a",
    "an",
    "the",
    "please",
    "where",
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "white",
    "black",
    "square",
    "circle",
    "triangle",
    "star",
    "how",
    "many",
    "are",
    "there",
    "is",
    "it",
    "yes",
    "no",
    "which",
    "row",
    "column",
    "object",
    "objects",
    "small",
    "large",
    "near",
    "far",
    "above",
    "below",
    "next",
    "to",
    "count",
    "number",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "user",
    "assistant",
    "system",
    "answer",
    "question",
]


def _corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14))) for _ in range(3000)]
    lines += [w.capitalize() + "?" for w in _WORDS] + ["User: hi", "Assistant: ok."]
    lines.append("0123456789 .,:;!?'\"()[]{}<>-_/\\@#$%^&*+=~`|\n")
    return lines


def build_tokenizer(special_tokens: list[str], vocab_size: int = 600):
    """A byte-level BPE tokenizer (any text encodes) trained on a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def make_test_image(seed: int, size: int = 128) -> Image.Image:
    """A deterministic RGB image of a few filled shapes (test and benchmark input)."""
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), (235, 235, 230))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 7)):
        colour = tuple(rng.randrange(256) for _ in range(3))
        x0, y0 = rng.randrange(size), rng.randrange(size)
        w, h = rng.randint(size // 10, size // 3), rng.randint(size // 10, size // 3)
        box = (x0, y0, min(size - 1, x0 + w), min(size - 1, y0 + h))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return img


# --------------------------------------------------------------------------- configs

_TEXT = {
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
    ),
    "smolvlm-256m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        vocab_size=49280,
    ),
}
_VISION = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=64,
        patch_size=8,
    ),
    "smolvlm-256m": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=512,
        patch_size=16,
    ),
}
_SCALE = {"tiny": 2, "smolvlm-256m": 4}
# Longest edge images are resized to, in tiles: tiny 128 px -> 2x2 tiles + global = 80 tokens;
# smolvlm-256m 1536 px -> 3x3 + global = 640 tokens (SmolVLM itself goes up to 4x4).
_MAX_TILES_PER_SIDE = {"tiny": 2, "smolvlm-256m": 3}


def _init_std(cfg: dict) -> float:
    # HF's default 0.02 makes a random tiny model emit one token whatever the input, which
    # would let routing bugs pass unseen; 1/sqrt(width) keeps outputs input-dependent.
    return cfg["hidden_size"] ** -0.5


def _idefics3(out: Path, preset: str) -> None:
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
    vis, scale = _VISION[preset], _SCALE[preset]
    text = dict(_TEXT[preset])
    text.setdefault("vocab_size", len(tok))
    text.update(
        model_type="llama",
        rms_norm_eps=1e-5,
        initializer_range=_init_std(text),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    config = Idefics3Config(
        text_config=text,
        vision_config=dict(vis, layer_norm_eps=1e-6, initializer_range=_init_std(vis)),
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
    _save(model, proc, out)


def _save(model: Any, proc: Any, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    proc.save_pretrained(out)
    model.generation_config.save_pretrained(out)


def build_tiny_model(
    out_dir: str | os.PathLike, arch: str = "idefics3", seed: int = 0, preset: str = "tiny"
) -> Path:
    """Write a random-weight checkpoint of `arch` to `out_dir`; same arguments, same bytes
    (Idefics3 here; PaliGemma in `tiny_models_paligemma.py`, the rest in `tiny_models_more.py`)."""
    import torch

    if arch not in ARCHS:
        raise ValueError(f"arch: got {arch!r}; allowed: {', '.join(ARCHS)}")
    if preset not in PRESETS:
        raise ValueError(f"preset: got {preset!r}; allowed: {', '.join(PRESETS)}")
    out = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "idefics3":
            _idefics3(out, preset)
        elif arch == "paligemma":
            from vllm_recroute.tiny_models_paligemma import build_paligemma

            build_paligemma(out, preset)
        else:
            from vllm_recroute.tiny_models_more import BUILDERS

            BUILDERS[arch](out, preset)
    (out / "recroute_tiny.json").write_text(
        json.dumps({"arch": arch, "seed": seed, "preset": preset, "format": _FORMAT_VERSION})
    )
    return out


def cache_dir() -> Path:
    root = os.environ.get("RECROUTE_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "vllm-recroute" / "models"


def _cache_key(arch: str, seed: int, preset: str) -> str:
    """The cache directory's key. A checkpoint with remote code carries a copy of
    ``tiny_remote/<arch>.py``, so that source's digest is in the key: editing it rebuilds
    only that architecture's cached model (the others keep their directories and bytes)."""
    text = f"{arch}-{seed}-{preset}-{_FORMAT_VERSION}"
    source = Path(__file__).parent / "tiny_remote" / f"{arch}.py"
    if source.exists():
        text += "-" + hashlib.sha1(source.read_bytes()).hexdigest()
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def cached_tiny_model(
    arch: str = "idefics3", seed: int = 0, preset: str = "tiny", root: str | None = None
) -> Path:
    """Build once into the cache (``$RECROUTE_CACHE_DIR``) and return the directory."""
    key = _cache_key(arch, seed, preset)
    out = (Path(root) if root else cache_dir()) / f"{arch}-{preset}-s{seed}-{key}"
    if (out / "recroute_tiny.json").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    build_tiny_model(tmp, arch=arch, seed=seed, preset=preset)
    try:
        tmp.rename(out)  # atomic: concurrent builders never see a half-written model
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out
