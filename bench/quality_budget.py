"""The budget sweep of bench/quality.py: which rows (full, and remove / reroute per
schedule, budget and scorer), and running them through the routed engine with each row's
routing options per request, measuring retention with the engine's own accounting.

``plan`` lists the rows: budgets of 33%, 22% and 11% average visual-token retention as
``avg_visual_tokens``; pdrop rows fall back to PyramidDrop's 64-token layout (router points
2, 6, 12 of 32, scaled) where its default first point cannot reach a budget; a budget the
router points cannot reach is one unreachable row, never run. ``run_rows`` runs them
(a row whose resolved stages equal an earlier row's takes its results) and fills in each
row's accuracy, measured retention (1 - deferred / visual token-layers from the worker's
``Ledger``) and mean active visual tokens per stage.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from typing import Any

from bench import common

RETENTIONS = (1 / 3, 2 / 9, 1 / 9)  # 192, 128, 64 of 576
SCHEDULES = ("fastv", "pdrop", "sparsevlm")
MODES = ("remove", "reroute")
SCORERS: dict[str, dict[str, str]] = {
    "attn-last": {"recroute_scorer": "attention", "recroute_score_query": "last"},
    "attn-question": {"recroute_scorer": "attention", "recroute_score_query": "question"},
    "key_norm": {"recroute_scorer": "key_norm"},
}
# PyramidDrop's 64-token setting on 32-layer LLaVA: router points 2, 6, 12
PDROP_EARLY = (2 / 32, 6 / 32, 12 / 32)
GROUNDING = "where"
BENCH_SEED = 10_500_000  # held-out range, disjoint from training seeds and training-time eval
FULL = "full (off)"


@dataclass
class Row:
    name: str
    mode: str
    schedule: str | None = None
    scorer: str = "attn-last"
    target: float | None = None  # average visual-token retention asked for
    xargs: dict[str, Any] = field(default_factory=dict)
    points: tuple[int, ...] = ()
    keeps: tuple[int, ...] = ()  # visual tokens active per routed stage (resolved)
    resolved: float = 1.0  # average retention of the resolved stages (analytic)
    reachable: bool = True
    measured: float | None = None  # 1 - deferred / visual token-layers, from the ledger
    stage_active: tuple[float, ...] = ()  # measured mean active visual tokens per stage
    stage_returned: tuple[float, ...] = ()  # mean tokens per request back at stages 2, 3, ...
    acc: dict[str, Any] = field(default_factory=dict)
    exists_split: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    same_as: str | None = None  # an earlier row with the same resolved stages (not rerun)
    vs: str | None = None  # paper protocol: the removal row this reroute row is matched to

    @property
    def key(self) -> str:  # names repeat across scorers
        return f"{self.name} [{self.scorer}]"

    def partner(self, rows: list[Row]) -> Row:
        """The other mode's row of the same layout, budget and scorer."""
        other = {"reroute": "remove", "remove": "reroute"}[self.mode]
        name = self.name.replace(self.mode, other, 1)
        return next(r for r in rows if r.name == name and r.scorer == self.scorer)


# ---------------------------------------------------------------------- the plan


def _scaled_points(fractions: tuple[float, ...], num_layers: int) -> tuple[int, ...]:
    """Router points at ``fractions`` of depth, pushed one layer later on collision."""
    points: list[int] = []
    for f in fractions:
        p = max(points[-1] + 1 if points else 1, int(f * num_layers + 0.5))
        if p < num_layers:
            points.append(p)
    return tuple(points)


def resolve(xargs: dict, num_layers: int, num_visual: int):
    from vllm_recroute.config import RoutingConfig
    from vllm_recroute.routing import average_retention, num_keep

    _, stages = common.request_stages(xargs, num_layers, num_visual, RoutingConfig(mode="reroute"))
    keeps = tuple(num_keep(s.keep, num_visual) for s in stages)
    return tuple(s.start for s in stages), keeps, average_retention(stages, num_layers)


def plan(
    num_layers: int,
    num_visual: int,
    scorers: tuple[str, ...],
    schedules: tuple[str, ...] = SCHEDULES,
    retentions: tuple[float, ...] = RETENTIONS,
) -> list[Row]:
    rows = [Row(FULL, "off", xargs={"recroute_mode": "off"})]
    for r in retentions:
        avg = max(1, round(r * num_visual))
        target = avg / num_visual
        for schedule in schedules:
            layouts: list[tuple[int, ...] | None] = [None]
            if schedule == "pdrop":
                early = _scaled_points(PDROP_EARLY, num_layers)
                base = {"recroute_schedule": "pdrop", "recroute_avg_visual_tokens": avg}
                default_points, _, res = resolve(base, num_layers, num_visual)
                if res > target + 1e-6 and len(early) == 3 and early != default_points:
                    layouts.append(early)
            for points in layouts:
                xa: dict[str, Any] = {
                    "recroute_schedule": schedule,
                    "recroute_avg_visual_tokens": avg,
                }
                if points is not None:
                    xa["recroute_router_layers"] = json.dumps(list(points))
                at, keeps, res = resolve(xa, num_layers, num_visual)
                tag = f"{schedule}@{'/'.join(map(str, at))}" if points else schedule
                if res > target + 1e-6:  # one record per layout and budget, never run
                    rows.append(
                        Row(f"{tag} {r:.0%}", "any", schedule, "-", target, xa, at, keeps, res,
                            reachable=False)
                    )  # fmt: skip
                    continue
                for scorer in scorers:
                    for mode in MODES:
                        name = f"{mode} {tag} {r:.0%}"
                        x = {"recroute_mode": mode, **xa, **SCORERS[scorer]}
                        rows.append(Row(name, mode, schedule, scorer, target, x, at, keeps, res))
    return rows


