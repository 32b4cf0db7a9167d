"""bench/quality.py's pure pieces: the plan of rows and the tables it writes into
docs/benchmarks.md, pinned on a small fake run (the expected text is what the tables gave
before bench/quality.py was split into quality_budget / quality_stale / quality_report)."""

from __future__ import annotations

from bench import quality_report as report
from bench.quality_budget import FULL, Row, plan

QTYPES = ("exists", "where")


def _rows() -> list[Row]:
    """16 layers, 256 visual tokens, pdrop at 33% and 11%, with made-up results."""
    rows = plan(16, 256, ("attn-last",), ("pdrop",), (1 / 3, 1 / 9))
    for i, r in enumerate(rows):
        if r.reachable:
            r.acc = {"exists": i / 8, "where": (8 - i) / 8, "vqa": i / 8}
            if r.mode != "off":
                r.measured = r.target + 0.01
                r.stage_active = tuple(k + 0.5 * (i % 2) for k in r.keeps)
    return rows


def test_plan():
    rows = _rows()
    assert [(r.name, r.mode, r.points, r.keeps, r.reachable) for r in rows] == [
        (FULL, "off", (), (), True),
        ("remove pdrop 33%", "remove", (4, 8, 12), (64, 16, 4), True),
        ("reroute pdrop 33%", "reroute", (4, 8, 12), (64, 16, 4), True),
        # pdrop's default first router point (1/4 of depth) floors its retention at 25%
        ("pdrop 11%", "any", (4, 8, 12), (1, 1, 1), False),
        # so 11% takes PyramidDrop's 64-token layout (2, 6, 12 of 32, scaled to 16)
        ("remove pdrop@1/3/6 11%", "remove", (1, 3, 6), (59, 14, 3), True),
        ("reroute pdrop@1/3/6 11%", "reroute", (1, 3, 6), (59, 14, 3), True),
    ]
    assert rows[3].resolved > 0.25 > rows[3].target
    assert rows[2].partner(rows) is rows[1] and rows[1].partner(rows) is rows[2]


def _text(lines: list) -> str:
    """Table rows given as lists of cells, other lines as strings."""
    return "\n".join(x if isinstance(x, str) else "| " + " | ".join(x) + " |" for x in lines)


def test_budget_tables():
    assert report.budget_tables(_rows(), QTYPES, ("attn-last",)) == _text(
        [
            "Scorer: attention from the last prompt token (FastV; the default).",
            "",
            [
                "config",
                "router points",
                "keeps (tokens)",
                "measured active",
                "retention target / measured",
                "VQA",
                "exists",
                "**where**",
            ],
            "|---|---|---|---|---:|---:|---:|---:|",
            ["full (off)", "-", "-", "-", "100 / 100", "0.0", "0.0", "**100.0**"],
            [
                "remove pdrop 33%",
                "4/8/12",
                "64/16/4",
                "64.5/16.5/4.5",
                "33.2 / 34.2",
                "12.5",
                "12.5",
                "**87.5**",
            ],
            [
                "reroute pdrop 33%",
                "4/8/12",
                "64/16/4",
                "64/16/4",
                "33.2 / 34.2",
                "25.0",
                "25.0",
                "**75.0**",
            ],
            [
                "pdrop 11%",
                "4/8/12",
                "1/1/1",
                "-",
                "10.9 / **unreachable** (floor 25.3)",
                "-",
                "-",
                "-",
            ],
            [
                "remove pdrop@1/3/6 11%",
                "1/3/6",
                "59/14/3",
                "59/14/3",
                "10.9 / 11.9",
                "50.0",
                "50.0",
                "**50.0**",
            ],
            [
                "reroute pdrop@1/3/6 11%",
                "1/3/6",
                "59/14/3",
                "59.5/14.5/3.5",
                "10.9 / 11.9",
                "62.5",
                "62.5",
                "**37.5**",
            ],
        ]
    )


def test_grounding_table():
    assert report.grounding_table(_rows(), ("attn-last",)) == _text(
        [
            "Grounding (`where`: the grid cell of a unique object), accuracy in % and as % of "
            "full (100.0):",
            "",
            [
                "budget, schedule, scorer",
                "remove",
                "reroute",
                "reroute - remove",
                "remove / full",
                "reroute / full",
            ],
            "|---|---:|---:|---:|---:|---:|",
            ["pdrop 33% (attn-last)", "87.5", "75.0", "-12.5", "88", "75"],
            ["pdrop@1/3/6 11% (attn-last)", "50.0", "37.5", "-12.5", "50", "38"],
        ]
    )


def test_command_line_names_what_differs_from_the_defaults():
    assert report.command_line(100, None, ("attn-last", "attn-question", "key_norm"), (
        "fastv", "pdrop", "sparsevlm")) == "python bench/quality.py"  # fmt: skip
    assert report.command_line(20, "/m", ("key_norm",), ("pdrop",)) == (
        "python bench/quality.py --n 20 --model /m --scorers key_norm --schedules pdrop"
    )


def test_write_docs_replaces_the_block_between_the_markers(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n")
    report.write_docs("first", doc)
    assert doc.read_text() == (
        "# Benchmarks\n\n## Answer quality under a visual-token budget\n\n"
        f"{report.START}\nfirst\n{report.END}\n"
    )
    report.write_docs("second", doc)
    assert doc.read_text().count("## Answer quality") == 1
    assert f"{report.START}\nsecond\n{report.END}" in doc.read_text()
