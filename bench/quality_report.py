"""The output of bench/quality.py: the budget tables, the grounding table, the plot, the
summary paragraph, docs/benchmarks.md's block between the quality markers, and the JSON
record (docs/quality.json).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from bench import common
from bench.quality_budget import (
    BENCH_SEED,
    FULL,
    GROUNDING,
    MODES,
    RETENTIONS,
    SCHEDULES,
    SCORERS,
    Row,
    pct,
    resolve,
)

SCORER_TITLES = {
    "attn-last": "attention from the last prompt token (FastV; the default)",
    "attn-question": "attention from the question tokens (`score_query: question`)",
    "key_norm": "key norm (text-agnostic)",
}
START, END = "<!-- quality:start -->", "<!-- quality:end -->"
PAPER_MARKERS = ("<!-- quality-paper:start -->", "<!-- quality-paper:end -->")


@dataclass(frozen=True)
class Setup:
    """What a run measured: the model and the held-out set."""

    model: str  # checkpoint dir
    num_layers: int
    num_visual: int  # visual tokens per image
    qtypes: tuple[str, ...]
    n_per_type: int
    n_examples: int
    prompt: str = "User: {question}<image>"  # the model's chat template around a question

    @property
    def seeds(self) -> tuple[int, int]:
        return BENCH_SEED, BENCH_SEED + self.n_examples - 1


def command_line(
    n: int,
    model: str | None,
    scorers: tuple[str, ...],
    schedules,
    protocol: str = "both",
    paper: tuple[int, str] = (300, "at"),
) -> str:
    """The command as the docs show it: the options that differ from the defaults
    (``model`` None: the default checkpoint)."""
    extra = [f"--n {n}"] if n != 100 else []
    if protocol != "both":
        extra.append(f"--protocol {protocol}")
    if protocol != "sweep" and paper[0] != 300:
        extra.append(f"--paper-n {paper[0]}")
    if protocol != "sweep" and paper[1] != "at":
        extra.append(f"--paper-score-layer {paper[1]}")
    if model is not None:
        extra.append(f"--model {model}")
    if scorers != tuple(SCORERS):
        extra.append(f"--scorers {','.join(scorers)}")
    if schedules != SCHEDULES:
        extra.append(f"--schedules {','.join(schedules)}")
    return " ".join(["python bench/quality.py", *extra])


def summary_markdown(
    cmd: str,
    wall: float,
    engine_start: float,
    setup: Setup,
    rows: list[Row],
    scorers: tuple[str, ...],
    study_md: str,
) -> str:
    """The block written into docs/benchmarks.md: the set-up, the tables, the study, the
    plot. ``wall``, ``engine_start``: seconds (whole run, until the engine was up)."""
    qtypes, num_visual = setup.qtypes, setup.num_visual
    pdrop_points = resolve({"recroute_schedule": "pdrop"}, setup.num_layers, num_visual)[0]
    first, last = setup.seeds
    return (
        f"Command: `{cmd}` ({wall / 60:.1f} min on this machine, engine start "
        f"{engine_start:.0f} s). Model: `{Path(setup.model).name}`, {setup.num_layers} decoder "
        f"layers, {num_visual} visual tokens per image; {setup.n_examples} held-out examples "
        f"(seeds {first}..{last}, {setup.n_per_type} per type: "
        f"{', '.join(qtypes)}), prompt `{setup.prompt}` (the model's chat template), "
        "greedy, through the vLLM engine with each row's routing options per request; accuracy "
        "in %. Budgets are `avg_visual_tokens` = target x "
        f'{num_visual}; "VQA" is over the {len([t for t in qtypes if t != GROUNDING])} '
        "non-grounding types. Router points and keeps are the resolved stages (keeps in visual "
        "tokens per stage); measured retention = 1 - deferred / visual token-layers from the "
        "engine's accounting over the row. pdrop rows with router points other than "
        f"{'/'.join(map(str, pdrop_points))}"
        " use PyramidDrop's 64-token layout (2, 6, 12 of 32, scaled) where the default cannot "
        "reach the budget. An unreachable budget (the router points' floor is above it) is not "
        f"run.\n\n{budget_tables(rows, qtypes, scorers)}\n\n"
        + (grounding_table(rows, scorers) + "\n\n" if GROUNDING in qtypes else "")
        + (f"`exists` study.\n\n{study_md}\n\n" if study_md else "")
        + "![accuracy vs retention](quality.png)"
    )


def record(cmd: str, wall: float, setup: Setup, rows: list[Row], study: dict) -> dict:
    """Every figure of the run (docs/quality.json)."""
    return {
        "command": cmd, "model": shown(setup.model), "num_layers": setup.num_layers,
        "num_visual": setup.num_visual,
        "qtypes": setup.qtypes, "n_per_type": setup.n_per_type,
        "seeds": list(setup.seeds),
        "wall_s": wall, "rows": [asdict(r) for r in rows], "exists_study": study,
    }  # fmt: skip


def budget_tables(rows: list[Row], qtypes: tuple[str, ...], scorers: tuple[str, ...]) -> str:
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
                ret = f"{pct(r.target)} / **unreachable** (floor {pct(r.resolved)})"
                cells = ["-"] * (1 + len(vqa_types) + has_where)
            else:
                ret = "100 / 100" if r is full else f"{pct(r.target)} / {pct(r.measured)}"
                cells = [pct(r.acc["vqa"])] + [pct(r.acc.get(t)) for t in vqa_types]
                if has_where:
                    cells.append(f"**{pct(r.acc.get(GROUNDING))}**")
            name = r.name + (f" (same stages as {r.same_as}: not rerun)" if r.same_as else "")
            line = f"| {name} | {pts} | {kps} | {act} | {ret} | " + " | ".join(cells) + " |"
            body.append(line)
        out.append(f"Scorer: {SCORER_TITLES[scorer]}.\n\n" + "\n".join(body))
    return "\n\n".join(out)


def grounding_table(rows: list[Row], scorers: tuple[str, ...]) -> str:
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


def plot(rows: list[Row], qtypes: tuple[str, ...], scorers: tuple[str, ...], path: Path) -> None:
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


def shown(path: str) -> str:
    """A path as the docs show it: relative to the repository when inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(common.ROOT)) if p.is_relative_to(common.ROOT) else str(p)


def write_docs(
    md: str,
    doc: Path,
    markers: tuple[str, str] = (START, END),
    heading: str = "Answer quality under a visual-token budget",
) -> None:
    """``md`` between ``markers`` in ``doc`` (appended under ``heading`` the first time)."""
    start, end = markers
    text = doc.read_text() if doc.exists() else ""
    block = f"{start}\n{md}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n" + block + "\n"
    doc.write_text(text)


def paper_summary(cmd: str, wall: float, setup: Setup, paper_md: str, score_layer: str) -> str:
    """The paper-protocol block of docs/benchmarks.md: its set-up line, then its table."""
    return (
        f"Command: `{cmd}` (the paper rows: {wall / 60:.1f} min on this machine). Model: "
        f"`{Path(setup.model).name}`, {setup.num_layers} decoder layers, {setup.num_visual} "
        f"visual tokens per image; held-out seeds from {BENCH_SEED}, prompt `{setup.prompt}`, "
        "greedy, through the vLLM engine; accuracy in %. Scorer: attention from the last "
        f"prompt token, `score_layer: {score_layer}` ("
        + (
            "at the router layer itself, as the paper"
            if score_layer == "at"
            else "at the layer before each router point, today's default"
        )
        + ").\n\n"
        + paper_md
    )
