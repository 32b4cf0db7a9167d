"""Patch P8: media a client sends that vLLM cannot load is a client error (HTTP 400).

vLLM's OpenAI server maps ``VLLMValidationError`` (and raw ``ValueError``) to 400, but four
failures inside its media loading escape as other types and become 500 or 501:

- ``file://`` without ``--allowed-local-media-path``: ``RuntimeError`` (500);
- an image over PIL's decompression-bomb limit: ``PIL.Image.DecompressionBombError``, which
  is not an ``OSError``, so ``ImageMediaIO.load_bytes`` lets it through (500);
- a ``data:`` URL that is not base64: ``NotImplementedError`` (501);
- ``image_embeds`` bytes that are not a tensor: ``pickle.UnpicklingError`` / ``RuntimeError``
  / ``EOFError`` from ``torch.load`` (500).

The wrappers below turn exactly those into ``VLLMValidationError`` naming the input, at the
loader that raises them: in the API server, while the request is rendered, before any
engine work. Applied by the endpoint plugin (``RecrouteEndpoints.attach_router``), so it
is active on servers that load it (`vllm-recroute serve` does) and never changes offline
``vllm.LLM``. The pixel budget itself is vLLM's own ``VLLM_MAX_IMAGE_PIXELS`` (checked
from the image header, before decoding); see docs/deploy.md, "Operations".
"""

from __future__ import annotations

import functools
import pickle
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["apply_media_patch"]

_lock = threading.Lock()
_MARK = "__recroute_patched__"

# torch.load's failures on bytes that are not a saved tensor (weights_only=True).
_EMBED_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
)


def apply_media_patch() -> None:
    """Install P8 (idempotent, thread-safe)."""
    from PIL import Image
    from vllm.multimodal.media.connector import MediaConnector
    from vllm.multimodal.media.image import ImageEmbeddingMediaIO, ImageMediaIO

    with _lock:
        if getattr(MediaConnector._load_file_url, _MARK, False):
            return
        MediaConnector._load_file_url = _refuse_local_files(MediaConnector._load_file_url)
        MediaConnector._load_data_url = _as_client_error(
            MediaConnector._load_data_url, (NotImplementedError,), "image_url"
        )
        ImageMediaIO.load_bytes = _as_client_error(
            ImageMediaIO.load_bytes, (Image.DecompressionBombError,), "image_url"
        )
        ImageEmbeddingMediaIO.load_bytes = _as_client_error(
            ImageEmbeddingMediaIO.load_bytes, _EMBED_DECODE_ERRORS, "image_embeds"
        )


def _refuse_local_files(original: Callable[..., Any]) -> Callable[..., Any]:
    """Check the server's local-media setting first: the client asked for something this
    server does not offer, which is a 400, not vLLM's RuntimeError (500)."""

    @functools.wraps(original)
    def _load_file_url(self: Any, url_spec: Any, media_io: Any) -> Any:
        if self.allowed_local_media_path is None:
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(
                "file:// URLs are not accepted by this server (it was started without "
                "--allowed-local-media-path); send the image as a data: or http(s) URL",
                parameter="image_url",
            )
        return original(self, url_spec, media_io)

    setattr(_load_file_url, _MARK, True)
    return _load_file_url


def _as_client_error(
    original: Callable[..., Any], errors: tuple[type[BaseException], ...], parameter: str
) -> Callable[..., Any]:
    """``original`` with ``errors`` (raised on the client's bytes) as VLLMValidationError."""

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        except errors as exc:
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(
                f"cannot load {parameter}: {exc}", parameter=parameter
            ) from exc

    setattr(wrapper, _MARK, True)
    return wrapper
