"""Does the test-bed model read the image, and can it look a cell up? (issue 25)

Teacher-forced accuracy of held-out dense rows (``What is there?``: every cell in reading
order; ``What is in the {cell}?``: one named cell), each with its scene's own image and
with another scene's image. A model that reads the image scores far higher with its own;
one at the answer prior scores the same with both.

    python training/testbed_probe.py --state /work/testbed/state.pt [--n 24]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training import testbed as tb
from vllm_recroute.demo import shapes

PROBE_SEED = shapes.HELDOUT_SEED_BASE + 900_000  # held out, apart from the eval's seeds


def probe_scenes(n: int) -> list:
    return [shapes.make_scene(random.Random(PROBE_SEED + i)) for i in range(n)]


def accuracy(model, processor, scenes, row_of, shift: int) -> tuple[float, float]:
    """(answer-token accuracy, whole-row accuracy) of ``row_of(scene)`` with each scene's
    image replaced by the one ``shift`` scenes later (0: its own)."""
    import torch

    true_rows = [(sc, [row_of(sc)]) for sc in scenes]
    batch = tb.make_batch(processor, true_rows)
    shown = [(scenes[(i + shift) % len(scenes)], rows) for i, (_, rows) in enumerate(true_rows)]
    batch["pixel_values"] = tb.make_batch(processor, shown)["pixel_values"]
    with torch.inference_mode():
        pred = tb.logits_of(model, batch)[:, :-1].argmax(-1)
    gold = batch["labels"][:, 1:]
    answer = gold != -100
    tok = ((pred == gold) & answer).sum().item() / answer.sum().item()
    row = ((pred == gold) | ~answer).all(-1).float().mean().item()
    return tok, row


def probes() -> dict:
    def cell(r: int, c: int):
        q = tb.CELL_Q.format(cell=shapes.cell_name(r, c))
        return lambda sc: (q, tb.cell_answer(sc, r, c), "cell")

    return {
        "describe": lambda sc: (tb.DESCRIBE_Q, tb.describe_answer(sc), "describe"),
        "cell (1, 1)": cell(1, 1),
        "cell (0, 2)": cell(0, 2),
    }


def main(argv: list[str] | None = None) -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--state", required=True)
    ap.add_argument("--n", type=int, default=24)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    st = tb.load_state(args.state)
    processor, model = tb.build(tb.Hyper(**st["hyper"]))
    model.load_state_dict({k: v.float() for k, v in st["model"].items()}, strict=False)
    model.eval()
    scenes = probe_scenes(args.n)
    print(f"step {st['step']}: token / row accuracy, own image vs another scene's")
    for name, row_of in probes().items():
        own = accuracy(model, processor, scenes, row_of, 0)
        other = accuracy(model, processor, scenes, row_of, 7)
        print(
            f"  {name:12s} own {own[0]:.3f} / {own[1]:.3f}   other {other[0]:.3f} / {other[1]:.3f}"
        )


if __name__ == "__main__":
    main()
