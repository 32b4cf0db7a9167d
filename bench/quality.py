"""Answer quality under a visual-token budget: full vs remove vs reroute (vLLM engine).

The trained demo VLM (default vllm_recroute/demo/checkpoint) on held-out synthetic
questions (seeds from BENCH_SEED up, never used in training; balanced over the question
types the model's tokenizer can answer, the grounding type ``where`` included when it can),
prompt in the demo model's format (question before the image), greedy, through one routed
vLLM engine (RecrouteIdefics3ForConditionalGeneration) with the routing config of each row
sent per request (``SamplingParams.extra_args`` = vllm_xargs ``recroute_*`` keys).

Rows: full (off); remove and reroute for the fastv, pdrop and sparsevlm schedules at 33%,
22% and 11% average visual-token retention (the literature's 192/128/64 of 576), expressed
as ``avg_visual_tokens``; for each scorer (attention from the last prompt token, attention
from the question tokens, key_norm). PyramidDrop's default first router point (1/4 of depth)
floors its retention near 25%, so where a budget is below that the pdrop rows use
PyramidDrop's 64-token layout, router points 2, 6, 12 of 32 scaled to the depth, passed as
``recroute_router_layers``. A budget a schedule's router points cannot reach (resolved
average retention above the target) is reported as unreachable and not run.

Each row states its router points, keeps (tokens per stage) and the retention measured by
the engine's own accounting (the worker's ``Ledger`` totals, read through
``llm.collective_rpc``: retention = 1 - deferred / visual token-layers over the row's
requests; per-stage active tokens from ``stage_active_visual_tokens``).

The ``exists`` study (on the exists questions): keep = 1.0 at the rows' router points must
give the full model's answers (the stage machinery without a budget); an HF reference of the
routing contract (``tests/oracle.py``'s layer runner and the project's pure policy) must
agree with the engine's answers (a defect would show as disagreement); and a counterfactual
"fresh" reroute, in which deferred tokens still run the stage's layers (reading the active
tokens, invisible to them), separates the effect of the layers a re-selected token skipped
from the effect of which tokens are selected.

Writes the tables into docs/benchmarks.md (between the quality markers), the plot to
docs/quality.png and every figure to docs/quality.json.

    python bench/quality.py [--n 100] [--model DIR] [--scorers attn-last,attn-question,key_norm]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the root: bench.common

from bench import common

RETENTIONS = (1 / 3, 2 / 9, 1 / 9)  # 192, 128, 64 of 576
SCHEDULES = ("fastv", "pdrop", "sparsevlm")
MODES = ("remove", "reroute")
SCORERS: dict[str, dict[str, str]] = {
    "attn-last": {"recroute_scorer": "attention", "recroute_score_query": "last"},
    "attn-question": {"recroute_scorer": "attention", "recroute_score_query": "question"},
    "key_norm": {"recroute_scorer": "key_norm"},
}
SCORER_TITLES = {
    "attn-last": "attention from the last prompt token (FastV; the default)",
    "attn-question": "attention from the question tokens (`score_query: question`)",
    "key_norm": "key norm (text-agnostic)",
}
# PyramidDrop's 64-token setting on 32-layer LLaVA: router points 2, 6, 12
PDROP_EARLY = (2 / 32, 6 / 32, 12 / 32)
GROUNDING = "where"
BENCH_SEED = 10_500_000  # held-out range, disjoint from training seeds and training-time eval
START, END = "<!-- quality:start -->", "<!-- quality:end -->"
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
    acc: dict[str, Any] = field(default_factory=dict)
    exists_split: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    same_as: str | None = None  # an earlier row with the same resolved stages (not rerun)

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


def _resolve(xargs: dict, num_layers: int, num_visual: int):
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
                default_points, _, res = _resolve(base, num_layers, num_visual)
                if res > target + 1e-6 and len(early) == 3 and early != default_points:
                    layouts.append(early)
            for points in layouts:
                xa: dict[str, Any] = {
                    "recroute_schedule": schedule,
                    "recroute_avg_visual_tokens": avg,
                }
                if points is not None:
                    xa["recroute_router_layers"] = json.dumps(list(points))
                at, keeps, res = _resolve(xa, num_layers, num_visual)
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
        return copy.deepcopy(worker.model_runner.model.recroute.ledger.totals)

    return llm.collective_rpc(read)[0]


def _delta(after: dict, before: dict, key: str):
    a, b = after.get(key, 0), before.get(key, 0)
    if isinstance(a, dict):
        return {k: v - (b or {}).get(k, 0) for k, v in a.items()}
    return a - b


def _generate(llm, processor, examples, xargs: dict) -> list[str]:
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
    preds = _generate(llm, processor, examples, row.xargs)
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
    return preds


# ---------------------------------------------------------------------- exists study (HF)


def _oracle():
    """tests/oracle.py by path (``tests`` is not a package; another one may be installed)."""
    import importlib.util

    name = "_recroute_oracle"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, common.ROOT / "tests" / "oracle.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _hf_inputs(hf, processor, examples) -> list:
    """(input ids, merged input embeddings) per example: the vision tower runs once."""
    from vllm_recroute.demo.model import prompt_text

    oracle = _oracle()
    lm = oracle.language_model(hf)
    out = []
    for ex in examples:
        inputs = processor(
            text=[prompt_text(processor, ex.question)], images=[[ex.image]], return_tensors="pt"
        )
        out.append((inputs["input_ids"][0], oracle.merged_embeddings(hf, inputs) * lm.embed_scale))
    return out


def _hf_first_tokens(
    hf, processor, encoded, xargs: dict, fresh: bool, fixed: list | None = None
) -> tuple[list[str], list, list]:
    """First answer token of each example under the routing contract (the oracle's layer
    runner and the project's policy), prefill only. ``fresh``: deferred tokens still run
    every layer (reading the active tokens and themselves; no active token reads them), so a
    re-selected token has skipped no layer. ``fixed``: per example, the active masks to use
    instead of deciding (another run's selection). Returns the answers, per example the
    number of tokens active at each stage that were deferred at the previous one
    (re-selected), and per example the masks used."""
    import torch

    from vllm_recroute.config import RoutingConfig
    from vllm_recroute.requests.options import config_for_extra_args
    from vllm_recroute.routing import num_keep, query_indices, resolve_stages, route_request
    from vllm_recroute.routing.schedule import stage_at

    oracle = _oracle()
    cfg = config_for_extra_args(RoutingConfig(mode="reroute"), xargs)
    lm = oracle.language_model(hf)
    dec = lm.decoder
    answers, returned, used = [], [], []
    for i, (ids, x) in enumerate(encoded):
        n = ids.shape[0]
        is_visual = ids == lm.image_token_id
        is_visual[-1] = False
        visual = torch.nonzero(is_visual).flatten()
        stages = resolve_stages(cfg, len(dec.layers), int(visual.numel()))
        pos = torch.arange(n)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        masks: list[torch.Tensor] = list(fixed[i]) if fixed is not None else []
        with torch.no_grad():
            for idx, layer in enumerate(dec.layers):
                for k, s in enumerate(stages):
                    if s.start == idx + 1 and fixed is None:
                        query = query_indices(n, visual, cfg.score_query)
                        sc = oracle._scores(layer, x, pos, lm.rope, visual, query, cfg.scorer)
                        prev = masks[k - 1] if k else None
                        masks.append(
                            route_request(sc, num_keep(s.keep, int(visual.numel())), cfg.mode, prev)
                        )
                k = stage_at(stages, idx)
                if k is None:
                    x = oracle._run_layer(layer, x, pos, lm.rope)
                    continue
                active = torch.ones(n, dtype=torch.bool)
                active[visual[~masks[k]]] = False
                if not fresh:
                    rows = torch.nonzero(active).flatten()
                    out = oracle._run_layer(layer, x[rows], pos[rows], lm.rope)
                    x = x.index_copy(0, rows, out)
                    continue
                allowed = causal & (active[None, :] | torch.eye(n, dtype=torch.bool))
                bias = torch.zeros(n, n, dtype=x.dtype).masked_fill(
                    ~allowed, torch.finfo(x.dtype).min
                )
                cos, sin = lm.rope(x, pos)
                out = layer(x[None], attention_mask=bias[None, None], position_ids=pos[None],
                            position_embeddings=(cos, sin))  # fmt: skip
                x = (out[0] if isinstance(out, tuple) else out)[0]
            token = int(torch.argmax(lm.lm_head(dec.norm(x[-1:]))[0]))
        answers.append(processor.tokenizer.decode([token], skip_special_tokens=True).strip())
        returned.append([int((m & ~p).sum()) for p, m in itertools.pairwise(masks)])
        used.append(masks)
    return answers, returned, used


def exists_study(llm, processor, hf, examples, rows: list[Row], preds: dict[str, list[str]]):
    """See the module docstring. Returns (markdown, data)."""
    from vllm_recroute.demo.evaluate import normalize_answer

    idx = [i for i, ex in enumerate(examples) if ex.qtype == "exists"]
    sub = [examples[i] for i in idx]
    full = [preds[rows[0].key][i] for i in idx]

    def acc(answers):
        return sum(normalize_answer(a) == ex.answer for a, ex in zip(answers, sub, strict=True))

    # layouts of the multi-stage rows with the default scorer
    layouts = {}
    for r in rows:
        if r.reachable and r.mode == "reroute" and r.scorer == "attn-last" and len(r.points) > 1:
            layouts.setdefault((r.points, r.keeps), r)
    lines = [
        f"On the {len(sub)} `exists` questions (answer `yes` for "
        f"{sum(ex.answer == 'yes' for ex in sub)}). **keep = 1.0 at the rows' router points** "
        "(every token active in every stage; answers that differ from full (off)):",
        "",
        "| schedule, router points | reroute | remove |",
        "|---|---:|---:|",
    ]
    data: dict[str, Any] = {"n": len(sub), "keep_one": {}, "reference": []}
    seen: set[tuple[int, ...]] = set()
    for (points, _), row in layouts.items():
        schedule = row.schedule
        if points in seen:  # keep = 1.0 does not depend on the budget: once per router points
            continue
        seen.add(points)
        cells = []
        for mode in MODES:
            xa = {"recroute_mode": mode, "recroute_schedule": schedule, "recroute_keep": 1.0,
                  "recroute_router_layers": json.dumps(list(points))}  # fmt: skip
            got = _generate(llm, processor, sub, xa)
            diff = sum(
                normalize_answer(a) != normalize_answer(b) for a, b in zip(got, full, strict=True)
            )
            data["keep_one"][f"{mode} {schedule}@{points}"] = diff
            cells.append(f"{diff} of {len(sub)}")
        lines.append(f"| {schedule} {'/'.join(map(str, points))} | " + " | ".join(cells) + " |")
    if hf is None:
        return "\n".join(lines), data
    lines += [
        "",
        "**Reference and counterfactual** (HF model, prefill, first answer token; `stale` is the "
        "routing contract, what the engine implements; `fresh` lets deferred tokens run the "
        "stage's layers, reading the active tokens but unseen by them, so a re-selected token "
        "has skipped nothing; `fresh, stale's selection` runs fresh on the active sets the "
        "stale run chose, so only the re-selected tokens' hidden states differ from the "
        "contract; `remove` is the same under both). Accuracy on `exists` in %; "
        "agree = first answer word equal to the engine's; yes / no = accuracy on the questions "
        "whose answer is yes / no; re-selected = mean tokens active in a stage that the previous "
        "stage deferred (of the stage's keep):",
        "",
        "| row | engine reroute | HF stale (agree) | HF fresh | HF fresh, stale's selection "
        "| engine remove | HF remove (agree) | yes / no: stale, fresh, fresh-stale-sel., remove "
        "| re-selected tokens per stage |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    encoded = _hf_inputs(hf, processor, sub)
    n = len(sub)

    def first(text: str) -> str:  # the HF side decodes one token: one word of this vocabulary
        words = normalize_answer(text).split()
        return words[0] if words else ""

    def agree(a, b):
        return sum(first(x) == first(y) for x, y in zip(a, b, strict=True))

    def pct(answers):
        return f"{100 * acc(answers) / n:.0f}"

    def mean_back(back):
        return [sum(b[k] for b in back) / len(back) for k in range(len(back[0]))] if back else []

    for row in layouts.values():
        rem = row.partner(rows)
        eng, eng_rm = [preds[row.key][i] for i in idx], [preds[rem.key][i] for i in idx]
        stale, back, stale_masks = _hf_first_tokens(hf, processor, encoded, row.xargs, False)
        fresh, back_f, _ = _hf_first_tokens(hf, processor, encoded, row.xargs, True)
        fixed, _, _ = _hf_first_tokens(hf, processor, encoded, row.xargs, True, stale_masks)
        hrem, _, _ = _hf_first_tokens(hf, processor, encoded, rem.xargs, False)
        per_stage, per_fresh = mean_back(back), mean_back(back_f)
        yes_no = ", ".join(
            f"{100 * _split(a, sub, 'yes'):.0f}/{100 * _split(a, sub, 'no'):.0f}"
            for a in (stale, fresh, fixed, hrem)
        )
        lines.append(
            f"| {row.name} | {pct(eng)} | {pct(stale)} ({agree(stale, eng)}/{n}) | {pct(fresh)} "
            f"| {pct(fixed)} "
            f"| {pct(eng_rm)} | {pct(hrem)} ({agree(hrem, eng_rm)}/{n}) | {yes_no} | "
            f"{' / '.join(f'{v:.1f}' for v in per_stage)} of "
            f"{' / '.join(map(str, row.keeps[1:]))} |"
        )
        data["reference"].append({
            "row": row.name, "engine": acc(eng), "hf_stale": acc(stale),
            "hf_stale_agree": agree(stale, eng), "hf_fresh": acc(fresh), "hf_remove": acc(hrem),
            "hf_remove_agree": agree(hrem, eng_rm), "engine_remove": acc(eng_rm),
            "hf_fresh_stale_selection": acc(fixed),
            "answers": {"engine": eng, "engine_remove": eng_rm, "hf_stale": stale,
                        "hf_fresh": fresh, "hf_fresh_stale_selection": fixed, "hf_remove": hrem},
            "reselected_per_stage": per_stage, "reselected_per_stage_fresh": per_fresh,
            "fresh_yes": _split(fresh, sub, "yes"), "fresh_no": _split(fresh, sub, "no"),
            "stale_yes": _split(stale, sub, "yes"), "stale_no": _split(stale, sub, "no"),
            "remove_yes": _split(hrem, sub, "yes"), "remove_no": _split(hrem, sub, "no"),
        })  # fmt: skip
    return "\n".join(lines), data


def _split(answers, sub, want: str) -> float:
    from vllm_recroute.demo.evaluate import normalize_answer

    pairs = [(a, ex) for a, ex in zip(answers, sub, strict=True) if ex.answer == want]
    return sum(normalize_answer(a) == want for a, _ in pairs) / max(1, len(pairs))


# ---------------------------------------------------------------------- output


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _tables(rows: list[Row], qtypes: tuple[str, ...], scorers: tuple[str, ...]) -> str:
    vqa_types = [t for t in qtypes if t != GROUNDING]
    has_where = GROUNDING in qtypes
    head = (
        "| config | router points | keeps (tokens) | measured active | retention target / "
        "measured | VQA | "
        + " | ".join(vqa_types)
        + (f" | **{GROUNDING}** |" if has_where else " |")
    )
    sep = "|---|---|---|---|---:|---:|" + "---:|" * len(vqa_types) + ("---:|" if has_where else "")
    full = rows[0]
    out = []
    for scorer in scorers:
        body = [head, sep]
        for r in rows:
            if r is not full and r.scorer not in (scorer, "-"):
                continue
            pts = "/".join(map(str, r.points)) or "-"
            kps = "/".join(map(str, r.keeps)) or "-"
            act = "/".join(f"{v:.1f}".removesuffix(".0") for v in r.stage_active) or "-"
            if not r.reachable:
                ret = f"{_pct(r.target)} / **unreachable** (floor {_pct(r.resolved)})"
                cells = ["-"] * (1 + len(vqa_types) + has_where)
            else:
                ret = "100 / 100" if r is full else f"{_pct(r.target)} / {_pct(r.measured)}"
                cells = [_pct(r.acc["vqa"])] + [_pct(r.acc.get(t)) for t in vqa_types]
                if has_where:
                    cells.append(f"**{_pct(r.acc.get(GROUNDING))}**")
            name = r.name + (f" (same stages as {r.same_as}: not rerun)" if r.same_as else "")
            line = f"| {name} | {pts} | {kps} | {act} | {ret} | " + " | ".join(cells) + " |"
            body.append(line)
        out.append(f"Scorer: {SCORER_TITLES[scorer]}.\n\n" + "\n".join(body))
    return "\n\n".join(out)


def _grounding_table(rows: list[Row], scorers: tuple[str, ...]) -> str:
    full = rows[0].acc[GROUNDING]
    lines = [
        f"Grounding (`{GROUNDING}`: the grid cell of a unique object), accuracy in % and as % of "
        f"full ({100 * full:.1f}):",
        "",
        "| budget, schedule, scorer | remove | reroute | reroute - remove | remove / full "
        "| reroute / full |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.mode != "reroute" or not r.reachable or r.scorer not in scorers:
            continue
        rm = r.partner(rows)
        a, b = rm.acc[GROUNDING], r.acc[GROUNDING]
        label = f"{r.name.removeprefix('reroute ')} ({r.scorer})"
        rel = (lambda v: f"{100 * v / full:.0f}") if full else (lambda v: "-")
        lines.append(
            f"| {label} | {100 * a:.1f} | {100 * b:.1f} | {100 * (b - a):+.1f} "
            f"| {rel(a)} | {rel(b)} |"
        )
    return "\n".join(lines)


def _plot(rows: list[Row], qtypes: tuple[str, ...], scorers: tuple[str, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["vqa", *qtypes]
    ncols = 4
    nrows = -(-(len(panels) + 1) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(16, 4 * nrows), sharex=True, sharey=True)
    full = rows[0]
    colors = {"fastv": "tab:blue", "pdrop": "tab:orange", "sparsevlm": "tab:green"}
    ran = [r for r in rows if r.reachable and r.mode in MODES]

    # a small horizontal offset per schedule: rows with the same stages would hide each other
    offset = {"fastv": -0.4, "pdrop": 0.0, "sparsevlm": 0.4}

    def series(scorer, mode, schedule):
        rs = [r for r in ran if r.scorer == scorer and r.mode == mode and r.schedule == schedule]
        rs.sort(key=lambda r: r.measured if r.measured is not None else r.resolved)
        xs = [100 * (r.measured if r.measured is not None else r.resolved) for r in rs]
        return [x + offset[schedule] for x in xs], rs

    for ax, key in zip(axes.flat, panels, strict=False):
        ax.axhline(100 * full.acc[key], color="black", ls="--", label=FULL)
        for schedule in SCHEDULES:
            for mode in MODES:
                xs, rs = series("attn-last", mode, schedule)
                if xs:
                    ys = [100 * r.acc[key] for r in rs]
                    ls = "-" if mode == "reroute" else ":"
                    label = f"{mode} {schedule}" + (
                        " (early points < 25%)" if schedule == "pdrop" else ""
                    )
                    marker, face = ("o", colors[schedule]) if mode == "reroute" else ("s", "none")
                    ax.plot(xs, ys, marker=marker, mfc=face, color=colors[schedule], ls=ls,
                            label=label)  # fmt: skip
        ax.set_title(("VQA (5 types)" if key == "vqa" else key) + ", attention/last")
    ax = axes.flat[len(panels)]
    ax.axhline(100 * full.acc["vqa"], color="black", ls="--")
    styles = {"attn-last": ("o", "tab:orange"), "attn-question": ("s", "tab:purple"),
              "key_norm": ("^", "tab:gray")}  # fmt: skip
    for scorer in scorers:
        for mode in MODES:
            xs, rs = series(scorer, mode, "pdrop")
            if xs:
                ys = [100 * r.acc["vqa"] for r in rs]
                ls = "-" if mode == "reroute" else ":"
                marker, color = styles[scorer]
                face = color if mode == "reroute" else "none"
                ax.plot(xs, ys, marker=marker, mfc=face, color=color, ls=ls,
                        label=f"{mode} {scorer}")  # fmt: skip
    ax.set_title("VQA by scorer, pdrop (early points < 25%)")
    ax.legend(fontsize=7)
    for ax in axes.flat:
        ax.set_xlabel("measured avg visual-token retention (%)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 102)
        ax.set_xlim(5, 40)
        for r in RETENTIONS:
            ax.axvline(100 * r, color="gray", lw=0.6, alpha=0.5)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) + 1 :]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("reroute: filled, solid; remove: hollow, dotted; grey lines: target budgets "
                 "11/22/33% (no point = unreachable); schedules offset by 0.4 for legibility",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _shown(path: str) -> str:
    """A path as the docs show it: relative to the repository when inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(common.ROOT)) if p.is_relative_to(common.ROOT) else str(p)


def _write_docs(md: str, doc: Path) -> None:
    text = doc.read_text() if doc.exists() else ""
    block = f"{START}\n{md}\n{END}"
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END) :]
    else:
        text = (
            text.rstrip() + "\n\n## Answer quality under a visual-token budget\n\n" + block + "\n"
        )
    doc.write_text(text)


