"""What every tiny builder shares: model shapes, the tokenizer, saving, the cache.

A builder (one module per architecture, listed in `registry.py`) writes a checkpoint from
these pieces: the text and vision shapes of a preset (``TEXT``, ``VISION``, with
``init_std``), a byte-level BPE tokenizer trained on a fixed corpus (``build_tokenizer``),
``save`` (a transformers model and processor) or ``save_weights`` (a hand-made state
dict), and for remote code ``save_remote_processor`` (copies ``remote/<module>.py`` into
the checkpoint). The cache (``cache_dir``, ``cache_key``, ``build_cached``) is keyed by
(arch, seed, preset, ``FORMAT_VERSION``) and, for a checkpoint with remote code, by the
digest of that module's source.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw

if TYPE_CHECKING:
    import torch

PRESETS: tuple[str, ...] = ("tiny", "smolvlm-256m")
FORMAT_VERSION = 4  # bump when the builders' output changes, so caches are rebuilt
MARKER = "recroute_tiny.json"  # written last: a directory that has it is complete
REMOTE_DIR = Path(__file__).parent / "remote"  # the remote code copied into checkpoints

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

TEXT = {
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
VISION = {
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


def init_std(cfg: dict) -> float:
    # HF's default 0.02 makes a random tiny model emit one token whatever the input, which
    # would let routing bugs pass unseen; 1/sqrt(width) keeps outputs input-dependent.
    return cfg["hidden_size"] ** -0.5


def linear(n_in: int, n_out: int) -> dict[str, torch.Tensor]:
    import torch

    # 1/sqrt(fan_in) keeps a random tower's features input-dependent (see init_std)
    return {
        "weight": torch.randn(n_out, n_in) * n_in**-0.5,
        "bias": torch.randn(n_out) * 0.02,
    }


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v.contiguous() for k, v in tensors.items()}


# --------------------------------------------------------------------------- saving


def save(model: Any, proc: Any, out: Path) -> None:
    """A transformers model, its processor and generation config."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    proc.save_pretrained(out)
    model.generation_config.save_pretrained(out)


def save_weights(tensors: dict[str, torch.Tensor], out: Path) -> None:
    """A hand-made state dict as ``model.safetensors``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        out / "model.safetensors",
        metadata={"format": "pt"},
    )


def remote_source(module: str) -> Path:
    """The source of remote module ``module`` (``remote/<module>.py``)."""
    return REMOTE_DIR / f"{module}.py"


def _add_auto_map(path: Path, auto_map: dict[str, str]) -> None:
    data = json.loads(path.read_text())
    data["auto_map"] = auto_map
    if isinstance(data.get("image_processor"), dict):  # transformers 5 nests it here
        data["image_processor"]["auto_map"] = auto_map
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_remote_processor(proc: Any, out: Path, module: str, image_cls: str, proc_cls: str) -> None:
    """Save a processor whose classes live in ``remote/<module>.py``: the module is copied
    into the checkpoint as ``recroute_<module>.py`` and the processor configs point to it
    (loaded with ``trust_remote_code``)."""
    proc.save_pretrained(out)
    name = f"recroute_{module}"
    shutil.copyfile(remote_source(module), out / f"{name}.py")
    auto = {"AutoImageProcessor": f"{name}.{image_cls}", "AutoProcessor": f"{name}.{proc_cls}"}
    for cfg in ("preprocessor_config.json", "processor_config.json"):
        if (out / cfg).exists():
            _add_auto_map(out / cfg, auto)


def write_marker(out: Path, arch: str, seed: int, preset: str) -> None:
    """The last file of a build: what it is (and that it is complete)."""
    (out / MARKER).write_text(
        json.dumps({"arch": arch, "seed": seed, "preset": preset, "format": FORMAT_VERSION})
    )


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    root = os.environ.get("RECROUTE_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "vllm-recroute" / "models"


def cache_key(arch: str, seed: int, preset: str, remote: str | None = None) -> str:
    """The cache directory's key. A checkpoint with remote code carries a copy of
    ``remote/<remote>.py``, so that source's digest (of its bytes, wherever the file
    lives) is in the key: editing it rebuilds only that architecture's cached model (the
    others keep their directories and bytes)."""
    text = f"{arch}-{seed}-{preset}-{FORMAT_VERSION}"
    if remote is not None:
        text += "-" + hashlib.sha1(remote_source(remote).read_bytes()).hexdigest()
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def build_cached(out: Path, build: Callable[[Path], object]) -> Path:
    """``out`` if a complete build is there, else ``build`` it there: into a temporary
    sibling first, renamed at the end (atomic: concurrent builders never see a
    half-written model; the loser of a race drops its copy)."""
    if (out / MARKER).exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    build(tmp)
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
