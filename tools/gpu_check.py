"""One command that checks the plugin on a GPU host (and exercises the same code on CPU).

    python tools/gpu_check.py --phase micro|configs|engine|oracle|speed|all   (make gpu-check)

Each phase prints one JSON object on its own line, ``{"phase": ..., "ok": true|false, ...}``;
the exit code is 0 iff every phase run is ok. ``all`` runs each phase in its own
interpreter (a fresh CUDA context, no engine left over, and ``micro`` without vLLM).
Nothing is downloaded: the models are the project's random-weight tiny checkpoints, built
locally (``vllm_recroute.tiny.cached_tiny_model``). docs/deploy.md, "GPU hosts:
refused settings", says what each phase shows and how long it takes.

* micro: ``tests.device_checks.run_all(device)`` ("cuda" on a GPU, "fake" = FakeCuda on
  CPU), with no vLLM module imported;
* configs: the resolved config of a routed model (runner, CUDA graph mode, splitting ops,
  async scheduling, compilation mode; on CPU a simulated Triton host) and every startup
  refusal of engine_setup.py with the setting it names;
* engine: a routed tiny Idefics3 at vLLM's defaults (GPU: bf16, CUDA graphs, async
  scheduling), routed and unrouted requests, forwards by path;
* oracle: float32 (GPU: Triton attention) against reference/oracle.py, greedy tokens, with the
  attention metadata each routed layer received;
* speed: TPOT of plain vLLM V1 piecewise, plain vLLM at its defaults and routed pdrop.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# tests.device_checks, tests.helpers, reference.oracle and bench/ import from the repo root.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PHASES = ("micro", "configs", "engine", "oracle", "speed")
# Per phase, under ``all`` (seconds; the sum stays under 10 minutes on one GPU).
TIMEOUTS = {"micro": 60, "configs": 90, "engine": 150, "oracle": 150, "speed": 240}
ROUTED_ARCH = "RecrouteIdefics3ForConditionalGeneration"  # = tests.helpers.ROUTED_IDEFICS3


@dataclass(frozen=True)
class PhaseResult:
    phase: str
    ok: bool
    details: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return json.dumps({"phase": self.phase, "ok": self.ok, **self.details}, default=str)


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------ micro


def phase_micro() -> PhaseResult:
    """The device checks, without vLLM (they test the plugin's tensor code, not vLLM's)."""
    device = "cuda" if on_gpu() else "fake"
    try:
        from tests.device_checks import run_all
    except ImportError as err:
        return PhaseResult("micro", False, {"device": device, "error": f"no device checks: {err}"})
    results = run_all(device)
    failed = {name: res for name, res in results.items() if res != "ok"}
    vllm_modules = sorted(m for m in sys.modules if m == "vllm" or m.startswith("vllm."))
    return PhaseResult(
        "micro",
        not failed and not vllm_modules and bool(results),
        {
            "device": device,
            "checks": len(results),
            "failed": failed,
            "vllm_modules_imported": vllm_modules[:10],
        },
    )


# ------------------------------------------------------------------ configs


@contextmanager
def env(**values: str | None) -> Iterator[None]:
    """Set (or, for None, unset) environment variables for the block."""
    saved = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def triton_host() -> Iterator[bool]:
    """Yield whether this host is real CUDA; on CPU, make vLLM see Triton (it then picks
    Model Runner V2, as on every CUDA host), as tests/integration/test_engine_config.py."""
    import vllm.config.vllm as vllm_config_module

    real = on_gpu()
    saved = vllm_config_module.HAS_TRITON
    if not real:
        vllm_config_module.HAS_TRITON = True
    try:
        with env(VLLM_USE_V2_MODEL_RUNNER=None):
            yield real
    finally:
        vllm_config_module.HAS_TRITON = saved


def engine_config(model: str, routed: bool, recroute: dict | None = None, **kwargs: Any) -> Any:
    from vllm.engine.arg_utils import EngineArgs

    args: dict[str, Any] = dict(model=model, max_model_len=1024, **kwargs)
    if routed:
        args["hf_overrides"] = {"architectures": [ROUTED_ARCH]}
        args["additional_config"] = {"recroute": recroute or {"schedule": "pdrop"}}
    return EngineArgs(**args).create_engine_config()


def describe_config(cfg: Any) -> dict[str, Any]:
    comp = cfg.compilation_config
    return {
        "runner": "V2" if cfg.use_v2_model_runner else "V1",
        "cudagraph_mode": comp.cudagraph_mode.name,
        "splitting_ops": list(comp.splitting_ops or []),
        "async_scheduling": bool(cfg.scheduler_config.async_scheduling),
        "compilation_mode": getattr(comp.mode, "name", str(comp.mode)),
        "inductor_graph_partition": comp.use_inductor_graph_partition,
    }


def with_sections(cfg: Any, **sections: dict[str, Any]) -> Any:
    """A copy of a built config with some sections' fields changed (the hook reads these)."""
    from vllm.config import VllmConfig

    out = VllmConfig.__new__(VllmConfig)
    out.__dict__.update(cfg.__dict__)
    for name, changes in sections.items():
        section = copy.deepcopy(getattr(cfg, name))
        for key, value in changes.items():
            target = section
            *path, last = key.split(".")
            for part in path:
                target = getattr(target, part)
            setattr(target, last, value)
        out.__dict__[name] = section
    return out


