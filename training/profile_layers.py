"""Staleness profile of a demo VLM: how much each decoder layer changes the visual tokens,
and what freezing them over one layer (or one routing stage) costs.

For a routed model, a deferred visual token skips a stage with its hidden state frozen;
whether that hurts depends on how much the model's visual tokens change per layer
(design notes, section 10). Two measurements on held-out examples (HF, float32, prefill):

* per layer ``l``: the median over visual tokens of ``||x_{l+1} - x_l|| / ||x_l||``;
* freeze over layers ``L``: every visual token's output of each layer in ``L`` is replaced
  by its input (so later layers, and the text tokens inside ``L``, see K/V computed from
  the frozen state, as a deferred token is seen after it re-enters), then the answer is
  read teacher-forced: exact-match accuracy (every answer token the argmax, which is when
  greedy decoding answers right) and the mean KL of the first answer token against the
  unfrozen model.

Works for both demo models (the template of each checkpoint sets its prompt order)::

    python training/profile_layers.py --model vllm_recroute/demo/checkpoint --n 60
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from testbed import logits_of, make_batch

from vllm_recroute.demo import shapes


def _batches(processor, n: int, seed: int, size: int = 24):
    exs = shapes.make_heldout_examples(n, seed, qtypes=shapes.ALL_QTYPES)
    for i in range(0, n, size):
        chunk = exs[i : i + size]
        yield make_batch(processor, [(e.scene, [(e.question, e.answer, e.qtype)]) for e in chunk])


class Freezer:
    """Forward hooks that give the visual tokens of chosen layers their input back."""

    def __init__(self, layers, image_token_id: int) -> None:
        self.layers = layers
        self.image_token_id = image_token_id
        self.frozen: set[int] = set()
        self.visual = None  # bool [B, T] of the current batch
        self.updates: dict[int, list] = {}
        for i, layer in enumerate(layers):
            layer.register_forward_hook(self._hook(i), with_kwargs=True)

    def _hook(self, i: int):
        def hook(_module, args, kwargs, out):
            x = kwargs.get("hidden_states", args[0] if args else None)
            y = out[0] if isinstance(out, tuple) else out
            vis = self.visual
            if not self.frozen:  # measuring: relative update of visual tokens
                rel = (y - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-6)
                self.updates.setdefault(i, []).append(rel[vis])
            if i in self.frozen:
                y = y.clone()
                y[vis] = x[vis]
                return (y, *out[1:]) if isinstance(out, tuple) else y
            return None

        return hook


def evaluate(model, processor, freezer: Freezer, frozen: Iterable[int], n: int, seed: int):
    import torch

    freezer.frozen = set(frozen)
    hits, kls, total = 0, [], 0
    ref_first = getattr(freezer, "_ref_first", None)
    firsts = []
    with torch.inference_mode():
        for batch in _batches(processor, n, seed):
            freezer.visual = batch["input_ids"] == freezer.image_token_id
            logits = logits_of(model, batch)[:, :-1]
            gold = batch["labels"][:, 1:]
            ok = ((logits.argmax(-1) == gold) | (gold == -100)).all(-1)
            hits += int(ok.sum())
            total += ok.numel()
            first = (gold != -100).float().argmax(-1)
            firsts.append(logits[torch.arange(len(first)), first].log_softmax(-1))
    lp = torch.cat(firsts)
    if ref_first is not None:
        kls.append(float((ref_first.exp() * (ref_first - lp)).sum(-1).mean()))
    else:
        freezer._ref_first = lp
    return {"accuracy": hits / total, "kl_first": kls[0] if kls else 0.0}


def profile(model_dir: str, n: int, seed: int, stages: list[tuple[int, int]]) -> dict:
    import torch
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Idefics3ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    layers = model.model.text_model.layers
    freezer = Freezer(layers, model.config.image_token_id)
    full = evaluate(model, processor, freezer, (), n, seed)
    updates = {i: float(torch.cat(v).median()) for i, v in sorted(freezer.updates.items())}
    out = {"model": model_dir, "n": n, "seed": seed, "full": full, "update": updates}
    out["freeze_layer"] = {
        i: evaluate(model, processor, freezer, (i,), n, seed) for i in range(len(layers))
    }
    out["freeze_stage"] = {
        f"{a}-{b - 1}": evaluate(model, processor, freezer, range(a, b), n, seed) for a, b in stages
    }
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--seed", type=int, default=10_800_000, help="held-out seeds from here")
    ap.add_argument("--stages", default="4-8,8-12,12-16", help="layer ranges a-b (b excluded)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    stages = [tuple(int(x) for x in s.split("-")) for s in args.stages.split(",") if s]
    print(json.dumps(profile(args.model, args.n, args.seed, stages), indent=1))


if __name__ == "__main__":
    main()