def _model_qtypes(processor) -> tuple[str, ...]:
    from vllm_recroute.demo import shapes

    tok = processor.tokenizer  # the grounding answers' column words exist only if trained
    known = all(tok.convert_tokens_to_ids(w) != tok.unk_token_id for w in shapes.COL_NAMES)
    return shapes.ALL_QTYPES if known else shapes.QTYPES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(common.ROOT / "vllm_recroute" / "demo" / "checkpoint"))
    ap.add_argument("--n", type=int, default=100, help="held-out examples per question type")
    ap.add_argument(
        "--scorers", default=",".join(SCORERS), help="comma-separated: " + ", ".join(SCORERS)
    )
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--no-exists-study", action="store_true")
    ap.add_argument("--doc", default=str(common.ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--plot", default=str(common.ROOT / "docs" / "quality.png"))
    ap.add_argument("--kv-mib", type=int, default=512)
    ap.add_argument("--replot", metavar="JSON", help="only redraw --plot from a quality.json")
    args = ap.parse_args()
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        rows = [Row(**{k: tuple(v) if isinstance(v, list) else v for k, v in r.items()})
                for r in saved["rows"]]  # fmt: skip
        used = tuple(dict.fromkeys(r.scorer for r in rows if r.scorer in SCORERS))
        _plot(rows, tuple(saved["qtypes"]), used, Path(args.plot))
        return
    scorers = tuple(s for s in args.scorers.split(",") if s)
    schedules = tuple(s for s in args.schedules.split(",") if s)
    unknown = [s for s in scorers if s not in SCORERS] + [
        s for s in schedules if s not in SCHEDULES
    ]
    if unknown:
        ap.error(f"unknown scorer/schedule {unknown}")
    # collective_rpc with a callable (the ledger reader) needs pickled functions
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

    from transformers import AutoProcessor

    from vllm_recroute.demo import shapes
    from vllm_recroute.demo.model import prompt_text

    t_start = time.time()
    processor = AutoProcessor.from_pretrained(args.model)
    layers = common.num_layers(args.model)
    qtypes = _model_qtypes(processor)
    examples = shapes.make_heldout_examples(args.n * len(qtypes), seed=BENCH_SEED, qtypes=qtypes)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    ids = processor(
        text=[prompt_text(processor, examples[0].question)], images=[[examples[0].image]]
    )
    num_visual = ids["input_ids"][0].count(image_id)
    rows = plan(layers, num_visual, scorers, schedules)

    llm = common.make_llm(
        args.model, {"mode": "reroute"}, max_model_len=1024,
        kv_cache_memory_bytes=args.kv_mib << 20, max_num_seqs=64, enforce_eager=True,
    )  # fmt: skip
    t_engine = time.time()
    preds: dict[str, list[str]] = {}
    done: list[Row] = []
    for row in rows:
        if not row.reachable:
            print(f"{row.name:34s} unreachable (floor {100 * row.resolved:.1f}%)", flush=True)
            continue
        twin = next((o for o in done if _same_stages(o, row)), None)
        if twin is not None:  # identical resolved stages (shallow models): identical tokens
            for k in ("measured", "stage_active", "acc", "exists_split"):
                setattr(row, k, copy.deepcopy(getattr(twin, k)))
            row.same_as, preds[row.key] = twin.name, preds[twin.key]
            print(f"{row.name:34s} {row.scorer:13s} same stages as {twin.name}", flush=True)
            continue
        preds[row.key] = run_row(llm, processor, examples, row, num_visual)
        done.append(row)
        print(
            f"{row.name:34s} {row.scorer:13s} retention {_pct(row.measured):>5s}  "
            f"VQA {_pct(row.acc['vqa'])}  {GROUNDING} {_pct(row.acc.get(GROUNDING))}  "
            f"({row.seconds:.0f}s)",
            flush=True,
        )
    study_md, study = "", {}
    if not args.no_exists_study:
        import torch
        from transformers import AutoModelForImageTextToText

        hf = AutoModelForImageTextToText.from_pretrained(
            args.model, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        study_md, study = exists_study(llm, processor, hf, examples, rows, preds)
        print(study_md, flush=True)
    wall = time.time() - t_start

    extra = [f"--n {args.n}"] if args.n != 100 else []
    if args.model != ap.get_default("model"):
        extra.append(f"--model {args.model}")
    if scorers != tuple(SCORERS):
        extra.append(f"--scorers {','.join(scorers)}")
    if schedules != SCHEDULES:
        extra.append(f"--schedules {','.join(schedules)}")
    cmd = " ".join(["python bench/quality.py", *extra])
    md = (
        f"Command: `{cmd}` ({wall / 60:.1f} min on this machine, engine start "
        f"{(t_engine - t_start):.0f} s). Model: `{Path(args.model).name}`, {layers} decoder "
        f"layers, {num_visual} visual tokens per image; {len(examples)} held-out examples (seeds "
        f"{BENCH_SEED}..{BENCH_SEED + len(examples) - 1}, {args.n} per type: "
        f"{', '.join(qtypes)}), prompt `User: {{question}}<image>` (the demo model's format), "
        "greedy, through the vLLM engine with each row's routing options per request; accuracy "
        "in %. Budgets are `avg_visual_tokens` = target x "
        f'{num_visual}; "VQA" is over the {len([t for t in qtypes if t != GROUNDING])} '
        "non-grounding types. Router points and keeps are the resolved stages (keeps in visual "
        "tokens per stage); measured retention = 1 - deferred / visual token-layers from the "
        "engine's accounting over the row. pdrop rows with router points other than "
        f"{'/'.join(map(str, _resolve({'recroute_schedule': 'pdrop'}, layers, num_visual)[0]))}"
        " use PyramidDrop's 64-token layout (2, 6, 12 of 32, scaled) where the default cannot "
        "reach the budget. An unreachable budget (the router points' floor is above it) is not "
        f"run.\n\n{_tables(rows, qtypes, scorers)}\n\n"
        + (_grounding_table(rows, scorers) + "\n\n" if GROUNDING in qtypes else "")
        + (f"`exists` study.\n\n{study_md}\n\n" if study_md else "")
        + "![accuracy vs retention](quality.png)"
    )
    print(md)
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    _plot(rows, qtypes, scorers, Path(args.plot))
    _write_docs(md, Path(args.doc))
    out = {
        "command": cmd, "model": _shown(args.model), "num_layers": layers,
        "num_visual": num_visual,
        "qtypes": qtypes, "n_per_type": args.n,
        "seeds": [BENCH_SEED, BENCH_SEED + len(examples) - 1],
        "wall_s": wall, "rows": [asdict(r) for r in rows], "exists_study": study,
    }  # fmt: skip
    Path(args.plot).with_suffix(".json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
