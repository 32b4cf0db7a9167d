"""Routed MiniCPM-V (the Qwen2 backbone: version 2.6; the other versions' text models too).

vLLM's ``MiniCPMV`` is a dispatcher: its ``__new__`` builds the version class that
``config.version`` names (``MiniCPMV2_6`` for the Qwen2 backbone) and returns it. The
routed class keeps that dispatch (and the multimodal processor vLLM registers on
``MiniCPMV``) and installs the routed decoder on the built model's text model
(``llm.model``). vLLM marks the ``<unk>`` run inside each ``<image>...</image>``
placeholder as the image embeddings (``PromptUpdateDetails.select_token_ids``): the
routed id is the tokenizer's ``<unk>``.
"""

from vllm.model_executor.models.minicpmv import MiniCPMV

from vllm_recroute.worker.decoder import RoutedDecoder


def unk_token_id(config, model_config) -> int:
    """The ``<unk>`` id: recorded in the config (this project's tiny checkpoints) or
    read from the tokenizer, as vLLM's processor does."""
    if getattr(config, "image_token_id", None):
        return int(config.image_token_id)
    from vllm.tokenizers import cached_tokenizer_from_config

    return int(cached_tokenizer_from_config(model_config).get_vocab()["<unk>"])


class RecrouteMiniCPMV(MiniCPMV):
    def __new__(cls, *, vllm_config, prefix: str = ""):
        # MiniCPMV.__new__ returns an initialised version-class instance (not a `cls`,
        # so no __init__ runs after this)
        model = super().__new__(cls, vllm_config=vllm_config, prefix=prefix)
        model.recroute = RoutedDecoder(
            model,
            model.llm.model,
            vllm_config,
            image_token_id=unk_token_id(model.config, vllm_config.model_config),
        )
        return model
