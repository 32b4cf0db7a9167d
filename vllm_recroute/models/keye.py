"""Routed Keye-VL (Qwen3 text backbone, M-RoPE positions).

The M-RoPE architecture that runs on this project's CPU hosts: vLLM's keye.py imports no
torchvision. Its decoder gets ``[3, T]`` positions, which the routed wrapper gathers
per active row like 1-D positions (worker/compaction.take_positions); the same wrapper
is what Qwen2.5-VL / Qwen3-VL run on GPU hosts.
"""

from vllm.model_executor.models.keye import KeyeForConditionalGeneration

from vllm_recroute.worker.decoder import RoutedDecoder


class RecrouteKeyeForConditionalGeneration(KeyeForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.recroute = RoutedDecoder(
            self, self.language_model.model, vllm_config, image_token_id=self.config.image_token_id
        )
