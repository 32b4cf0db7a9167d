"""Answer quality under a visual-token budget: full vs remove vs reroute (vLLM engine).

The trained demo VLM (default vllm_recroute/demo/checkpoint) on held-out synthetic
questions (seeds from BENCH_SEED up, never used in training; balanced over the question
types the model's tokenizer can answer, the grounding type ``where`` included when it can),
prompt in the model's own chat template (the shipped model: question before the image;
the test bed: image first), greedy, through one routed
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
routing contract (``reference/oracle.py``'s layer runner and the project's pure policy) must
agree with the engine's answers (a defect would show as disagreement); and a counterfactual
"fresh" reroute, in which deferred tokens still run the stage's layers (reading the active
tokens, invisible to them), separates the effect of the layers a re-selected token skipped
from the effect of which tokens are selected.

Writes the tables into docs/benchmarks.md (between the quality markers), the plot to
docs/quality.png and every figure to docs/quality.json.

The paper's own protocol (``--protocol paper|both``, bench/quality_paper.py): reroute
budget-matched to the removal method it wraps (FastV-matched: one uniform keep at router
points 3/7/15/23 of 32, against FastV; PyramidDrop-matched: α, α, α/2, α/4 at 2/7/15/23,
against PyramidDrop's geometric keeps), at 33 / 22 / 14 / 11% retention, the last two on
``--paper-n`` examples per type, with McNemar's exact test on the same examples.

This file is the command line; the pieces: bench/quality_budget.py (the rows and running
them), bench/quality_stale.py (the ``exists`` study), bench/quality_paper.py (the paper's
protocol), bench/quality_report.py (tables, plot, docs and JSON).

    python bench/quality.py [--n 100] [--model DIR] [--scorers attn-last,attn-question,key_norm]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the root: bench.common

from bench import common
from bench.quality_budget import BENCH_SEED, SCHEDULES, SCORERS, Row, plan, run_rows
from bench.quality_paper import paper_markdown, paper_plan, run_paper
from bench.quality_report import (
    PAPER_MARKERS,
    Setup,
    command_line,
    paper_summary,
    plot,
    record,
    shown,
    summary_markdown,
    write_docs,
)
from bench.quality_stale import exists_study


def _model_qtypes(processor) -> tuple[str, ...]:
    from vllm_recroute.demo import shapes

    tok = processor.tokenizer  # the grounding answers' column words exist only if trained
    known = all(tok.convert_tokens_to_ids(w) != tok.unk_token_id for w in shapes.COL_NAMES)
    return shapes.ALL_QTYPES if known else shapes.QTYPES


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(common.ROOT / "vllm_recroute" / "demo" / "checkpoint"))
    ap.add_argument("--n", type=int, default=100, help="held-out examples per question type")
    ap.add_argument(
        "--scorers", default=",".join(SCORERS), help="comma-separated: " + ", ".join(SCORERS)
    )
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument(
        "--protocol", default="both", choices=("sweep", "paper", "both"),
        help="sweep: the budget table per schedule; paper: the paper's budget-matched pairs "
        "(bench/quality_paper.py); both (default)",
    )  # fmt: skip
    ap.add_argument(
        "--paper-score-layer", default="at", choices=("before", "at"),
        help="where the paper rows score a router point (the paper: at the router layer)",
    )  # fmt: skip
    ap.add_argument(
        "--paper-n", type=int, default=300,
        help="held-out examples per type for the paper protocol's 14%% and 11%% rows",
    )  # fmt: skip
    ap.add_argument("--no-exists-study", action="store_true")
    ap.add_argument("--doc", default=str(common.ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--plot", default=str(common.ROOT / "docs" / "quality.png"))
    ap.add_argument("--kv-mib", type=int, default=512)
    ap.add_argument("--replot", metavar="JSON", help="only redraw --plot from a quality.json")
    return ap


def _replot(saved_json: str, path: str) -> None:
    saved = json.loads(Path(saved_json).read_text())
    rows = [Row(**{k: tuple(v) if isinstance(v, list) else v for k, v in r.items()})
            for r in saved["rows"]]  # fmt: skip
    used = tuple(dict.fromkeys(r.scorer for r in rows if r.scorer in SCORERS))
    plot(rows, tuple(saved["qtypes"]), used, Path(path))


def _setup(model: str, n: int):
    """(processor, held-out examples, Setup) for ``--model`` and ``--n``."""
    from transformers import AutoProcessor

    from vllm_recroute.demo import shapes
    from vllm_recroute.demo.model import prompt_text

    processor = AutoProcessor.from_pretrained(model)
    qtypes = _model_qtypes(processor)
    examples = shapes.make_heldout_examples(n * len(qtypes), seed=BENCH_SEED, qtypes=qtypes)
    prompt = prompt_text(processor, examples[0].question)
    _, num_visual = common.prompt_token_counts(processor, prompt, examples[0].image)
    layers = common.num_layers(model)
    shown = prompt_text(processor, "{question}").replace("<end_of_utterance>\n", "").strip()
    setup = Setup(model, layers, num_visual, qtypes, n, len(examples), shown)
    return processor, examples, setup


def _study(args, llm, processor, examples, rows, preds) -> tuple[str, dict]:
    if args.no_exists_study:
        return "", {}
    import torch
    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    study_md, study = exists_study(llm, processor, hf, examples, rows, preds)
    print(study_md, flush=True)
    return study_md, study


def _paper(args, llm, processor, setup, scorers) -> tuple[str, dict]:
    """The paper's protocol (bench/quality_paper.py) with the sweep's first scorer."""
    from dataclasses import asdict

    from vllm_recroute.demo import shapes

    def examples_for(n: int | None):
        per_type = args.n if n is None else n
        return shapes.make_heldout_examples(
            per_type * len(setup.qtypes), seed=BENCH_SEED, qtypes=setup.qtypes
        )

    rows = paper_plan(
        setup.num_layers, setup.num_visual, scorers[:1], score_layer=args.paper_score_layer
    )
    items, bad, sizes = run_paper(
        llm, processor, examples_for, rows, setup.num_visual, args.paper_n
    )
    md = paper_markdown(rows, items, bad)
    print(md, flush=True)
    return md, {"rows": [asdict(r) for r in rows], "pairs": items, "check_failed": bad,
                "examples": sizes}  # fmt: skip


def main() -> None:
    ap = _parser()
    args = ap.parse_args()
    if args.replot:
        _replot(args.replot, args.plot)
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

    import transformers  # noqa: F401  (the clock starts after the heavy imports)
    import vllm  # noqa: F401

    t_start = time.time()
    processor, examples, setup = _setup(args.model, args.n)
    rows = plan(setup.num_layers, setup.num_visual, scorers, schedules)
    llm = common.make_llm(
        args.model, {"mode": "reroute"}, max_model_len=1024,
        kv_cache_memory_bytes=args.kv_mib << 20, max_num_seqs=64, enforce_eager=True,
    )  # fmt: skip
    t_engine = time.time()
    model = None if args.model == ap.get_default("model") else args.model
    paper = (args.paper_n, args.paper_score_layer)
    cmd = command_line(args.n, model, scorers, schedules, args.protocol, paper)
    if args.protocol != "paper":
        _sweep(args, llm, processor, examples, setup, rows, (cmd, t_start, t_engine, scorers))
    if args.protocol != "sweep":
        t_paper = time.time()
        paper_md, paper = _paper(args, llm, processor, setup, scorers)
        md = paper_summary(cmd, time.time() - t_paper, setup, paper_md, args.paper_score_layer)
        print(md)
        write_docs(md, Path(args.doc), PAPER_MARKERS, "The paper's protocol")
        out = {"command": cmd, "model": shown(setup.model), **paper}
        Path(args.plot).with_name("quality_paper.json").write_text(json.dumps(out, indent=1))


def _sweep(args, llm, processor, examples, setup, rows, run) -> None:
    """The budget sweep and the ``exists`` study: docs block, plot and docs/quality.json."""
    cmd, t_start, t_engine, scorers = run
    preds = run_rows(llm, processor, examples, rows, setup.num_visual)
    study_md, study = _study(args, llm, processor, examples, rows, preds)
    wall = time.time() - t_start
    md = summary_markdown(cmd, wall, t_engine - t_start, setup, rows, scorers, study_md)
    print(md)
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    plot(rows, setup.qtypes, scorers, Path(args.plot))
    write_docs(md, Path(args.doc))
    Path(args.plot).with_suffix(".json").write_text(
        json.dumps(record(cmd, wall, setup, rows, study), indent=1)
    )


if __name__ == "__main__":
    main()
