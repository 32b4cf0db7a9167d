"""Parked-block tier (groundwork; see docs/parked_tier.md).

- ``spec``: `RoutedStageSpec` (one KV-cache group per routing stage) and its registration;
- ``manager``: `RoutedStageManager`, the stage group's scheduler-side block manager;
- ``table_view``: `CompactedRow`, the worker-side mirror of a stage group's row;
- ``parked_pool``: `ParkedPool`, the bounded host pool of parked blocks (pure torch).

Submodules are imported explicitly: ``parked_pool`` does not need vLLM.
"""
