"""Keye-VL config, image processor and processor for the tiny test checkpoint.

The shapes vLLM's `keye.py` reads: a Qwen3 text config at the top level with an M-RoPE
``rope_parameters["mrope_section"]``, a SigLIP ``vision_config`` with
``spatial_merge_size``; an image processor that resizes to multiples of
``patch_size * merge_size`` (``size = {min_pixels, max_pixels}``), cuts the image into
patches in raster order (``pixel_values [patches, 3, p, p]``, ``image_grid_thw [n, 3]``);
a processor that expands each ``<|image_pad|>`` into ``t*h*w / merge_size**2`` tokens.
Videos as the published processor takes them (vLLM's memory profiling sends one at
startup unless ``--limit-mm-per-prompt`` sets video to 0): a clip of frames (a
``[T, H, W, 3]`` array or a list of images), every frame resized and cut like an image
(temporal patch 1), ``pixel_values_videos`` and ``video_grid_thw`` ``[T, h, w]``, each
``<|video_pad|>`` expanded like an image's.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
from PIL import Image
from transformers import Qwen3Config, SiglipVisionConfig
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_transforms import to_pil_image
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

    def _one(self, image, size: tuple[int, int] | None = None) -> tuple[np.ndarray, list[int]]:
        """An image (PIL, array or tensor, as real processors accept) as raster-order
        patches and its grid [1, rows, columns]; ``size`` (h, w): a video's frame size."""
        p = self.patch_size
        image = _to_pil(image)
        h, w = size or self._resized(image)
        image = image.resize((w, h), Image.BICUBIC)
        x = np.asarray(image, dtype=np.float32) / 255.0
        x = (x - np.array(self.image_mean, np.float32)) / np.array(self.image_std, np.float32)
        x = x.transpose(2, 0, 1)  # [3, H, W]
        gh, gw = h // p, w // p
        patches = x.reshape(3, gh, p, gw, p).transpose(1, 3, 0, 2, 4)  # raster order
        return patches.reshape(gh * gw, 3, p, p), [1, gh, gw]

    def _resized(self, image: Image.Image) -> tuple[int, int]:
        factor = self.patch_size * self.merge_size
        return smart_resize(image.height, image.width, factor, **self._bounds())

    def _video(self, video) -> tuple[np.ndarray, list[int]]:
        """A clip's frames at the first frame's size (temporal patch 1: one grid step
        per frame), patches frame after frame, grid [frames, rows, columns]."""
        if isinstance(video, tuple):  # (frames, metadata), as vLLM's parser may pass
            video = video[0]
        frames = [_to_pil(f) for f in video]
        size = self._resized(frames[0])
        out = [self._one(f, size) for f in frames]
        return np.concatenate([o[0] for o in out]), [len(out), *out[0][1][1:]]

    def _bounds(self) -> dict[str, int]:
        return {"min_pixels": self.size["min_pixels"], "max_pixels": self.size["max_pixels"]}

    def __call__(self, images=None, videos=None, return_tensors=None, **kwargs) -> BatchFeature:
        data: dict = {}
        if images is not None:
            out = [self._one(im) for im in _flat(images)]
            data["pixel_values"] = np.concatenate([o[0] for o in out])
            data["image_grid_thw"] = np.array([o[1] for o in out], dtype=np.int64)
        if videos is not None:
            clips = [self._video(v) for v in videos]
            data["pixel_values_videos"] = np.concatenate([c[0] for c in clips])
            data["video_grid_thw"] = np.array([c[1] for c in clips], dtype=np.int64)
        return BatchFeature(data=data, tensor_type=return_tensors)

    preprocess = __call__


def _to_pil(image) -> Image.Image:
    # vLLM hands video frames over as uint8 arrays; to_pil_image infers the channel axis
    # and rescaling as the published processors do
    if not isinstance(image, Image.Image):
        image = to_pil_image(image)
    return image.convert("RGB")


def _flat(images) -> list:
    """One image, a list of images or a list of lists, as one flat list."""
    if not isinstance(images, (list, tuple)):
        return [images]
    return [im for item in images for im in (item if isinstance(item, list) else [item])]


class KeyeProcessor(ProcessorMixin):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def __call__(self, text=None, images=None, videos=None, return_tensors=None, **kwargs):
        texts = [text] if isinstance(text, str) else list(text or [])
        data: dict = {}
        if images:
            img = self.image_processor(images=images, return_tensors=None)
            data.update(img)
            texts = self._expand(texts, self.image_token, img["image_grid_thw"])
        if videos:
            vid = self.image_processor(videos=videos, return_tensors=None)
            data.update(vid)
            texts = self._expand(texts, self.video_token, vid["video_grid_thw"])
        kwargs.pop("images_kwargs", None)
        text_kwargs = {k: v for k, v in kwargs.items() if k in ("padding", "truncation")}
        enc = self.tokenizer(texts, **text_kwargs)
        data.update(enc)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _expand(self, texts: list[str], token: str, grids) -> list[str]:
        """Each ``token`` as its item's ``t*h*w / merge_size**2`` copies, in order."""
        merge = self.image_processor.merge_size**2
        counts = iter([int(np.prod(g)) // merge for g in grids])
        marker = "<|recroute_placeholder|>"  # so a replaced run is not matched again
        expanded = []
        for t in texts:
            while token in t:
                t = t.replace(token, marker * next(counts), 1)
            expanded.append(t.replace(marker, token))
        return expanded

    @property
    def model_input_names(self) -> list[str]:
        return [
            "input_ids", "attention_mask", "pixel_values", "image_grid_thw",
            "pixel_values_videos", "video_grid_thw",
        ]  # fmt: skip
