"""Routed LLaVA (Llama/Mistral/Vicuna text backbones).

Not importable on CPU hosts without torchvision (its HF image processor imports it);
registered by dotted path only.
"""

from vllm.model_executor.models.llava import LlavaForConditionalGeneration

from vllm_recroute.worker.decoder import RoutedDecoder


class RecrouteLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.recroute = RoutedDecoder(
            self,
            self.language_model.model,
            vllm_config,
            image_token_id=self.config.image_token_index,
        )
