"""The paper's own protocol in bench/quality.py ("Reroute, Don't Remove", its released
configs): each reroute row is budget-matched to the removal method it wraps, and the two
are compared on the same examples with a paired test.

* **FastV-matched**: remove = FastV at the first router point of the ``fastv-matched``
  layout (router points 3, 7, 15, 23 of 32, scaled down), reroute = one uniform keep at
  all four. Under remove, that uniform layout is FastV itself (later stages keep as many
  tokens as are left), so ``remove fastv-matched`` is run too and must give FastV's answers
  token for token: the built-in check (:func:`fastv_check`).
* **PyramidDrop-matched**: remove = PyramidDrop's geometric keeps at 2, 7, 15, 23 of 32
  (``pdrop-early``), reroute = α, α, α/2, α/4 at the same points (``pdrop-matched``), and
  for comparison today's reroute over the geometric keeps.

Budgets: 33 / 22 / 14 / 11% average visual-token retention (the paper's 192 / 128 / 64 of
576, its PyramidDrop family's "88.9% reduction" tier being 14-15%). The rows are
:class:`bench.quality_budget.Row` (run by ``run_rows``); ``vs`` names the removal row a
reroute row is compared with.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from bench.quality_budget import FULL, GROUNDING, SCORERS, Row, pct, resolve

PAPER_RETENTIONS = (1 / 3, 2 / 9, 0.14, 1 / 9)
FASTV_CHECK = "remove fastv-matched"  # must equal the FastV row of its budget


def _row(name: str, mode: str, xa: dict, scorer: str, target: float, nv: int, nl: int, **kw):
    at, keeps, res = resolve(xa, nl, nv)
    x = {"recroute_mode": mode, **xa, **SCORERS[scorer], "recroute_score_layer": kw.pop("sl")}
    return Row(name, mode, xa["recroute_schedule"], scorer, target, x, at, keeps, res, **kw)


def paper_plan(
    num_layers: int,
    num_visual: int,
    scorers: tuple[str, ...] = ("attn-last",),
    retentions: Sequence[float] = PAPER_RETENTIONS,
    score_layer: str = "at",
) -> list[Row]:
    """The full row, then per budget and scorer: FastV, its check, reroute fastv-matched;
    remove and reroute pdrop-early, reroute pdrop-matched; every row scored
    ``score_layer`` (the paper: ``at`` the router layer). A budget the layout cannot reach
    gives one unreachable row per family (never run)."""
    rows = [Row(FULL, "off", xargs={"recroute_mode": "off"})]
    for r in retentions:
        avg = max(1, round(r * num_visual))
        target = avg / num_visual
        tag = f"{r:.0%}"
        budget = {"recroute_avg_visual_tokens": avg}
        matched = {"recroute_schedule": "fastv-matched", **budget}
        first = resolve(matched, num_layers, num_visual)[0][0]
        fastv = {"recroute_schedule": "fastv", "recroute_router_layers": json.dumps([first])}
        early = {"recroute_schedule": "pdrop-early", **budget}
        pyramid = {"recroute_schedule": "pdrop-matched", **budget}
        families = [
            (matched, [
                (f"remove fastv@{first} {tag}", "remove", {**fastv, **budget}, None),
                (f"{FASTV_CHECK} {tag}", "remove", matched, None),
                (f"reroute fastv-matched {tag}", "reroute", matched, f"remove fastv@{first} {tag}"),
            ]),
            (early, [
                (f"remove pdrop-early {tag}", "remove", early, None),
                (f"reroute pdrop-early {tag}", "reroute", early, f"remove pdrop-early {tag}"),
                (f"reroute pdrop-matched {tag}", "reroute", pyramid, f"remove pdrop-early {tag}"),
            ]),
        ]  # fmt: skip
        for layout, members in families:
            if any(resolve(xa, num_layers, num_visual)[2] > target + 1e-6 for *_, xa, _ in members):
                at, keeps, res = resolve(layout, num_layers, num_visual)
                name = f"{layout['recroute_schedule']} {tag}"
                rows.append(Row(name, "any", layout["recroute_schedule"], "-", target, layout,
                                at, keeps, max(res, target), reachable=False))  # fmt: skip
                continue
            for scorer in scorers:
                for name, mode, xa, vs in members:
                    rows.append(
                        _row(name, mode, xa, scorer, target, num_visual, num_layers, vs=vs,
                             sl=score_layer)
                    )  # fmt: skip
    return rows


# ---------------------------------------------------------------------- checks and tests


CHECK_N = 24  # examples of the built-in check, one request at a time


def fastv_check(llm, processor, examples, rows: list[Row]) -> list[str]:
    """The rows where ``remove fastv-matched`` did not give its FastV row's answers, on
    the first ``CHECK_N`` examples sent one at a time (the built-in check; empty when it
    holds). One at a time because the engine's batched answers are not batch-invariant
    on CPU: the same row run twice over 36 examples differed in 2 (the GEMMs' blocking
    follows the batch), and one request at a time they are identical."""
    from bench.quality_budget import generate

    bad = []
    for r in rows:
        if r.reachable and r.name.startswith(FASTV_CHECK):
            same = (r.scorer, r.target)
            fastv = next(
                o
                for o in rows
                if o.name.startswith("remove fastv@") and (o.scorer, o.target) == same
            )
            for ex in examples[:CHECK_N]:
                if generate(llm, processor, [ex], r.xargs) != generate(
                    llm, processor, [ex], fastv.xargs
                ):
                    bad.append(r.key)
                    break
    return bad


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int, float]:
    """Exact two-sided McNemar test on paired outcomes: (examples only ``a`` gets right,
    examples only ``b`` gets right, p-value), the binomial test of the discordant pairs."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes of different lengths: {len(a)} vs {len(b)}")
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    n = only_a + only_b
    if n == 0:
        return 0, 0, 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n
    return only_a, only_b, min(1.0, 2 * tail)