# ---------------------------------------------------------------------- the engine


def _ledger_totals(llm) -> dict:
    def read(worker):  # runs in the worker process
        return copy.deepcopy(worker.model_runner.model.recroute.runtime.ledger.totals)

    return llm.collective_rpc(read)[0]


def _delta(after: dict, before: dict, key: str):
    a, b = after.get(key, 0), before.get(key, 0)
    if isinstance(a, dict):
        return {k: v - (b or {}).get(k, 0) for k, v in a.items()}
    return a - b


def generate(llm, processor, examples, xargs: dict) -> list[str]:
    from vllm import SamplingParams

    from vllm_recroute.demo.model import prompt_text

    params = SamplingParams(temperature=0, max_tokens=4, extra_args=xargs)
    reqs = [
        {"prompt": prompt_text(processor, ex.question), "multi_modal_data": {"image": ex.image}}
        for ex in examples
    ]
    outs = llm.generate(reqs, params, use_tqdm=False)
    return [o.outputs[0].text.split("<end_of_utterance>")[0] for o in outs]


def _score(examples, preds: list[str]) -> tuple[dict, dict]:
    from vllm_recroute.demo.evaluate import accuracy_by_type, normalize_answer

    it = iter(preds)
    acc = accuracy_by_type(lambda chunk: [next(it) for _ in chunk], examples, batch_size=10**9)
    vqa = [(ex, p) for ex, p in zip(examples, preds, strict=True) if ex.qtype != GROUNDING]
    acc["vqa"] = sum(normalize_answer(p) == normalize_answer(ex.answer) for ex, p in vqa) / max(
        1, len(vqa)
    )
    split = {}
    for want in ("yes", "no"):
        sub = [p for ex, p in zip(examples, preds, strict=True)
               if ex.qtype == "exists" and ex.answer == want]  # fmt: skip
        if sub:
            split[want] = sum(normalize_answer(p) == want for p in sub) / len(sub)
    return acc, split


def _same_stages(a: Row, b: Row) -> bool:
    """Same mode, scorer, router points and keeps: the engine computes the same thing."""
    if a.mode != b.mode or a.mode == "off" or a.scorer != b.scorer:
        return False
    return (a.points, a.keeps, a.target) == (b.points, b.keeps, b.target)


def run_row(llm, processor, examples, row: Row, num_visual: int) -> list[str]:
    before = _ledger_totals(llm) if row.mode != "off" else None
    t0 = time.time()
    preds = generate(llm, processor, examples, row.xargs)
    row.seconds = time.time() - t0
    row.acc, row.exists_split = _score(examples, preds)
    if before is not None:
        after = _ledger_totals(llm)
        vtl = _delta(after, before, "visual_token_layers")
        deferred = _delta(after, before, "deferred_visual_token_layers")
        row.measured = 1 - deferred / vtl if vtl else None
        entering = _delta(after, before, "stage_visual_tokens")
        active = _delta(after, before, "stage_active_visual_tokens")
        stages = sorted(entering, key=int)
        row.stage_active = tuple(
            num_visual * active.get(s, 0) / entering[s] for s in stages if entering[s]
        )
        back = _delta(after, before, "stage_returned_visual_tokens")
        row.stage_returned = tuple(
            num_visual * back.get(s, 0) / entering[s] for s in stages[1:] if entering[s]
        )
    return preds


def run_rows(llm, processor, examples, rows: list[Row], num_visual: int) -> dict[str, list[str]]:
    """Run every reachable row (printing one line each); returns the answers per row key."""
    preds: dict[str, list[str]] = {}
    done: list[Row] = []
    for row in rows:
        if not row.reachable:
            print(f"{row.name:34s} unreachable (floor {100 * row.resolved:.1f}%)", flush=True)
            continue
        twin = next((o for o in done if _same_stages(o, row)), None)
        if twin is not None:  # identical resolved stages (shallow models): identical tokens
            for k in ("measured", "stage_active", "stage_returned", "acc", "exists_split"):
                setattr(row, k, copy.deepcopy(getattr(twin, k)))
            row.same_as, preds[row.key] = twin.name, preds[twin.key]
            print(f"{row.name:34s} {row.scorer:13s} same stages as {twin.name}", flush=True)
            continue
        preds[row.key] = run_row(llm, processor, examples, row, num_visual)
        done.append(row)
        print(
            f"{row.name:34s} {row.scorer:13s} retention {pct(row.measured):>5s}  "
            f"VQA {pct(row.acc['vqa'])}  {GROUNDING} {pct(row.acc.get(GROUNDING))}  "
            f"({row.seconds:.0f}s)",
            flush=True,
        )
    return preds


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"
