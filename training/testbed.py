"""Train the test-bed demo VLM: a model shaped like real VLMs, for a fair "reroute vs remove".

What makes it a fair test bed (issue 25; the shipped 16-layer demo model is effectively four
layers deep and reads the question before the image):

* the image comes BEFORE the question (``model.CHAT_TEMPLATE_IMAGE_FIRST``), as in SmolVLM,
  LLaVA and Qwen-VL;
* next-token loss on the answer only: no relevance probe, no attention supervision, no
  auxiliary head, nothing that knows about router points, budgets or skipped layers;
* 16 decoder layers trained from scratch (no block expansion), GQA (4 query heads, 2 KV
  heads, as SmolVLM's 3:1 sharing), so no layer starts out idle or dominant;
* the vision tower is the shipped checkpoint's (a pretrained vision encoder, frozen, as
  LLaVA-style VLMs are built); SmolVLM's pixel-shuffle connector (scale factor 2: 64
  visual tokens per image) is new and trains with the decoder.

It runs on one CPU thread for days, so it is resumable: the whole state (weights,
optimiser, step, log) goes to ``--state`` every ``--save-minutes`` (atomic rename), and the
run picks up where it stopped when started again with the same command. Each step's scenes
are a pure function of (data seed, step), so a resumed run sees exactly the data it would
have seen. The learning rate is warmup-stable-decay: constant after the warm-up until
``--decay-start`` (a step; change it on resume to end the run), then linear to
``--final-lr-frac``.

Usage (the command of the run in progress is in TRAINING.md of the exported checkpoint)::

    python training/testbed.py --state /work/testbed/state.pt --minutes 170
    python training/testbed.py --state /work/testbed/state.pt --export DIR   # HF checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

from vllm_recroute.demo import shapes
from vllm_recroute.demo.model import EOU, DemoModelSize, build_model, build_processor

# 64 visual tokens per image: SmolVLM's pixel shuffle (scale factor 2) over the shipped
# tower's 16 x 16 patches, which keeps this model trainable in float32 on one thread
SIZE = DemoModelSize(text_layers=16, text_hidden=256, text_heads=4, text_kv_heads=2, scale_factor=2)
VISION_FROM = os.path.join(os.path.dirname(shapes.__file__), "checkpoint")
# answer-token loss is what the held-out set measures; `where` (grounding, two words) and the
# two harder types are drawn more often so that every type converges in the same run
TYPE_WEIGHTS = {"where": 2.0, "relation": 2.0, "count": 1.5}
# Dense image-reading rows, training only (LLaVA's stage-1 "describe the image" alignment in
# this task family's words): every answer token depends on the image, so the decoder gets a
# gradient towards reading visual tokens on every row. Without them the first run plateaued
# at the answer prior (held-out 25-30% from step 250 to 1,530, loss flat at 0.72). Plain
# next-token loss like every other row: nothing here knows about routing.
DESCRIBE_Q = "What is there?"
CELL_Q = "What is in the {cell}?"
EMPTY_CELL = "no"


def cell_answer(scene: shapes.Scene, row: int, col: int) -> str:
    o = scene.at(row, col)
    return EMPTY_CELL if o is None else f"{o.color} {o.shape}"


def describe_answer(scene: shapes.Scene) -> str:
    """Every grid cell in reading order: ``{color} {shape}``, or ``no`` where it is empty."""
    return " ".join(
        cell_answer(scene, r, c) for r in range(shapes.GRID_ROWS) for c in range(shapes.GRID_COLS)
    )


def dense_row(
    scene: shapes.Scene, rng: random.Random, cell_share: float = 0.5, where_share: float = 0.0
) -> tuple[str, str, str]:
    """A ``where`` row (``where_share`` of the time: an object named, its cell asked, the
    inverse of a one-cell row), else a one-cell row (``cell_share``) or a describe row,
    drawn from the scene's own RNG."""
    if where_share > 0 and rng.random() < where_share:
        qa = shapes.make_question(scene, "where", rng)
        if qa is not None:
            return qa[0], qa[1], "where"
    if rng.random() < 1 - cell_share:  # (0.5: the draws of the steps before the field)
        return DESCRIBE_Q, describe_answer(scene), "describe"
    r, c = rng.randrange(shapes.GRID_ROWS), rng.randrange(shapes.GRID_COLS)
    return CELL_Q.format(cell=shapes.cell_name(r, c)), cell_answer(scene, r, c), "cell"