@dataclass(frozen=True)
class Refusal:
    setting: str  # what the error must name
    run: Callable[[str, Any], Any]  # (model dir, a built routed config) -> raises


def _rehook(**sections: dict[str, Any]) -> Callable[[str, Any], Any]:
    from vllm_recroute.engine_setup import apply_routing_requirements

    return lambda model, built: apply_routing_requirements(with_sections(built, **sections))


def _under_env(**values: str) -> Callable[[str, Any], Any]:
    def run(model: str, built: Any) -> Any:
        with env(**values):
            return engine_config(model, routed=True)

    return run


def refusals() -> list[Refusal]:
    """One case per refusal of engine_setup.py (docs/deploy.md)."""
    comp = "compilation_config"
    par = "parallel_config"
    cases = [
        Refusal("VLLM_USE_BREAKABLE_CUDAGRAPH", _under_env(VLLM_USE_BREAKABLE_CUDAGRAPH="1")),
        Refusal(
            "PYTORCH_CUDA_ALLOC_CONF",
            _under_env(PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True"),
        ),
        Refusal(
            f"{comp}.use_inductor_graph_partition",
            _rehook(**{comp: {"use_inductor_graph_partition": True}}),
        ),
        Refusal("parallel_config.enable_dbo", _rehook(**{par: {"enable_dbo": True}})),
    ]
    for name in ("fuse_rope_kvcache", "fuse_qk_norm_rope_kvcache", "fuse_rope_kvcache_cat_mla"):
        cases.append(
            Refusal(f"{comp}.pass_config.{name}", _rehook(**{comp: {f"pass_config.{name}": True}}))
        )
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        cases.append(Refusal(f"{par}.{name}", _rehook(**{par: {name: 2}})))
    return cases


def check_refusal(case: Refusal, model: str, built: Any) -> str:
    """'ok', or what went wrong (no error, or an error that does not name the setting)."""
    try:
        case.run(model, built)
    except ValueError as err:
        return "ok" if f"{case.setting}: " in str(err) else f"wrong error: {err}"[:300]
    return "not refused"


def phase_configs() -> PhaseResult:
    import vllm_recroute
    from vllm_recroute.tiny import cached_tiny_model

    vllm_recroute.register()
    model = str(cached_tiny_model("idefics3"))
    with triton_host() as real:
        plain = describe_config(engine_config(model, routed=False))
        built = engine_config(model, routed=True)
        routed = describe_config(built)
        refused = {case.setting: check_refusal(case, model, built) for case in refusals()}
    problems = [f"{k}: {v}" for k, v in refused.items() if v != "ok"]
    if routed["runner"] != "V1":
        problems.append("routed config does not select the V1 runner")
    if routed["cudagraph_mode"] not in ("PIECEWISE", "NONE"):
        problems.append(f"routed cudagraph_mode {routed['cudagraph_mode']}")
    if real and routed["cudagraph_mode"] != "PIECEWISE":
        problems.append("a CUDA host should keep piecewise CUDA graphs")
    return PhaseResult(
        "configs",
        not problems,
        {
            "host": "cuda" if real else "cpu (simulated Triton host)",
            "plain": plain,
            "routed": routed,
            "refusals": refused,
            "problems": problems,
        },
    )


# ------------------------------------------------------------------ engines (shared)


def engine_kwargs(defaults: bool) -> dict[str, Any]:
    """make_llm overrides: vLLM's defaults (compiled, graphs) or the oracle's float32."""
    if defaults:
        return {"enforce_eager": False, "dtype": "bfloat16" if on_gpu() else "float32"}
    out: dict[str, Any] = {"enforce_eager": False, "dtype": "float32"}
    if on_gpu():
        out["attention_backend"] = "TRITON_ATTN"
    return out


def resolved(llm: Any) -> dict[str, Any]:
    """What the engine runs with: the config's view and the worker's runner class."""
    info = describe_config(llm.llm_engine.vllm_config)
    info["dtype"] = str(llm.llm_engine.vllm_config.model_config.dtype)
    info["runner_class"] = llm.collective_rpc(_runner_class)[0]
    return info


def _runner_class(worker: Any) -> str:
    return type(worker.model_runner).__name__


def _forwards(worker: Any) -> dict[str, int]:
    return dict(worker.model_runner.model.recroute.forwards)


# ------------------------------------------------------------------ engine


def phase_engine() -> PhaseResult:
    from tests.helpers import CONFIGS, MAX_TOKENS, generate, make_llm, route_counters, shutdown
    from vllm_recroute.tiny import cached_tiny_model

    model = cached_tiny_model("idefics3")
    llm = make_llm(
        model, routed_arch=ROUTED_ARCH, recroute={"mode": "reroute"}, **engine_kwargs(True)
    )
    try:
        cfgs = [CONFIGS["pdrop-reroute"], CONFIGS["off"], CONFIGS["fastv-remove"]]
        outs = generate(llm, model, cfgs)
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        forwards = llm.collective_rpc(_forwards)[0]
        routed = route_counters(llm)["routed_requests"]
        info = resolved(llm)
    finally:
        shutdown(llm)
    problems = []
    if lengths != [MAX_TOKENS] * len(cfgs):
        problems.append(f"token counts {lengths}")
    if routed != 2:
        problems.append(f"{routed} routed requests, expected 2")
    if not forwards.get("eager"):
        problems.append("no eager (rows moved) forward")
    return PhaseResult(
        "engine",
        not problems,
        {"config": info, "forwards": forwards, "routed_requests": routed, "problems": problems},
    )


# ------------------------------------------------------------------ oracle

ORACLE_BATCHES = {
    "fastv-reroute": ["fastv-reroute"] * 3,
    "fastv-remove": ["fastv-remove"] * 3,
    "pdrop-reroute": ["pdrop-reroute"] * 3,
    "pdrop-remove": ["pdrop-remove"] * 3,
    "mixed": ["pdrop-remove", "off", "custom-reroute-question"],
}
_META_FIELDS = ("num_actual_tokens", "max_query_len", "max_seq_len", "query_start_loc", "seq_lens")


def _record_metadata(worker: Any) -> None:
    """Wrap vllm_view.install_layer_attention in the worker: log what each routed layer is
    given (the log lives on the decoder: this function is pickled by value)."""
    from vllm_recroute import vllm_view

    decoder = worker.model_runner.model.recroute
    decoder.gpu_check_log = log = []
    original = vllm_view.install_layer_attention

    def install(layer_name: str, metadata: Any, slot_mapping: Any) -> None:
        import torch

        if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            entry = {"layer": layer_name, "slots": int(slot_mapping.numel())}
            for name in _META_FIELDS:
                value = getattr(metadata, name, None)
                entry[name] = value.tolist() if isinstance(value, torch.Tensor) else value
            log.append(entry)
        original(layer_name, metadata, slot_mapping)

    vllm_view.install_layer_attention = install


def _metadata_log(worker: Any) -> list[dict]:
    return list(getattr(worker.model_runner.model.recroute, "gpu_check_log", []))


def metadata_mismatches(log: list[dict]) -> list[dict]:
    """Entries whose metadata disagree with themselves: slots written vs query rows, or a
    request whose sequence is shorter than its query."""
    bad = []
    for entry in log:
        qsl, seq = entry.get("query_start_loc"), entry.get("seq_lens")
        rows = entry.get("num_actual_tokens")
        if rows is None and qsl:
            rows = qsl[-1]
        if rows is not None and rows != entry["slots"]:
            bad.append({**entry, "why": "slots != query rows"})
        elif qsl and seq:
            queries = [b - a for a, b in itertools.pairwise(qsl)]
            if any(s < q for s, q in zip(seq, queries, strict=False)):
                bad.append({**entry, "why": "seq_len < query_len"})
    return bad


def summarize_log(log: list[dict]) -> dict[str, Any]:
    layers = sorted({e["layer"] for e in log})
    return {
        "installs": len(log),
        "layers": len(layers),
        "first": {k: log[0].get(k) for k in ("layer", "slots", "query_start_loc", "seq_lens")}
        if log
        else None,
    }


def phase_oracle() -> PhaseResult:
    from transformers import AutoModelForImageTextToText

    from tests.helpers import CONFIGS, REQUESTS, generate, make_llm, oracle, shutdown
    from vllm_recroute.tiny import cached_tiny_model

    model = cached_tiny_model("idefics3")
    llm = make_llm(
        model, routed_arch=ROUTED_ARCH, recroute={"mode": "reroute"}, **engine_kwargs(False)
    )
    try:
        llm.collective_rpc(_record_metadata)
        got = {
            name: generate(llm, model, [CONFIGS[c] for c in cfgs])
            for name, cfgs in ORACLE_BATCHES.items()
        }
        log = llm.collective_rpc(_metadata_log)[0]
        info = resolved(llm)
    finally:
        shutdown(llm)
    hf = AutoModelForImageTextToText.from_pretrained(
        str(model), dtype="float32", attn_implementation="eager"
    ).eval()
    mismatches = []
    for name, cfgs in ORACLE_BATCHES.items():
        for spec, cfg_name, out in zip(REQUESTS, cfgs, got[name], strict=True):
            _, expected = oracle(hf, model, spec, CONFIGS[cfg_name])
            tokens = list(out.outputs[0].token_ids)
            if tokens != expected:
                mismatches.append(
                    {"batch": name, "config": cfg_name, "got": tokens, "expected": expected}
                )
    bad_meta = metadata_mismatches(log)
    return PhaseResult(
        "oracle",
        not mismatches and not bad_meta and bool(log),
        {
            "config": info,
            "batches": list(ORACLE_BATCHES),
            "token_mismatches": mismatches,
            "metadata": summarize_log(log),
            "metadata_mismatches": bad_meta[:5],
        },
    )


# ------------------------------------------------------------------ speed


@dataclass(frozen=True)
class SpeedEngine:
    name: str
    routed: bool
    kwargs: dict[str, Any]
    environ: dict[str, str | None]


def speed_engines() -> list[SpeedEngine]:
    dtype = "bfloat16" if on_gpu() else "float32"
    base = {"enforce_eager": False, "dtype": dtype}
    return [
        SpeedEngine(
            "plain V1 piecewise",
            False,
            {**base, "compilation_config": {"cudagraph_mode": "PIECEWISE"}},
            {"VLLM_USE_V2_MODEL_RUNNER": "0"},
        ),
        SpeedEngine("plain defaults", False, base, {"VLLM_USE_V2_MODEL_RUNNER": None}),
        SpeedEngine("routed pdrop", True, base, {"VLLM_USE_V2_MODEL_RUNNER": None}),
    ]


def measure(engine: SpeedEngine, model: Path, requests: list[dict], max_tokens: int) -> dict:
    from bench.throughput import _pass
    from tests.helpers import make_llm, shutdown

    with env(**engine.environ):
        llm = make_llm(
            model,
            routed_arch=ROUTED_ARCH if engine.routed else None,
            recroute={"mode": "reroute", "schedule": "pdrop"},
            **engine.kwargs,
        )
        try:
            _pass(llm, requests[:2], 4, "warm")
            stats = _pass(llm, requests, max_tokens, "run")
            info = resolved(llm)
        finally:
            shutdown(llm)
    return {
        "runner": info["runner"],
        "cudagraph_mode": info["cudagraph_mode"],
        "tpot_ms": round(1000 * stats["tpot_median_s"], 2),
        "ttft_ms": round(1000 * stats["ttft_median_s"], 2),
    }


def phase_speed(preset: str | None) -> PhaseResult:
    from bench.throughput import _requests
    from vllm_recroute.tiny import cached_tiny_model

    preset = preset or ("smolvlm-256m" if on_gpu() else "tiny")
    model = cached_tiny_model("idefics3", preset=preset)
    n, max_tokens = (8, 32) if on_gpu() else (4, 8)
    requests = _requests(str(model), n, 512 if preset != "tiny" else 128)
    rows = {e.name: measure(e, model, requests, max_tokens) for e in speed_engines()}
    base = rows["plain defaults"]["tpot_ms"]
    for row in rows.values():
        row["tpot_x_defaults"] = round(row["tpot_ms"] / base, 3) if base else None
    ok = all(r["tpot_ms"] > 0 for r in rows.values()) and rows["routed pdrop"]["runner"] == "V1"
    return PhaseResult(
        "speed", ok, {"preset": preset, "requests": n, "max_tokens": max_tokens, "engines": rows}
    )


# ------------------------------------------------------------------ driver


def run_phase(name: str, args: argparse.Namespace) -> PhaseResult:
    started = time.perf_counter()
    try:
        if name == "micro":
            result = phase_micro()
        elif name == "configs":
            result = phase_configs()
        elif name == "speed":
            result = phase_speed(args.speed_preset)
        else:
            result = {"engine": phase_engine, "oracle": phase_oracle}[name]()
    except Exception as err:  # a phase that crashes is a failed phase, with its error
        result = PhaseResult(name, False, {"error": f"{type(err).__name__}: {err}"[:2000]})
    details = {**result.details, "seconds": round(time.perf_counter() - started, 1)}
    return PhaseResult(result.phase, result.ok, details)


def run_isolated(name: str, args: argparse.Namespace) -> PhaseResult:
    """Run one phase in a fresh interpreter; its last JSON line is its result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", name]
    if args.speed_preset:
        cmd += ["--speed-preset", args.speed_preset]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=TIMEOUTS[name], cwd=str(ROOT)
        )
    except subprocess.TimeoutExpired:
        return PhaseResult(name, False, {"error": f"timed out after {TIMEOUTS[name]} s"})
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{") and f'"phase": "{name}"' in line:
            data = json.loads(line)
            return PhaseResult(
                name, bool(data.pop("ok")), {k: v for k, v in data.items() if k != "phase"}
            )
    return PhaseResult(name, False, {"error": "no result", "stderr_tail": proc.stderr[-2000:]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", choices=[*PHASES, "all"], default="all")
    parser.add_argument("--speed-preset", choices=["tiny", "smolvlm-256m"], default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(callable)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.phase == "all":
        results = []
        for name in PHASES:
            results.append(run_isolated(name, args))
            print(results[-1].line(), flush=True)
    else:
        results = [run_phase(args.phase, args)]
        print(results[0].line(), flush=True)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
