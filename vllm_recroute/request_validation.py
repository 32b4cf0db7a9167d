"""Front-end validation of per-request routing options, so a bad one is an HTTP 400.

vLLM validates each request's `SamplingParams` at admission, in the front-end process,
by calling `validate_params` of every custom logits processor of the model
(`ModelConfig.logits_processors`), and turns its error into HTTP 400 naming the field.
The config hook adds `RequestOptionsValidator` there for routed architectures only. Its
`apply` returns the logits untouched: it exists for the admission hook, nothing else.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from vllm_recroute.config import RoutingConfig, RoutingConfigError
from vllm_recroute.request_options import PREFIX, config_for_extra_args

FQCN = "vllm_recroute.request_validation:RequestOptionsValidator"

# The server's routing config, set by the config hook in the process that builds the
# VllmConfig (the front end): validate_params is a classmethod and sees no config.
_server_config: RoutingConfig | None = None


def set_server_config(cfg: RoutingConfig) -> None:
    global _server_config
    _server_config = cfg


def validate_request(extra_args: dict[str, Any] | None) -> RoutingConfig | None:
    """The request's effective routing config, or VLLMValidationError naming the field."""
    if not extra_args or not any(k.startswith(PREFIX) for k in extra_args):
        return None
    base = _server_config or RoutingConfig(mode="off")
    try:
        return config_for_extra_args(base, extra_args)
    except RoutingConfigError as err:
        raise VLLMValidationError(str(err), parameter=err.field) from None


class RequestOptionsValidator(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        validate_request(getattr(sampling_params, "extra_args", None))

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
