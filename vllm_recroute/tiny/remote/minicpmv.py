"""MiniCPM-V 2.6 config, image processor and processor for the tiny test checkpoint.

What vLLM's `minicpmv.py` reads (``version`` 2.6: Qwen2 text, SigLIP/Idefics2 tower,
one-layer perceiver resampler to ``query_num`` tokens per slice): a Qwen2 text config
at the top level (model type ``minicpmv``) with a SigLIP ``vision_config``,
``query_num``, ``image_size``, ``drop_vision_last_layer``; an image processor (loaded
from ``auto_map["AutoImageProcessor"]``; vLLM wraps it in its own vendored
MiniCPMVProcessor) exposing ``get_sliced_grid`` / ``get_slice_image_placeholder`` /
``image_feature_size`` / ``max_slice_nums`` and returning, per sample, ``pixel_values``
(a list of slices, each ``[3, patch, n_patches * patch]``: the patches side by side in
raster order), ``image_sizes`` (the originals' ``(width, height)``) and ``tgt_sizes``
(``[slices, 2]`` patch rows and columns).

This checkpoint never slices: every image is resized to one ``image_size`` square
(``get_sliced_grid`` is None), so an image is ``<image_id>i</image_id><image>`` +
``query_num`` x ``<unk>`` + ``</image>``; vLLM marks the ``<unk>`` run as the image
embeddings. Video frames (vLLM's memory profiling sends a clip at startup unless
``--limit-mm-per-prompt`` sets video to 0) arrive as a sample of ``[H, W, 3]`` arrays,
which are converted to images first, as the published image processor does.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2Config, SiglipVisionConfig
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_transforms import to_pil_image
from transformers.processing_utils import ProcessorMixin

IMAGE_PATTERN = "(<image>./</image>)"


class MiniCPMVConfig(Qwen2Config):
    model_type = "minicpmv"
    sub_configs: ClassVar[dict] = {"vision_config": SiglipVisionConfig}

    def __init__(
        self,
        vision_config: dict | None = None,
        version: float = 2.6,
        query_num: int = 64,
        image_size: int = 448,
        max_slice_num: int = 1,
        slice_mode: bool = False,
        use_image_id: bool = True,
        drop_vision_last_layer: bool = False,
        batch_vision_input: bool = True,
        image_token_id: int = 0,
        **kwargs,
    ) -> None:
        if isinstance(vision_config, dict):
            vision_config = SiglipVisionConfig(**vision_config)
        self.vision_config = vision_config or SiglipVisionConfig()
        self.version = version
        self.query_num = query_num
        self.image_size = image_size
        self.max_slice_num = max_slice_num
        self.slice_mode = slice_mode
        self.use_image_id = use_image_id
        self.drop_vision_last_layer = drop_vision_last_layer
        self.batch_vision_input = batch_vision_input
        # the `<unk>` id (vLLM's embedding placeholder); recorded for the routed class
        self.image_token_id = image_token_id
        super().__init__(**kwargs)


class MiniCPMVImageProcessor(BaseImageProcessor):
    model_input_names: ClassVar[list[str]] = ["pixel_values", "image_sizes", "tgt_sizes"]

    def __init__(
        self,
        image_size: int = 64,
        patch_size: int = 8,
        image_feature_size: int = 64,
        max_slice_nums: int = 1,
        use_image_id: bool = True,
        slice_mode: bool = False,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.image_size = image_size
        self.patch_size = patch_size
        self.image_feature_size = image_feature_size
        self.max_slice_nums = max_slice_nums
        self.use_image_id = use_image_id
        self.slice_mode = slice_mode
        self.image_mean = image_mean or [0.5, 0.5, 0.5]
        self.image_std = image_std or [0.5, 0.5, 0.5]
        self.im_start_token, self.im_end_token = "<image>", "</image>"
        self.slice_start_token, self.slice_end_token = "<slice>", "</slice>"
        self.im_id_start, self.im_id_end = "<image_id>", "</image_id>"
        self.unk_token = "<unk>"

    # ---------------------------------------------------------------- token layout

    def get_sliced_grid(self, image_size, max_slice_nums: int | None = None, **kwargs):
        """The slice grid (columns, rows): None, this checkpoint never slices."""
        return None

    def get_slice_image_placeholder(
        self,
        image_size,
        image_idx: int = 0,
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
    ) -> str:
        text = self.im_start_token + self.unk_token * self.image_feature_size + self.im_end_token
        use_id = self.use_image_id if use_image_id is None else use_image_id
        if use_id:
            text = f"{self.im_id_start}{image_idx}{self.im_id_end}" + text
        return text

    # ---------------------------------------------------------------- pixels

    def _slice(self, image: Image.Image) -> tuple[torch.Tensor, list[int]]:
        """One slice ``[3, p, n * p]`` (patches side by side) and its (rows, columns)."""
        side, p = self.image_size, self.patch_size
        image = image.resize((side, side), Image.BICUBIC)
        x = np.asarray(image, dtype=np.float32) / 255.0
        x = (x - np.array(self.image_mean, np.float32)) / np.array(self.image_std, np.float32)
        x = torch.from_numpy(x).permute(2, 0, 1)  # [3, H, W]
        rows, cols = side // p, side // p
        # [3, rows, p, cols, p] -> [3, p, rows, cols, p] -> [3, p, rows * cols * p]
        x = x.reshape(3, rows, p, cols, p).permute(0, 2, 1, 3, 4)
        return x.reshape(3, p, rows * cols * p).contiguous(), [rows, cols]

    def __call__(self, images, return_tensors=None, **kwargs):
        """``images``: one image, a list of images (one sample) or a list of lists."""
        if isinstance(images, Image.Image):
            images = [[images]]
        elif images and isinstance(images[0], Image.Image):
            images = [list(images)]
        pixel_values, image_sizes, tgt_sizes = [], [], []
        for sample in images:
            # a video is one sample of frames (a [T, H, W, 3] array iterates as frames)
            sample = [_to_pil(im) for im in sample]
            slices = [self._slice(im) for im in sample]
            pixel_values.append([s[0] for s in slices])
            image_sizes.append([(im.width, im.height) for im in sample])
            tgt_sizes.append(torch.tensor([s[1] for s in slices], dtype=torch.int32))
        data = {"pixel_values": pixel_values, "image_sizes": image_sizes, "tgt_sizes": tgt_sizes}
        return BatchFeature(data=data)  # nested lists of tensors: left as they are

    preprocess = __call__


def _to_pil(image) -> Image.Image:
    # video frames come as uint8 arrays; to_pil_image infers the channel axis and
    # rescaling as the published processor's to_pil_image step does
    if not isinstance(image, Image.Image):
        image = to_pil_image(image)
    return image.convert("RGB")


class MiniCPMVProcessor(ProcessorMixin):
    """Prompt side of the checkpoint: its chat template, and ``(<image>./</image>)``
    tags expanded to the image processor's placeholders (vLLM uses its own vendored
    processor; this one is for transformers-side callers)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def __call__(self, text=None, images=None, return_tensors=None, **kwargs):
        texts = [text] if isinstance(text, str) else list(text or [])
        data: dict = {}
        if images:
            data.update(self.image_processor(images))
        ids = []
        for t in texts:
            pieces = t.split(IMAGE_PATTERN)
            full = pieces[0]
            for i, rest in enumerate(pieces[1:]):
                full += self.image_processor.get_slice_image_placeholder(None, image_idx=i) + rest
            ids.append(self.tokenizer(full, add_special_tokens=False).input_ids)
        data["input_ids"] = ids
        data["attention_mask"] = [[1] * len(r) for r in ids]
        return BatchFeature(data=data)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_sizes", "tgt_sizes"]
