"""Routed MiniCPM-V 2.6 (Qwen2 text backbone; SigLIP/Idefics2 tower + resampler).

vLLM's ``MiniCPMV`` dispatches on ``config.version`` in ``__new__``; the Qwen2 backbone is
version 2.6 (``MiniCPMV2_6``), which this class routes. The multimodal processor is
registered on the dispatcher class only, so it is registered here again. vLLM marks the
``<unk>`` run inside each ``<image>...</image>`` placeholder as the image embeddings
(``PromptUpdateDetails.select_token_ids``): the routed id is the tokenizer's ``<unk>``.
"""

from vllm.model_executor.models.minicpmv import (
    MiniCPMV,
    MiniCPMV2_6,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_recroute.worker.decoder import RoutedDecoder


def unk_token_id(config, model_config) -> int:
    """The ``<unk>`` id: recorded in the config (this project's tiny checkpoints) or
    read from the tokenizer, as vLLM's processor does."""
    if getattr(config, "image_token_id", None):
        return int(config.image_token_id)
    from vllm.tokenizers import cached_tokenizer_from_config

    return int(cached_tokenizer_from_config(model_config).get_vocab()["<unk>"])


_factories = MiniCPMV._processor_factory


@MULTIMODAL_REGISTRY.register_processor(
    _factories.processor, info=_factories.info, dummy_inputs=_factories.dummy_inputs
)
class RecrouteMiniCPMV(MiniCPMV2_6):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        image_token_id = unk_token_id(self.config, vllm_config.model_config)
        self.recroute = RoutedDecoder(
            self, self.llm.model, vllm_config, image_token_id=image_token_id
        )
