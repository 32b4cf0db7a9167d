"""Phi-3-Vision config, image processor and processor for the tiny test checkpoint.

What vLLM's `phi3v.py` reads: a Phi-3 text config at the top level (model type
``phi3_v``) with ``img_processor`` (``image_dim_out`` 1024, ``layer_idx``: vLLM builds
its fixed CLIP ViT-L/14-336 tower only up to that layer) and ``embd_layer`` (HD
transform, learnable separators, ``sub_glb`` order); an image processor that fits the
image into at most ``num_crops`` tiles of 336 px (``pixel_values [n, num_crops + 1, 3,
336, 336]``: the global view first, then the tiles, zero-padded; ``image_sizes [n, 2]``
= the tiled image's (height, width)); a processor exposing ``img_tokens`` (the
``<|image_i|>`` tags vLLM replaces) and ``calc_num_image_tokens_from_image_size``.
Images only.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
from PIL import Image
from transformers import Phi3Config
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin

TILE = 336  # the fixed CLIP ViT-L/14-336 input
TOKENS_PER_SIDE = 12  # 24 x 24 patches, merged 2 x 2
IMAGE_TOKEN_ID = 32044  # hard-coded in vLLM's phi3v.py
MAX_IMAGES = 8


class Phi3VConfig(Phi3Config):
    model_type = "phi3_v"

    def __init__(
        self, img_processor: dict | None = None, embd_layer: dict | None = None, **kwargs
    ) -> None:
        self.img_processor = img_processor or {}
        self.embd_layer = embd_layer or {}
        super().__init__(**kwargs)


def tiled_size(width: int, height: int, num_crops: int) -> tuple[int, int, int, int]:
    """(content width, content height, padded width, padded height): the image resized
    so that its long side fills whole 336-px tiles, as many as fit in ``num_crops``
    tiles in all, then its short side padded to whole tiles."""
    turned = width < height
    long, short = (height, width) if turned else (width, height)
    ratio = long / short
    tiles = 1
    while (tiles + 1) * math.ceil((tiles + 1) / ratio) <= num_crops:
        tiles += 1
    new_long = tiles * TILE
    new_short = int(new_long / ratio)
    padded_short = math.ceil(new_short / TILE) * TILE
    if turned:
        return new_short, new_long, padded_short, new_long
    return new_long, new_short, new_long, padded_short


class Phi3VImageProcessor(BaseImageProcessor):
    model_input_names: ClassVar[list[str]] = ["pixel_values", "image_sizes"]

    def __init__(
        self,
        num_crops: int = 1,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.num_crops = num_crops
        self.image_mean = image_mean or [0.48145466, 0.4578275, 0.40821073]
        self.image_std = image_std or [0.26862954, 0.26130258, 0.27577711]

    def _normalise(self, image: Image.Image) -> np.ndarray:
        x = np.asarray(image, dtype=np.float32) / 255.0
        x = (x - np.array(self.image_mean, np.float32)) / np.array(self.image_std, np.float32)
        return x.transpose(2, 0, 1)  # [3, H, W]

    def _one(self, image: Image.Image, num_crops: int) -> tuple[np.ndarray, list[int]]:
        image = image.convert("RGB")
        cw, ch, w, h = tiled_size(image.width, image.height, num_crops)
        # the padding around the content is white (before normalisation)
        canvas = Image.new("RGB", (w, h), (255, 255, 255))
        canvas.paste(image.resize((cw, ch), Image.BICUBIC), ((w - cw) // 2, (h - ch) // 2))
        tiles = self._normalise(canvas)  # [3, h, w]
        rows, cols = h // TILE, w // TILE
        tiles = tiles.reshape(3, rows, TILE, cols, TILE).transpose(1, 3, 0, 2, 4)
        tiles = tiles.reshape(rows * cols, 3, TILE, TILE)
        glob = self._normalise(canvas.resize((TILE, TILE), Image.BICUBIC))[None]
        crops = np.zeros((num_crops + 1, 3, TILE, TILE), np.float32)
        crops[: rows * cols + 1] = np.concatenate([glob, tiles])
        return crops, [h, w]

    def __call__(self, images, return_tensors=None, num_crops: int | None = None, **kwargs):
        if isinstance(images, Image.Image):
            images = [images]
        flat = [im for item in images for im in (item if isinstance(item, list) else [item])]
        out = [self._one(im, num_crops or self.num_crops) for im in flat]
        data = {
            "pixel_values": np.stack([o[0] for o in out]),
            "image_sizes": np.array([o[1] for o in out], dtype=np.int64),
        }
        return BatchFeature(data=data, tensor_type=return_tensors)

    preprocess = __call__

    def num_image_tokens(self, width: int, height: int) -> int:
        """Tiles of 12 x 12 merged patches with a separator per row, the global
        separator, the global view's 12 x 12 with row separators (vLLM's
        Phi3HDImageEmbedding)."""
        _, _, w, h = tiled_size(width, height, self.num_crops)
        return tokens_of_tiled(w, h)


def tokens_of_tiled(width: int, height: int) -> int:
    """Tokens of an image tiled to ``width x height`` (multiples of 336)."""
    rows, cols, side = height // TILE, width // TILE, TOKENS_PER_SIDE
    return rows * side * (cols * side + 1) + 1 + side * (side + 1)


class Phi3VProcessor(ProcessorMixin):
    img_tokens: ClassVar[list[str]] = [f"<|image_{i}|>" for i in range(1, MAX_IMAGES + 1)]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def calc_num_image_tokens_from_image_size(self, width: int, height: int) -> int:
        return self.image_processor.num_image_tokens(width, height)

    def __call__(self, text=None, images=None, return_tensors=None, **kwargs):
        """Image tags ``<|image_i|>`` become that image's run of IMAGE_TOKEN_ID."""
        texts = [text] if isinstance(text, str) else list(text or [])
        data: dict = {}
        counts: list[int] = []
        if images:
            img = self.image_processor(images, return_tensors=None)
            data.update(img)
            counts = [tokens_of_tiled(int(w), int(h)) for h, w in img["image_sizes"]]
        ids = []
        for t in texts:
            row: list[int] = []
            pieces = t.split("<|image_")
            row += self.tokenizer(pieces[0], add_special_tokens=False).input_ids
            for piece in pieces[1:]:
                num, _, rest = piece.partition("|>")
                row += [IMAGE_TOKEN_ID] * counts[int(num) - 1]
                row += self.tokenizer(rest, add_special_tokens=False).input_ids
            ids.append(row)
        data["input_ids"] = ids
        data["attention_mask"] = [[1] * len(r) for r in ids]
        return BatchFeature(data=data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_sizes"]
