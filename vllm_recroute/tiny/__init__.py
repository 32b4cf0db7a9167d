"""Deterministic random-weight VLMs built locally (no model hub): tests, benchmarks, `serve`.

`build_tiny_model(out, arch, seed, preset)` writes a complete HF checkpoint directory:
config, safetensors weights, a tokenizer trained with `tokenizers` on a fixed corpus,
image processor, processor and chat template. The same (arch, seed, preset) always gives
the same bytes, so a session-wide cache keyed by those is safe (`cached_tiny_model`).

- ``registry.py``: ``TINY_ARCHS`` (one `TinyArch` per architecture: its builder, the HF
  architecture its config names, its presets, its remote code), ``build_tiny_model``,
  ``cached_tiny_model``;
- ``common.py``: what the builders share (shapes of the presets, tokenizer, saving,
  the cache directory and key) and ``make_test_image``;
- one builder per architecture: ``idefics3.py`` (presets ``tiny`` and ``smolvlm-256m``),
  ``paligemma.py``, ``keye.py``, ``phi3v.py``, ``minicpmv.py`` (``tiny`` only);
- ``remote/``: the config and processor classes transformers does not ship (Keye-VL,
  Phi-3-Vision, MiniCPM-V), copied into their checkpoints as remote code.
"""

from vllm_recroute.tiny.common import (
    PRESETS,
    build_tokenizer,
    cache_dir,
    make_test_image,
)
from vllm_recroute.tiny.registry import (
    ARCHS,
    TINY_ARCHS,
    TinyArch,
    build_tiny_model,
    cached_tiny_model,
    get_arch,
)

__all__ = [
    "ARCHS",
    "PRESETS",
    "TINY_ARCHS",
    "TinyArch",
    "build_tiny_model",
    "build_tokenizer",
    "cache_dir",
    "cached_tiny_model",
    "get_arch",
    "make_test_image",
]
