"""Routed Qwen2.5-VL (Qwen2 text backbone, M-RoPE positions).

Not importable on CPU hosts without torchvision (vLLM's Qwen2-VL processing imports it);
registered by dotted path only, so nothing imports this module unless it is selected.
M-RoPE positions ([3, T]) go through the same row gather as 1-D positions.
"""

from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

from vllm_recroute.worker.decoder import RoutedDecoder


class RecrouteQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.recroute = RoutedDecoder(
            self, self.language_model.model, vllm_config, image_token_id=self.config.image_token_id
        )