@dataclass(frozen=True)
class Hyper:
    data_seed: int = 100
    init_seed: int = 100
    batch_scenes: int = 8
    rows_per_scene: int = 3
    lr: float = 1e-3
    warmup: int = 300
    decay_start: int = 1_000_000  # WSD: constant until here; lower it on resume to finish
    decay_steps: int = 2000
    final_lr_frac: float = 0.1
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    dense_rows: int = 1  # of rows_per_scene, this many are describe/cell rows (see dense_row)
    rewarm: int = 100  # steps of warm-up again after resuming from weights without optimiser
    # from step 1,000 of the second run: the describe rows' 20-odd tokens outweighed the
    # one-word answers 8:1 under a token mean (loss 0.37, held-out QA flat at 31%)
    loss_per_row: bool = False
    # of the dense rows, the share that asks for one cell (the rest describe every cell).
    # From step 2,150 of the second run 0.75: at 2,150 the model read every cell in order
    # (describe rows 98% of tokens right with the scene's own image, 24% with another's)
    # but a named cell at chance (52% vs 49%): it had learned a positional sweep, not a
    # lookup by the question, and the lookup is what the questions need.
    cell_share: float = 0.5
    # of the dense rows, the share that names an object and asks for its cell (the task's
    # own ``where`` question). From step ~7,900 of the 2026-12-03 run 0.5, with 5 rows a
    # scene of which 2 dense: the cell -> content lookup was at 96% of rows but ``where``
    # (content -> cell) at 2-10% and every question type at the prior for 3,000 steps.
    where_share: float = 0.0


def lr_at(step: int, h: Hyper) -> float:
    if step < h.warmup:
        return h.lr * (step + 1) / h.warmup
    if step < h.decay_start:
        return h.lr
    p = min(1.0, (step - h.decay_start) / max(1, h.decay_steps))
    return h.lr * (1 - (1 - h.final_lr_frac) * p)


def image_first_conversation(question: str, answer: str | None = None) -> list[dict]:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def step_rows(h: Hyper, step: int) -> list[tuple[shapes.Scene, list[tuple[str, str, str]]]]:
    """The scenes and (question, answer, qtype) rows of one training step: a pure function of
    (data seed, step), every scene seed below the held-out range."""
    rng = random.Random(f"testbed:{h.data_seed}:{step}")
    qtypes = shapes.ALL_QTYPES
    weights = [TYPE_WEIGHTS.get(t, 1.0) for t in qtypes]
    out = []
    for _ in range(h.batch_scenes):
        srng = random.Random(rng.randrange(0, shapes.HELDOUT_SEED_BASE))
        scene = shapes.make_scene(srng)
        rows: list[tuple[str, str, str]] = []
        for _ in range(8 * h.dense_rows):  # distinct dense rows (a second describe is waste)
            if len(rows) == h.dense_rows:
                break
            row = dense_row(scene, srng, h.cell_share, h.where_share)
            if all(row[0] != q for q, _, _ in rows):
                rows.append(row)
        for _ in range(8 * h.rows_per_scene):
            if len(rows) == h.rows_per_scene:
                break
            t = srng.choices(qtypes, weights=weights)[0]
            qa = shapes.make_question(scene, t, srng)
            if qa is not None and all(qa[0] != q for q, _, _ in rows):
                rows.append((qa[0], qa[1], t))
        out.append((scene, rows))
    return out


def answer_labels(ids, tok):
    """-100 everywhere but the answer tokens and their closing <end_of_utterance>."""
    import torch

    eou = tok.convert_tokens_to_ids(EOU)
    asst = tok.convert_tokens_to_ids("Assistant")
    colon = tok.convert_tokens_to_ids(":")
    labels = torch.full_like(ids, -100)
    for b, row in enumerate(ids.tolist()):
        for j in range(len(row) - 1):
            if row[j] == asst and row[j + 1] == colon:
                k = j + 2
                while k < len(row) and row[k] != eou:
                    k += 1
                labels[b, j + 2 : k + 1] = ids[b, j + 2 : k + 1]
                break
    return labels


