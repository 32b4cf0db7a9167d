"""Scheduling of routed prompts under vLLM's chunked prefill.

- ``chunking``: the chunk rule, pure (a routed prompt's span from its first image to its
  end goes in one step);
- ``scheduler``: `RoutedChunkScheduler`, vLLM's scheduler applying it
  (``SchedulerConfig.scheduler_cls``, installed by engine_setup.py).
"""

__all__ = ["SCHEDULER_PATH"]

# What the config hook writes into SchedulerConfig.scheduler_cls: resolved by its dotted path
# in the engine core process, so the front end never imports vLLM's scheduler for it.
SCHEDULER_PATH = "vllm_recroute.sched.scheduler.RoutedChunkScheduler"