def correct(examples, answers: list[str]) -> list[bool]:
    from vllm_recroute.demo.evaluate import normalize_answer

    return [normalize_answer(p) == normalize_answer(ex.answer)
            for ex, p in zip(examples, answers, strict=True)]  # fmt: skip


def paired(rows: list[Row], preds: dict[str, list[str]], examples) -> list[dict[str, Any]]:
    """Per reroute row with a ``vs``: reroute - remove on all examples and on grounding,
    with McNemar's test on the same examples."""
    out = []
    where = [i for i, ex in enumerate(examples) if ex.qtype == GROUNDING]
    for r in rows:
        if r.mode != "reroute" or r.vs is None or not r.reachable:
            continue
        rm = next(o for o in rows if o.name == r.vs and o.scorer == r.scorer)
        a, b = correct(examples, preds[rm.key]), correct(examples, preds[r.key])
        item: dict[str, Any] = {"row": r.key, "vs": rm.key}
        for label, idx in (("all", range(len(examples))), (GROUNDING, where)):
            xa, xb = [a[i] for i in idx], [b[i] for i in idx]
            only_rm, only_rr, p = mcnemar(xa, xb)
            n = max(1, len(xa))
            item[label] = {"n": len(xa), "remove": sum(xa) / n, "reroute": sum(xb) / n,
                           "only_remove": only_rm, "only_reroute": only_rr, "p": p}  # fmt: skip
        out.append(item)
    return out


def paired_table(items: list[dict[str, Any]], rows: list[Row]) -> str:
    """The paper-protocol table: reroute - remove, with McNemar's p on the same examples;
    grounding also as a share of the full model's on the same set (``full_where``)."""
    by_key = {r.key: r for r in rows}
    lines = [
        "| reroute row | vs (remove) | n | retention target / measured | returners per stage "
        f"| all: remove | reroute | diff (p) | **{GROUNDING}**: remove | reroute | diff (p) "
        "| reroute / full |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for it in items:
        r = by_key[it["row"]]
        cells = []
        for label in ("all", GROUNDING):
            s = it[label]
            diff = 100 * (s["reroute"] - s["remove"])
            cells += [pct(s["remove"]), pct(s["reroute"]), f"{diff:+.1f} ({s['p']:.2g})"]
        full = it.get("full_where")
        rel = f"{100 * it[GROUNDING]['reroute'] / full:.0f}%" if full else "-"
        back = "/".join(f"{v:.1f}".removesuffix(".0") for v in r.stage_returned) or "-"
        lines.append(
            f"| {r.name} ({r.scorer}) | {r.vs} | {it['all']['n']} | {pct(r.target)} / "
            f"{pct(r.measured)} | {back} | " + " | ".join(cells) + f" | {rel} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------- running it

BIG_BELOW = 0.15  # budgets under this (14%, 11%) run on the larger held-out set


def run_paper(llm, processor, examples_for, rows: list[Row], num_visual: int, n_big: int):
    """Run the paper rows: budgets of 15% and above on ``examples_for(None)`` (the sweep's
    set), those below on ``examples_for(n_big)`` (``n_big`` per type: the differences
    there are what the claim is about), each group with its own full row. Returns
    (paired results, the fastv check's failures, examples per row key)."""
    from bench.quality_budget import run_rows

    full, rest = rows[0], rows[1:]
    groups = [(None, [r for r in rest if (r.target or 1) >= BIG_BELOW]),
              (n_big, [r for r in rest if (r.target or 1) < BIG_BELOW])]  # fmt: skip
    items, bad, seen = [], [], {}
    for n, members in groups:
        if not members:
            continue
        examples = examples_for(n)
        head = full if n is None else Row(f"{FULL} n={n}", "off", xargs=dict(full.xargs))
        group = [head, *members]
        preds = run_rows(llm, processor, examples, group, num_visual)
        bad += fastv_check(llm, processor, examples, group)
        items += [
            {**it, "full_where": head.acc.get(GROUNDING)} for it in paired(group, preds, examples)
        ]
        seen.update({r.key: len(examples) for r in group})
        if n is not None:
            rows.insert(rows.index(members[0]), head)
    return items, bad, seen


def paper_markdown(rows: list[Row], items: list[dict], bad: list[str]) -> str:
    check = (
        "**the built-in check failed** for " + ", ".join(bad) if bad else
        f"Built-in check: every `remove fastv-matched` row gave its FastV row's answers on "
        f"{CHECK_N} examples sent one at a time (batched answers are not batch-invariant on "
        "CPU: the same row run twice over 36 examples differed in 2)"
    )  # fmt: skip
    return "\n".join([
        "#### The paper's protocol: budget-matched pairs on the same examples",
        "",
        "Each reroute row against the removal row it is matched to (FastV for "
        "`fastv-matched`, PyramidDrop's geometric keeps `pdrop-early` for `pdrop-matched` "
        "and `pdrop-early`); diff = reroute - remove in points; p = two-sided exact "
        f"McNemar test of the examples only one of the two gets right. {check}.",
        "",
        paired_table(items, rows),
    ])  # fmt: skip
