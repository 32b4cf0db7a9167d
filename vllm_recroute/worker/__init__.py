"""Worker side of routing: the routed decoder and the KV tiers' worker halves.

- ``decoder``: `RoutedDecoder`, installs routing on a vLLM decoder stack (one per model);
- ``step``: `StepRouter`, one forward pass: row classification, scoring, decisions;
- ``compaction``: segments of layers, compacted attention metadata, live block tables;
- ``state``: `RouteStore`, per-request routing state across steps;
- ``projections``: q/k/v of residual-stream rows through a layer's attention input path;
- ``parking``: `ParkingTier`, the parked tier's worker half (park, swap, forget);
- ``turns``: `TurnStore`, kept turns (save, load);
- ``config_hook``: engine settings routing needs, applied before the engine is built.
"""
