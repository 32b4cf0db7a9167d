"""bench/quality_paper.py: the paper's budget-matched rows, the built-in FastV check,
McNemar's exact test and the paired table, on made-up answers."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from bench import quality_paper as paper
from bench.quality_budget import FULL


def test_plan_matches_each_reroute_row_to_its_removal_row():
    rows = paper.paper_plan(16, 64, retentions=(1 / 9,))
    got = [(r.name, r.mode, r.points, r.keeps, r.vs) for r in rows]
    assert got == [
        (FULL, "off", (), (), None),
        ("remove fastv@1 11%", "remove", (1,), (3,), None),
        ("remove fastv-matched 11%", "remove", (1, 3, 7, 11), (3, 3, 3, 3), None),
        ("reroute fastv-matched 11%", "reroute", (1, 3, 7, 11), (3, 3, 3, 3), "remove fastv@1 11%"),
        ("remove pdrop-early 11%", "remove", (1, 3, 7, 11), (14, 3, 1, 1), None),
        ("reroute pdrop-early 11%", "reroute", (1, 3, 7, 11), (14, 3, 1, 1),
         "remove pdrop-early 11%"),
        ("reroute pdrop-matched 11%", "reroute", (1, 3, 7, 11), (5, 5, 3, 1),
         "remove pdrop-early 11%"),
    ]  # fmt: skip
    # budget-matched: every row of a budget resolves to the same average retention
    assert {round(r.resolved, 9) for r in rows[1:]} == {7 / 64}
    assert rows[1].xargs["recroute_router_layers"] == "[1]"


def test_plan_marks_a_budget_the_layout_cannot_reach():
    rows = paper.paper_plan(4, 64, retentions=(1 / 9,))  # 1 of 4 layers before the first point
    assert [(r.name, r.reachable) for r in rows[1:]] == [
        ("fastv-matched 11%", False),
        ("pdrop-early 11%", False),
    ]


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([True] * 5, [False] * 5, (5, 0, 2 / 32)),  # 5 discordant, all one way
        ([True] * 9 + [False], [False] * 9 + [True], (9, 1, 2 * 11 / 1024)),
        ([True, False], [True, False], (0, 0, 1.0)),  # no discordant pair
        ([True, False], [False, True], (1, 1, 1.0)),
    ],
)
def test_mcnemar_exact(a, b, expected):
    only_a, only_b, p = paper.mcnemar(a, b)
    assert (only_a, only_b) == expected[:2]
    assert p == pytest.approx(expected[2])


def test_mcnemar_refuses_unpaired_outcomes():
    with pytest.raises(ValueError, match="different lengths"):
        paper.mcnemar([True], [True, False])


@dataclass
class Ex:
    qtype: str
    answer: str


EXAMPLES = [Ex("where", "a"), Ex("where", "b"), Ex("count", "1"), Ex("count", "2")]


def _preds(rows, fastv_equal: bool = True) -> dict[str, list[str]]:
    out = {}
    for r in rows:
        if r.name == FULL:
            out[r.key] = ["a", "b", "1", "2"]
        elif r.mode == "remove":
            out[r.key] = ["a", "x", "1", "x"]  # the check row too: FastV's answers
        else:
            out[r.key] = ["a", "b", "1", "x"]
    check = next(r for r in rows if r.name.startswith(paper.FASTV_CHECK))
    if not fastv_equal:
        out[check.key] = ["x", "x", "x", "x"]
    return out


def _fake_generate(differ: bool):
    """generate() answering by schedule: the check row like FastV, or not (``differ``)."""

    def generate(llm, processor, examples, xargs):
        if differ and xargs["recroute_schedule"] == "fastv-matched":
            return ["x"] * len(examples)
        return [ex.answer for ex in examples]

    return generate


def test_fastv_check_holds_and_fails(monkeypatch):
    import bench.quality_budget as budget

    rows = paper.paper_plan(16, 64, retentions=(1 / 9,))
    monkeypatch.setattr(budget, "generate", _fake_generate(differ=False))
    assert paper.fastv_check(None, None, EXAMPLES, rows) == []
    # the guard: a check row that differs from FastV is reported
    monkeypatch.setattr(budget, "generate", _fake_generate(differ=True))
    assert paper.fastv_check(None, None, EXAMPLES, rows) == ["remove fastv-matched 11% [attn-last]"]


def test_paired_results_and_table():
    rows = paper.paper_plan(16, 64, retentions=(1 / 9,))
    items = paper.paired(rows, _preds(rows), EXAMPLES)
    assert [(it["row"], it["vs"]) for it in items] == [
        ("reroute fastv-matched 11% [attn-last]", "remove fastv@1 11% [attn-last]"),
        ("reroute pdrop-early 11% [attn-last]", "remove pdrop-early 11% [attn-last]"),
        ("reroute pdrop-matched 11% [attn-last]", "remove pdrop-early 11% [attn-last]"),
    ]
    first = items[0]
    assert first["all"] == {"n": 4, "remove": 0.5, "reroute": 0.75, "only_remove": 0,
                            "only_reroute": 1, "p": 1.0}  # fmt: skip
    assert first["where"]["reroute"] == 1.0 and first["where"]["remove"] == 0.5
    for r in rows:
        r.measured = r.target
        r.stage_returned = (1.0, 0.5, 0.0)
    table = paper.paired_table([{**first, "full_where": 1.0}], rows).splitlines()
    assert len(table) == 3
    assert table[2] == (
        "| reroute fastv-matched 11% (attn-last) | remove fastv@1 11% | 4 | 10.9 / 10.9 "
        "| 1/0.5/0 | 50.0 | 75.0 | +25.0 (1) | 50.0 | 100.0 | +50.0 (1) | 100% |"
    )


def test_run_paper_runs_the_low_budgets_on_the_larger_set(monkeypatch):
    import bench.quality_budget as budget

    calls = []

    def fake_run_rows(llm, processor, examples, rows, num_visual):
        calls.append((len(examples), [r.name for r in rows]))
        for r in rows:
            r.acc = {"where": 1.0}
        return {k: v * (len(examples) // 4) for k, v in _preds(rows).items()}

    monkeypatch.setattr(budget, "run_rows", fake_run_rows)
    monkeypatch.setattr(budget, "generate", _fake_generate(differ=False))
    rows = paper.paper_plan(16, 64, retentions=(1 / 3, 1 / 9))
    small, big = EXAMPLES, EXAMPLES * 3
    items, bad, sizes = paper.run_paper(
        None, None, lambda n: small if n is None else big, rows, 64, n_big=300
    )
    assert [n for n, _ in calls] == [4, 12]
    assert calls[0][1][0] == FULL and calls[1][1][0] == f"{FULL} n=300"
    assert all(name.endswith("33%") for name in calls[0][1][1:])
    assert all(name.endswith("11%") for name in calls[1][1][1:])
    assert bad == [] and len(items) == 6
    assert sizes["reroute pdrop-matched 11% [attn-last]"] == 12
    assert f"{FULL} n=300" in [r.name for r in rows]  # the larger set's full row is shown


def test_paper_rows_score_at_the_router_layer_unless_told():
    at = paper.paper_plan(16, 64, retentions=(1 / 3,))
    before = paper.paper_plan(16, 64, retentions=(1 / 3,), score_layer="before")
    assert {r.xargs["recroute_score_layer"] for r in at[1:]} == {"at"}
    assert {r.xargs["recroute_score_layer"] for r in before[1:]} == {"before"}
    assert "recroute_score_layer" not in at[0].xargs  # the full row routes nothing


def test_the_paper_block_has_its_own_markers(tmp_path):
    from bench import quality_report as report

    doc = tmp_path / "b.md"
    report.write_docs("sweep v1", doc)
    report.write_docs("paper v1", doc, report.PAPER_MARKERS, "The paper's protocol")
    report.write_docs("sweep v2", doc)  # rewriting one block leaves the other
    text = doc.read_text()
    assert "sweep v2" in text and "paper v1" in text and "sweep v1" not in text
    assert report.command_line(100, None, tuple(report.SCORERS), report.SCHEDULES, "paper",
                               (50, "before")) == (
        "python bench/quality.py --protocol paper --paper-n 50 --paper-score-layer before"
    )  # fmt: skip
