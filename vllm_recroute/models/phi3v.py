"""Routed Phi-3-Vision (Phi-3 text backbone: fused qkv and gate/up projections).

vLLM runs Phi-3's text as its Llama model (``architectures=["LlamaForCausalLM"]`` over
the fused checkpoint weights), so the decoder the wrapper routes is a LlamaModel; its
image placeholders are all ``_IMAGE_TOKEN_ID`` (32044), row separators included.
"""

from vllm.model_executor.models.phi3v import Phi3VForCausalLM

from vllm_recroute.worker.decoder import RoutedDecoder


class RecroutePhi3VForCausalLM(Phi3VForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.recroute = RoutedDecoder(
            self, self.language_model.model, vllm_config, image_token_id=self.image_token_id
        )
