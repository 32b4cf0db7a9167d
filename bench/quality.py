"""Answer quality under a visual-token budget: full vs remove vs reroute (vLLM engine).

The trained demo VLM (vllm_recroute/demo/checkpoint) on held-out synthetic grounding
questions (seeds never used in training; prompt in the demo model's format, question before
the image, `model.prompt_text`), greedy, through one routed vLLM engine with the
routing config per request. Budgets are average visual-token retentions 33%, 22% and 11%
(the literature's 192/128/64 of 576), expressed as `avg_visual_tokens`, for the FastV
and PyramidDrop schedules in both modes. Writes the table into docs/benchmarks.md
(between the quality markers) and the plot to docs/quality.png.

    python bench/quality.py [--n 500] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROUTED = "RecrouteIdefics3ForConditionalGeneration"
RETENTIONS = (1 / 3, 2 / 9, 1 / 9)
METHODS = (("remove", "fastv"), ("reroute", "fastv"), ("remove", "pdrop"), ("reroute", "pdrop"))
BENCH_SEED = 10_500_000  # held-out range, disjoint from training seeds and training-time eval
START, END = "<!-- quality:start -->", "<!-- quality:end -->"


def _configs(num_visual: int) -> dict[str, dict]:
    out = {"full (off)": {"recroute_mode": "off"}}
    for r in RETENTIONS:
        for mode, schedule in METHODS:
            out[f"{mode} {schedule} {r:.0%}"] = {
                "recroute_mode": mode,
                "recroute_schedule": schedule,
                "recroute_avg_visual_tokens": max(1, round(r * num_visual)),
            }
    return out


def _predictor(llm, processor, xargs: dict):
    from vllm import SamplingParams

    from vllm_recroute.demo.model import prompt_text

    params = SamplingParams(temperature=0, max_tokens=4, extra_args=xargs)

    def predict(examples):
        reqs = [
            {"prompt": prompt_text(processor, ex.question), "multi_modal_data": {"image": ex.image}}
            for ex in examples
        ]
        outs = llm.generate(reqs, params, use_tqdm=False)
        return [o.outputs[0].text.split("<end_of_utterance>")[0] for o in outs]

    return predict


def _plot(results: dict[str, dict], qtypes: tuple[str, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ("overall", *qtypes)
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5), sharex=True, sharey=True)
    xs = [100 * r for r in RETENTIONS]
    for ax, key in zip(axes.flat, panels, strict=True):
        ax.axhline(100 * results["full (off)"][key], color="black", ls="--", label="full (off)")
        for mode, schedule in METHODS:
            ys = [100 * results[f"{mode} {schedule} {r:.0%}"][key] for r in RETENTIONS]
            ax.plot(xs, ys, marker="o", ls="-" if mode == "reroute" else ":",
                    label=f"{mode} {schedule}")  # fmt: skip
        ax.set_title(key)
        ax.set_xlabel("avg visual-token retention (%)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _table(results: dict[str, dict], qtypes: tuple[str, ...]) -> str:
    head = "| config | overall | " + " | ".join(qtypes) + " |"
    rows = [head, "|---" * (len(qtypes) + 2) + "|"]
    for name, acc in results.items():
        cells = [f"{100 * acc['overall']:.1f}"] + [f"{100 * acc[t]:.1f}" for t in qtypes]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "vllm_recroute" / "demo" / "checkpoint"))
    ap.add_argument("--n", type=int, default=500, help="held-out examples (balanced types)")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "quality.png"))
    args = ap.parse_args()

    from transformers import AutoProcessor
    from vllm import LLM

    from vllm_recroute.demo import shapes
    from vllm_recroute.demo.evaluate import accuracy_by_type
    from vllm_recroute.demo.model import prompt_text

    processor = AutoProcessor.from_pretrained(args.model)
    examples = shapes.make_heldout_examples(args.n, seed=BENCH_SEED)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    ids = processor(
        text=[prompt_text(processor, examples[0].question)], images=[[examples[0].image]]
    )
    num_visual = ids["input_ids"][0].count(image_id)

    llm = LLM(
        model=args.model, dtype="float32", max_model_len=1024, kv_cache_memory_bytes=256 << 20,
        max_num_seqs=64, enforce_eager=True, seed=0, hf_overrides={"architectures": [ROUTED]},
        additional_config={"recroute": {"mode": "reroute"}},
    )  # fmt: skip
    t0 = time.time()
    results = {}
    for name, xargs in _configs(num_visual).items():
        results[name] = accuracy_by_type(
            _predictor(llm, processor, xargs), examples, batch_size=100
        )
        print(f"{name:28s} overall {100 * results[name]['overall']:.1f}%", flush=True)
    wall = time.time() - t0

    qtypes = shapes.QTYPES
    table = _table(results, qtypes)
    cmd = "python bench/quality.py" + (f" --n {args.n}" if args.n != 500 else "")
    md = (
        f"Command: `{cmd}` ({wall / 60:.1f} min on this machine). Model: "
        f"`{Path(args.model).name}` ({num_visual} visual tokens per image), "
        f"{args.n} held-out examples (seeds {BENCH_SEED}..{BENCH_SEED + args.n - 1}, "
        f"{args.n // len(qtypes)} per type), prompt `User: {{question}}<image>` (the demo "
        f"model's format: question before the image), greedy, accuracy in %. Budgets are "
        f"`avg_visual_tokens` = retention x {num_visual}. Scorer: attention from the last "
        f"prompt token (the default).\n\n{table}\n\n![accuracy vs retention](quality.png)"
    )
    print(table)
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    _plot(results, qtypes, Path(args.plot))
    _write_docs(md, Path(args.doc))
    (Path(args.plot).with_suffix(".json")).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
