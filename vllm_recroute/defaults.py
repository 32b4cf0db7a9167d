"""What ``vllm-recroute serve`` turns on with no flags, and the ``--routing`` argument.

The savings on by default: PyramidDrop reroute, deferred pages back to vLLM's pool
(``kv_release``), deferred units parked in host memory and swapped back while decoding,
the pool sized from the memory available at startup.
"""

from __future__ import annotations

import os

from vllm_recroute.config import RoutingConfig
from vllm_recroute.errors import RoutingConfigError
from vllm_recroute.routing.schedule import SCHEDULES

__all__ = [
    "DEFAULT_REROUTE_EVERY",
    "DEFAULT_ROUTING",
    "default_parked_bytes",
    "default_routing",
    "parse_routing_arg",
]

# `vllm-recroute serve` without --routing: the savings on (pdrop reroute, deferred pages
# back to vLLM's pool, deferred K/V parked in host memory and swapped back while decoding).
DEFAULT_ROUTING = "default"
DEFAULT_REROUTE_EVERY = 8
PARKED_FRACTION = 0.05  # of the host memory available at startup
PARKED_CAP = 4 << 30
PARKED_FLOOR = 64 << 20


def default_parked_bytes(available_bytes: int | None = None) -> int:
    """Host bytes for the default parked pool: 5% of the memory available at startup,
    at least 64 MiB, at most 4 GiB (per worker process: per tensor-parallel rank)."""
    if available_bytes is None:
        available_bytes = _available_memory()
    size = min(PARKED_CAP, max(PARKED_FLOOR, PARKED_FRACTION * available_bytes))
    return int(size) >> 20 << 20  # whole MiB


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def default_routing(available_bytes: int | None = None) -> RoutingConfig:
    return RoutingConfig(
        schedule="pdrop",
        kv_release=True,
        parked_bytes=default_parked_bytes(available_bytes),
        reroute_every=DEFAULT_REROUTE_EVERY,
    )


def parse_routing_arg(routing: str, keep: float | None = None) -> RoutingConfig:
    """CLI helper: ``routing`` is ``default``, ``off``, ``fastv``, ``pdrop`` or a JSON object
    string. ``default`` is :func:`default_routing`; ``fastv``/``pdrop`` route compute only
    (no page release, no parked tier).

    ``keep`` (if given) overrides the budget, clearing ``avg_visual_tokens``.
    """
    text = routing.strip()
    if text == DEFAULT_ROUTING:
        cfg = default_routing()
    elif text == "off":
        cfg = RoutingConfig(mode="off")
    elif text in SCHEDULES and text != "custom":
        cfg = RoutingConfig(schedule=text)
    elif text.startswith("{"):
        cfg = RoutingConfig.from_dict(text)
    else:
        raise RoutingConfigError(
            "--routing",
            f"got {routing!r}; allowed values: default, off, fastv, pdrop or a JSON object",
        )
    return cfg if keep is None else cfg.with_overrides({"keep": keep})
