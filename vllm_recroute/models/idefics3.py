"""Routed Idefics3 / SmolVLM (Llama text backbone)."""

from vllm.model_executor.models.idefics3 import Idefics3ForConditionalGeneration

from vllm_recroute.worker.decoder import RoutedDecoder


class RecrouteIdefics3ForConditionalGeneration(Idefics3ForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.recroute = RoutedDecoder(
            self, self.model.text_model, vllm_config, image_token_id=self.config.image_token_id
        )
