"""Routed PaliGemma (Gemma text backbone)."""

from vllm.model_executor.models.paligemma import PaliGemmaForConditionalGeneration

from vllm_recroute.models.routed import RoutedDecoder


class RecroutePaliGemmaForConditionalGeneration(PaliGemmaForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.recroute = RoutedDecoder(
            self.language_model.model, vllm_config, image_token_id=self.config.image_token_index
        )
