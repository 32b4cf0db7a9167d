"""KV tiers: the pure parts and the scheduler-side block management.

- ``spec``: `RoutedStageSpec` (one KV-cache group per routing stage);
- ``manager``: `RoutedStageManager`, the stage group's scheduler-side block manager, and
  ``register_stage_spec`` (the spec -> manager pair in vLLM's registry);
- ``table_view``: `ReleasedRows`, the worker's compacted view of a stage group's rows;
- ``parked_pool``: `ParkedPool`, the bounded host pool of parked blocks (pure torch);
- ``pages``: `KVPageIO`, slot reads and writes through the attention backend;
- ``turn_index``: `TurnIndex`, the scheduler's index of kept turns (pure).

Submodules are imported explicitly: the pure ones do not need vLLM.
"""
