"""Routed Qwen3-VL (Qwen3 text backbone, M-RoPE positions, deepstack visual features).

Not importable on CPU hosts without torchvision (vLLM's Qwen3-VL processing imports it);
registered by dotted path only. Its text model's decoder layers are Qwen3's, which run
routed here through Keye-VL (q/k norm, M-RoPE gather). Deepstack adds visual features to
the hidden states after the first decoder layers, outside the layers: with a router point
among those layers, deferred visual rows receive them on the residual stream like active
ones, since the routed path ends a piece after each such layer (``run_breaks``) and the
addition meets the full stream. Not verified here (docs/architecture.md, "Architectures").
"""

from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration

from vllm_recroute.worker.decoder import RoutedDecoder


class RecrouteQwen3VLForConditionalGeneration(Qwen3VLForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # deepstack: one visual feature level added after each of layers 0 .. levels - 1
        levels = len(getattr(self.config.vision_config, "deepstack_visual_indexes", None) or ())
        self.recroute = RoutedDecoder(
            self,
            self.language_model.model,
            vllm_config,
            image_token_id=self.config.image_token_id,
            run_breaks=range(1, levels + 1),
        )
