"""The ``exists`` study of bench/quality.py: stale vs fresh state of re-selected tokens.

On the ``exists`` questions: keep = 1.0 at the rows' router points must give the full
model's answers (the stage machinery without a budget); an HF reference of the routing
contract (``reference/oracle.py``'s layer runner and the project's pure policy) must agree
with the engine's answers (a defect would show as disagreement); and a counterfactual
"fresh" reroute, in which deferred tokens still run the stage's layers (reading the active
tokens, invisible to them), separates the effect of the layers a re-selected token skipped
(its "stale" hidden state, what the routing contract gives it) from the effect of which
tokens are selected.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from bench.quality_budget import MODES, Row, generate


def _hf_inputs(hf, processor, examples) -> list:
    """(input ids, merged input embeddings) per example: the vision tower runs once."""
    from reference import oracle
    from vllm_recroute.demo.model import prompt_text

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

    from reference import oracle
    from vllm_recroute.config import RoutingConfig
    from vllm_recroute.requests.options import config_for_extra_args
    from vllm_recroute.routing import (
        resolve_stages,
        scoring_layer,
    )
    from vllm_recroute.routing.budget import stage_at

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
                    if scoring_layer(s.start, cfg.score_layer) == idx and fixed is None:
                        prev = masks[k - 1] if k else None
                        masks.append(
                            oracle.decide_stage(cfg, s, layer, x, pos, lm.rope, visual, prev)
                        )
                k = stage_at(stages, idx)
                if k is None:
                    x = oracle.run_layer(layer, x, pos, lm.rope)
                    continue
                active = torch.ones(n, dtype=torch.bool)
                active[visual[~masks[k]]] = False
                if not fresh:
                    rows = torch.nonzero(active).flatten()
                    out = oracle.run_layer(layer, x[rows], pos[rows], lm.rope)
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
    """The study on the ``exists`` questions (module docstring): keep = 1.0 through the
    engine, then, with ``hf`` (else skipped), the HF reference and counterfactual per
    multi-stage reroute layout. ``preds``: the engine's answers per row key. Returns
    (markdown, data)."""
    idx = [i for i, ex in enumerate(examples) if ex.qtype == "exists"]
    sub = [examples[i] for i in idx]
    full = [preds[rows[0].key][i] for i in idx]
    # layouts of the multi-stage rows with the default scorer
    layouts = {}
    for r in rows:
        if r.reachable and r.mode == "reroute" and r.scorer == "attn-last" and len(r.points) > 1:
            layouts.setdefault((r.points, r.keeps), r)
    data: dict[str, Any] = {"n": len(sub), "keep_one": {}, "reference": []}
    lines = _keep_one(llm, processor, sub, full, layouts, data["keep_one"])
    if hf is None:
        return "\n".join(lines), data
    lines += _reference(hf, processor, sub, idx, layouts, rows, preds, data["reference"])
    return "\n".join(lines), data


def _keep_one(llm, processor, sub, full, layouts: dict, data: dict) -> list[str]:
    """keep = 1.0 at each layout's router points through the engine, both modes: how many
    answers differ from full (off)'s ``full`` (into ``data``). Returns the table's lines."""
    from vllm_recroute.demo.evaluate import normalize_answer

    lines = [
        f"On the {len(sub)} `exists` questions (answer `yes` for "
        f"{sum(ex.answer == 'yes' for ex in sub)}). **keep = 1.0 at the rows' router points** "
        "(every token active in every stage; answers that differ from full (off)):",
        "",
        "| schedule, router points | reroute | remove |",
        "|---|---:|---:|",
    ]
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
            got = generate(llm, processor, sub, xa)
            diff = sum(
                normalize_answer(a) != normalize_answer(b) for a, b in zip(got, full, strict=True)
            )
            data[f"{mode} {schedule}@{points}"] = diff
            cells.append(f"{diff} of {len(sub)}")
        lines.append(f"| {schedule} {'/'.join(map(str, points))} | " + " | ".join(cells) + " |")
    return lines


def _reference(
    hf, processor, sub, idx, layouts: dict, rows: list[Row], preds: dict, data: list
) -> list[str]:
    """Per layout: the HF reference (stale, the contract), the fresh counterfactual (also on
    the stale run's selection) and remove, against the engine's answers (into ``data``).
    Returns the table's lines."""
    from vllm_recroute.demo.evaluate import normalize_answer

    def acc(answers):
        return sum(normalize_answer(a) == ex.answer for a, ex in zip(answers, sub, strict=True))

    lines = [
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
        data.append({
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
    return lines


def _split(answers, sub, want: str) -> float:
    from vllm_recroute.demo.evaluate import normalize_answer

    pairs = [(a, ex) for a, ex in zip(answers, sub, strict=True) if ex.answer == want]
    return sum(normalize_answer(a) == want for a, _ in pairs) / max(1, len(pairs))