def make_batch(processor, scenes_rows):
    """Tokenised rows with their answers; one image per scene (``rows_per_scene``)."""
    import torch

    images, texts, counts = [], [], []
    for scene, rows in scenes_rows:
        img = scene.render()
        counts.append(len(rows))
        for q, a, _ in rows:
            images.append([img])
            texts.append(processor.apply_chat_template(image_first_conversation(q, a)))
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    first = [sum(counts[:i]) for i in range(len(counts))]
    batch["pixel_values"] = batch["pixel_values"][first]
    if "pixel_attention_mask" in batch:
        batch["pixel_attention_mask"] = batch["pixel_attention_mask"][first]
    batch["rows_per_scene"] = torch.tensor(counts)
    batch["labels"] = answer_labels(batch["input_ids"], processor.tokenizer)
    return batch


def logits_of(model, batch):
    """The HF forward, with each image's features computed once for all of its rows and the
    frozen vision tower under no_grad."""
    import torch

    inner = model.model
    with torch.no_grad():
        enc = inner.vision_model(
            pixel_values=batch["pixel_values"].flatten(0, 1).to(model.dtype)
        ).last_hidden_state
    feats = inner.connector(enc)
    rows = torch.repeat_interleave(feats, batch["rows_per_scene"], dim=0)
    ids = batch["input_ids"]
    emb = inner.text_model.get_input_embeddings()(ids)
    mask = (ids == model.config.image_token_id).unsqueeze(-1)
    emb = emb.masked_scatter(mask, rows.to(emb.dtype))
    out = inner.text_model(
        inputs_embeds=emb, attention_mask=batch["attention_mask"], use_cache=False
    )
    return model.lm_head(out.last_hidden_state)


def answer_loss(logits, labels, per_row: bool = False):
    """Next-token cross-entropy over the answer tokens: averaged over tokens, or (``per_row``)
    over each row's tokens first and then over rows, so that a one-word answer weighs as
    much as a 24-token description."""
    import torch.nn.functional as F

    gold = labels[:, 1:]
    tok = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), gold.flatten(), ignore_index=-100, reduction="none"
    ).view_as(gold)
    mask = (gold != -100).float()
    if not per_row:
        return (tok * mask).sum() / mask.sum()
    return ((tok * mask).sum(1) / mask.sum(1).clamp_min(1)).mean()


def build(h: Hyper):
    """A fresh model: decoder and connector from scratch (``init_seed``), the vision tower
    copied from the shipped checkpoint and frozen."""
    import torch
    from safetensors.torch import load_file

    processor = build_processor(SIZE, image_first=True)
    model = build_model(processor, SIZE, seed=h.init_seed)
    old = load_file(os.path.join(VISION_FROM, "model.safetensors"))
    taken = {k: v.float() for k, v in old.items() if k.startswith("model.vision_model.")}
    missing = set(model.load_state_dict(taken, strict=False).unexpected_keys)
    if missing or not taken:
        raise RuntimeError(f"vision weights did not load: {sorted(missing)[:4]}")
    for p in model.model.vision_model.parameters():
        p.requires_grad_(False)
    model.to(torch.float32)
    return processor, model


def optimiser(model, h: Hyper):
    import torch

    decay, plain = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "embed" not in n else plain).append(p)
    groups = [
        {"params": decay, "weight_decay": h.weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=h.lr, betas=(0.9, 0.95))


def heldout_accuracy(model, processor, n: int) -> dict[str, float]:
    """Teacher-forced exact match on held-out examples: every answer token and the closing
    <end_of_utterance> must be the argmax, which is exactly when greedy decoding returns
    the answer. Balanced over ``shapes.ALL_QTYPES``."""
    import torch

    exs = shapes.make_heldout_examples(n, qtypes=shapes.ALL_QTYPES)
    hits: dict[str, list[int]] = {}
    was = model.training
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(exs), 24):
            chunk = exs[i : i + 24]
            rows = [(ex.scene, [(ex.question, ex.answer, ex.qtype)]) for ex in chunk]
            batch = make_batch(processor, rows)
            pred = logits_of(model, batch)[:, :-1].argmax(-1)
            gold = batch["labels"][:, 1:]
            ok = ((pred == gold) | (gold == -100)).all(-1)
            for ex, o in zip(chunk, ok.tolist(), strict=True):
                hits.setdefault(ex.qtype, []).append(int(o))
    model.train(was)
    acc = {t: sum(v) / len(v) for t, v in hits.items()}
    acc["overall"] = sum(sum(v) for v in hits.values()) / len(exs)
    return acc


