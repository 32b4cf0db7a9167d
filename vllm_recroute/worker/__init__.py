"""Worker side of routing: the routed decoder, its runtime and the KV tiers' worker halves.

A straight stack, each module importing only those after it (tests/unit/test_layers.py):

- ``decoder``: `RoutedDecoder`, installs routing on a vLLM decoder stack (one per model):
  layer wrappers, stage-spec reports, the CustomOp switch, forward hooks;
- ``step``: `StepRouter`, one forward pass: scoring, decisions, the routed path;
- ``runtime``: `WorkerRuntime`, the one owner of a worker's routing state and the
  connector's worker API;
- ``turns``: `TurnStore`, kept turns (save, load);
- ``parking``: `ParkingTier`, the parked tier's worker half (park, swap, forget), and the
  tier's geometry (page I/O, compacted positions, page rows);

and its leaves:

- ``rows``: which rows of a step are routed (classification, no state changed);
- ``segments``: a step's segments, their rows, the once-per-segment gather and scatter;
- ``layer_runs``: a range of decoder layers as one piece (eager, or compiled);
- ``compaction``: segments of layers, compacted attention metadata, live block tables;
- ``state``: `RouteStore`, per-request routing state across steps;
- ``projections``: q/k/v of residual-stream rows through a layer's attention input path;
- ``tp``: one routing decision on every tensor-parallel rank.

Engine settings routing needs (every process) are ``vllm_recroute/engine_setup.py``.
"""
