"""Routed PaliGemma (Gemma text backbone).

vLLM's `get_vision_encoder_info` imports its Pixtral module, whose HF image processor needs
torchvision, before looking at the (SigLIP) vision config; on a CPU host without
torchvision that breaks plain PaliGemma at startup. PaliGemma's tower is always SigLIP, so
the routed class registers its processor with a processing info that builds the SigLIP
encoder info directly (same values, no Pixtral import). Nothing in vLLM is changed.
"""

from vllm.model_executor.models.paligemma import (
    PaliGemmaDummyInputsBuilder,
    PaliGemmaForConditionalGeneration,
    PaliGemmaMultiModalProcessor,
    PaliGemmaProcessingInfo,
)
from vllm.model_executor.models.siglip import SiglipEncoderInfo
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_recroute.worker.decoder import RoutedDecoder


class _SiglipPaliGemmaProcessingInfo(PaliGemmaProcessingInfo):
    def get_vision_encoder_info(self):
        return SiglipEncoderInfo(self.get_hf_config())


@MULTIMODAL_REGISTRY.register_processor(
    PaliGemmaMultiModalProcessor,
    info=_SiglipPaliGemmaProcessingInfo,
    dummy_inputs=PaliGemmaDummyInputsBuilder,
)
class RecroutePaliGemmaForConditionalGeneration(PaliGemmaForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.recroute = RoutedDecoder(
            self,
            self.language_model.model,
            vllm_config,
            image_token_id=self.config.image_token_index,
        )