def save_state(path: str, model, opt, h: Hyper, step: int, log: list[dict]) -> None:
    import torch

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = {
        "model": {k: v for k, v in model.state_dict().items() if k in trainable},
        "opt": opt.state_dict(),
        "hyper": asdict(h),
        "size": asdict(SIZE),
        "step": step,
        "log": log,
    }
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def save_compact(state_path: str, out: str) -> None:
    """The state without the optimiser (a third of the size): what is committed at the end of
    a session so that the next one resumes (machines are not kept between sessions). Resuming
    from it starts AdamW afresh with ``rewarm`` steps of warm-up."""
    import torch

    st = load_state(state_path)
    st.pop("opt", None)
    # float16 on disk (26 MB instead of 51 for the 12.8 M trainable weights: it is committed
    # once per session); loading copies it into the float32 parameters
    st["model"] = {k: v.half() if v.is_floating_point() else v for k, v in st["model"].items()}
    tmp = out + ".tmp"
    torch.save(st, tmp)
    os.replace(tmp, out)


def load_state(path: str):
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def export(state_path: str, out: str) -> None:
    """The HF checkpoint of the state (weights in float16, as the shipped checkpoint)."""
    import torch

    st = load_state(state_path)
    h = Hyper(**st["hyper"])
    processor, model = build(h)
    model.load_state_dict(st["model"], strict=False)
    model.to(torch.float16)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    with open(os.path.join(out, "training_log.json"), "w") as f:
        json.dump({"hyper": st["hyper"], "step": st["step"], "log": st["log"]}, f, indent=1)


def train(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    h = Hyper()
    log: list[dict] = []
    step = 0
    rewarm_from = -1
    processor, model = build(h)
    opt = optimiser(model, h)
    if os.path.exists(args.state):
        st = load_state(args.state)
        h = Hyper(**{**st["hyper"], **json.loads(args.override)})
        model.load_state_dict(st["model"], strict=False)
        step, log = st["step"], st["log"]
        if "opt" in st:
            opt.load_state_dict(st["opt"])
        else:
            rewarm_from = step
        kept = "kept" if "opt" in st else "new"
        print(f"resumed at step {step} ({h}, optimiser {kept})", flush=True)
    elif args.override != "{}":
        h = Hyper(**{**asdict(h), **json.loads(args.override)})
    model.train()
    t0 = time.time()
    last_save = t0
    ema = None
    while time.time() - t0 < args.minutes * 60 and step < h.decay_start + h.decay_steps:
        warm = 1.0 if rewarm_from < 0 else min(1.0, (step - rewarm_from + 1) / h.rewarm)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, h) * warm
        batch = make_batch(processor, step_rows(h, step))
        # float32 throughout: bf16 autocast is 6x slower on this machine's CPU (no bf16 units)
        loss = answer_loss(logits_of(model, batch), batch["labels"], h.loss_per_row)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], h.grad_clip
        )
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 20 == 0:
            print(
                f"step {step} loss {ema:.4f} gnorm {gn:.2f} lr {lr_at(step, h):.2e} "
                f"{(time.time() - t0) / 60:.1f} min",
                flush=True,
            )
        row = None
        if step % args.eval_every == 0:
            row = {"step": step, "loss_ema": ema, "wall_min": (time.time() - t0) / 60}
            row["heldout"] = heldout_accuracy(model, processor, args.eval_n)
            print(json.dumps(row), flush=True)
            log.append(row)
        if row is not None or time.time() - last_save > args.save_minutes * 60:
            save_state(args.state, model, opt, h, step, log)
            last_save = time.time()
    save_state(args.state, model, opt, h, step, log)
    print(f"saved at step {step}", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--state", required=True, help="resumable training state (.pt)")
    ap.add_argument("--minutes", type=float, default=60.0, help="stop (and save) after this")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-n", type=int, default=240, help="held-out examples per eval")
    ap.add_argument("--save-minutes", type=float, default=10.0)
    ap.add_argument("--override", default="{}", help="JSON of Hyper fields to change")
    ap.add_argument("--export", default="", help="write the HF checkpoint of --state here")
    ap.add_argument("--compact", default="", help="write --state without the optimiser here")
    args = ap.parse_args(argv)
    if args.export:
        export(args.state, args.export)
        return
    if args.compact:
        save_compact(args.state, args.compact)
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.state)), exist_ok=True)
    train(args)


if __name__ == "__main__":
    sys.exit(main())
