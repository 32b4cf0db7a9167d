"""vllm-recroute: recoverable visual-token routing for vision-language models in vLLM.

`register()` is the `vllm.general_plugins` entry point. vLLM calls it in every process
(API server, engine core, workers), possibly more than once, so it is idempotent and light:
dotted paths for the architectures, the config hook (patch P2), the stage spec, and the
runner selection (P9: it must be in place before any VllmConfig decides V1 or V2). The
step patch (P1) is applied by the routed model classes themselves, in the worker.
"""

from __future__ import annotations

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Register the routed architectures with vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    from vllm_recroute._compat import check_vllm_version

    check_vllm_version()

    from vllm import ModelRegistry

    from vllm_recroute.engine_setup import register_config_hooks
    from vllm_recroute.models import ROUTED_ARCHITECTURES

    for arch, dotted in ROUTED_ARCHITECTURES.items():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, dotted)
    register_config_hooks(ROUTED_ARCHITECTURES)
    from vllm_recroute.engine_setup import CONNECTOR_NAME
    from vllm_recroute.patches import apply_runner_selection
    from vllm_recroute.platform_patches import apply_cpu_torch_shims, apply_thread_policy

    apply_runner_selection(ROUTED_ARCHITECTURES)
    apply_thread_policy(CONNECTOR_NAME)
    apply_cpu_torch_shims()
    from vllm_recroute.kv.manager import register_stage_spec

    # The engine core needs the stage manager class, the worker the spec class; both only
    # matter with recroute.kv_release, but registering is cheap and idempotent.
    register_stage_spec()
    _registered = True
