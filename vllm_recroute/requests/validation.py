"""Front-end validation of per-request routing options, so a bad one is an HTTP 400.

vLLM validates each request's `SamplingParams` at admission, in the front-end process,
by calling `validate_params` of every custom logits processor of the model
(`ModelConfig.logits_processors`), and turns its error into HTTP 400 naming the field.
The config hook adds a validator class there for routed architectures only. Its `apply`
returns the logits untouched: it exists for the admission hook, nothing else.

`validate_params` is a classmethod and sees no engine config, so each server config gets
its own validator class carrying it (`validator_for`): two engines in one process (tests,
notebooks) validate against their own configs. The class travels to the engine-core and
worker processes inside the pickled VllmConfig; a copyreg reducer rebuilds it there from
the config's JSON.
"""

from __future__ import annotations

import copyreg
from typing import Any, ClassVar

import torch
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from vllm_recroute.config import RoutingConfig
from vllm_recroute.errors import RoutingConfigError
from vllm_recroute.requests.options import PREFIX, config_for_extra_args


def validate_request(
    base: RoutingConfig, extra_args: dict[str, Any] | None
) -> RoutingConfig | None:
    """The request's effective routing config, or VLLMValidationError naming the field."""
    if not extra_args or not any(k.startswith(PREFIX) for k in extra_args):
        return None
    try:
        return config_for_extra_args(base, extra_args)
    except RoutingConfigError as err:
        raise VLLMValidationError(str(err), parameter=err.field) from None


class RequestOptionsValidator(LogitsProcessor):
    server_config: ClassVar[RoutingConfig] = RoutingConfig(mode="off")

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        validate_request(cls.server_config, getattr(sampling_params, "extra_args", None))

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


class _ValidatorMeta(type(LogitsProcessor)):  # type: ignore[misc]
    """Metaclass of per-config validator classes (so copyreg can pickle them by value)."""


_CLASSES: dict[str, type[RequestOptionsValidator]] = {}


def validator_for(cfg: RoutingConfig) -> type[RequestOptionsValidator]:
    """The validator class of one server config (one class per distinct config)."""
    key = cfg.model_dump_json()
    cls = _CLASSES.get(key)
    if cls is None:
        cls = _ValidatorMeta(
            "RequestOptionsValidator",
            (RequestOptionsValidator,),
            {"server_config": cfg, "__module__": __name__},
        )
        _CLASSES[key] = cls
    return cls


def _validator_from_json(config_json: str) -> type[RequestOptionsValidator]:
    return validator_for(RoutingConfig.model_validate_json(config_json))


def _reduce_validator(cls: type[RequestOptionsValidator]) -> tuple:
    return _validator_from_json, (cls.server_config.model_dump_json(),)


copyreg.pickle(_ValidatorMeta, _reduce_validator)


def is_validator(entry: Any) -> bool:
    return isinstance(entry, type) and issubclass(entry, RequestOptionsValidator)
