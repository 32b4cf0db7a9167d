"""Keye-VL config, image processor and processor for the tiny test checkpoint.

The shapes vLLM's `keye.py` reads: a Qwen3 text config at the top level with an M-RoPE
``rope_parameters["mrope_section"]``, a SigLIP ``vision_config`` with
``spatial_merge_size``; an image processor that resizes to multiples of
``patch_size * merge_size`` (``size = {min_pixels, max_pixels}``), cuts the image into
patches in raster order (``pixel_values [patches, 3, p, p]``, ``image_grid_thw [n, 3]``);
a processor that expands each ``<|image_pad|>`` into ``t*h*w / merge_size**2`` tokens.
Images only (no video).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
from PIL import Image
from transformers import Qwen3Config, SiglipVisionConfig
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin


class KeyeVisionConfig(SiglipVisionConfig):
    model_type = "keye_vision"

    def __init__(self, spatial_merge_size: int = 2, **kwargs) -> None:
        super().__init__(**kwargs)
        self.spatial_merge_size = spatial_merge_size


class KeyeConfig(Qwen3Config):
    model_type = "Keye"
    sub_configs: ClassVar[dict] = {"vision_config": KeyeVisionConfig}

    def __init__(
        self,
        vision_config: dict | None = None,
        image_token_id: int = 0,
        video_token_id: int = 0,
        **kwargs,
    ) -> None:
        if isinstance(vision_config, dict):
            vision_config = KeyeVisionConfig(**vision_config)
        self.vision_config = vision_config or KeyeVisionConfig()
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        super().__init__(**kwargs)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int):
    """Nearest size with both sides multiples of ``factor`` and area in the bounds (the
    rule vLLM's keye.py uses to count an image's tokens)."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


class KeyeImageProcessor(BaseImageProcessor):
    model_input_names: ClassVar[list[str]] = ["pixel_values", "image_grid_thw"]

    def __init__(
        self,
        patch_size: int = 8,
        merge_size: int = 2,
        size: dict | None = None,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.merge_size = merge_size
        self.temporal_patch_size = 1
        self.size = size or {"min_pixels": 32 * 32, "max_pixels": 128 * 128}
        self.image_mean = image_mean or [0.5, 0.5, 0.5]
        self.image_std = image_std or [0.5, 0.5, 0.5]

    def _one(self, image: Image.Image) -> tuple[np.ndarray, list[int]]:
        p = self.patch_size
        image = image.convert("RGB")
        h, w = smart_resize(image.height, image.width, p * self.merge_size, **self._bounds())
        image = image.resize((w, h), Image.BICUBIC)
        x = np.asarray(image, dtype=np.float32) / 255.0
        x = (x - np.array(self.image_mean, np.float32)) / np.array(self.image_std, np.float32)
        x = x.transpose(2, 0, 1)  # [3, H, W]
        gh, gw = h // p, w // p
        patches = x.reshape(3, gh, p, gw, p).transpose(1, 3, 0, 2, 4)  # raster order
        return patches.reshape(gh * gw, 3, p, p), [1, gh, gw]

    def _bounds(self) -> dict[str, int]:
        return {"min_pixels": self.size["min_pixels"], "max_pixels": self.size["max_pixels"]}

    def __call__(self, images, return_tensors=None, **kwargs) -> BatchFeature:
        if isinstance(images, Image.Image):
            images = [images]
        flat = [im for item in images for im in (item if isinstance(item, list) else [item])]
        out = [self._one(im) for im in flat]
        data = {
            "pixel_values": np.concatenate([o[0] for o in out]),
            "image_grid_thw": np.array([o[1] for o in out], dtype=np.int64),
        }
        return BatchFeature(data=data, tensor_type=return_tensors)

    preprocess = __call__


class KeyeProcessor(ProcessorMixin):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def __call__(self, text=None, images=None, videos=None, return_tensors=None, **kwargs):
        if videos:
            raise ValueError("this test processor handles images only")
        texts = [text] if isinstance(text, str) else list(text or [])
        data: dict = {}
        if images:
            img = self.image_processor(images, return_tensors=None)
            data.update(img)
            merge = self.image_processor.merge_size**2
            counts = iter([int(np.prod(g)) // merge for g in img["image_grid_thw"]])
            marker = "<|recroute_placeholder|>"
            expanded = []
            for t in texts:
                while self.image_token in t:
                    t = t.replace(self.image_token, marker * next(counts), 1)
                expanded.append(t.replace(marker, self.image_token))
            texts = expanded
        kwargs.pop("images_kwargs", None)
        text_kwargs = {k: v for k, v in kwargs.items() if k in ("padding", "truncation")}
        enc = self.tokenizer(texts, **text_kwargs)
        data.update(enc)
        return BatchFeature(data=data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_thw"]
