"""Train the demo VLM from scratch on CPU on the synthetic shapes VQA task.

    python -m vllm_recroute.demo.train --out vllm_recroute/demo/checkpoint --steps 3000 --seed 0

Each training sample is one scene (from a training seed, always < shapes.HELDOUT_SEED_BASE)
with several question/answer turns about it (``shapes.make_multi_qa``): the image is
encoded once and every answer is supervised, which is what makes CPU training affordable.
The loss is on answer tokens and their ``<end_of_utterance>`` only. Held-out accuracy is
measured with real greedy decoding (``evaluate.hf_greedy_predictor``) on held-out seeds.
The checkpoint (model + processor, HF format) is saved at every evaluation, so an
interrupted run still leaves a usable model, and ``TRAINING.md`` records the command,
seeds, steps, wall time and accuracy per question type.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import shutil
import sys
import time
from dataclasses import asdict

from vllm_recroute.demo import shapes
from vllm_recroute.demo.evaluate import accuracy_by_type, format_table, hf_greedy_predictor
from vllm_recroute.demo.model import EOU, DemoModelSize, build_model, build_processor


def training_seeds(seed: int):
    """Infinite stream of scene seeds for training, all < HELDOUT_SEED_BASE."""
    rng = random.Random(seed)
    while True:
        yield rng.randrange(0, shapes.HELDOUT_SEED_BASE)


def sample_conversation(scene_seed: int, extra: int) -> tuple[object, list[dict], shapes.Scene]:
    scene, qas = shapes.make_multi_qa(scene_seed, extra=extra)
    msgs: list[dict] = []
    for i, (q, a, _t) in enumerate(qas):
        content = [{"type": "text", "text": q}]
        if i == 0:
            content.insert(0, {"type": "image"})
        msgs.append({"role": "user", "content": content})
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return scene.render(), msgs, scene


def patch_labels(scene: shapes.Scene, grid: int) -> tuple[list[int], list[int], list[int]]:
    """Per visual token (row-major ``grid`` x ``grid`` patches): colour class, shape class
    (0 = background, else 1 + index) of the object whose box holds the patch centre, and
    1 for the patch holding an object's centre. Used only by the auxiliary training loss."""
    step = scene.image_size / grid
    color = [0] * (grid * grid)
    shape = [0] * (grid * grid)
    centre = [0] * (grid * grid)
    for o in scene.objects:
        half = o.size / 2
        for i in range(grid):
            py = (i + 0.5) * step
            if abs(py - o.cy) > half:
                continue
            for j in range(grid):
                px = (j + 0.5) * step
                if abs(px - o.cx) <= half:
                    color[i * grid + j] = 1 + shapes.COLOR_NAMES.index(o.color)
                    shape[i * grid + j] = 1 + shapes.SHAPES.index(o.shape)
        ci = min(grid - 1, int(o.cy // step))
        cj = min(grid - 1, int(o.cx // step))
        centre[ci * grid + cj] = 1
    return color, shape, centre


def relevant_objects(scene: shapes.Scene, qtype: str, question: str) -> list[shapes.Obj]:
    """The objects a question is about (for the attention-supervision training loss)."""
    import re

    words = re.findall(r"\w+", question)
    if qtype == "color_of_shape":
        return scene.find(shape=words[-1])
    if qtype == "relation":
        rel = "left of" if "left" in words else "right of" if "right" in words else words[3]
        (ref,) = scene.find(color=words[-2], shape=words[-1])
        nb = shapes.neighbour(scene, ref, rel)
        return [ref] + ([nb] if nb is not None else [])
    if qtype == "count":
        return scene.find(color=words[2])
    if qtype in ("exists", "row"):
        c, sh = (words[3], words[4]) if qtype == "exists" else (words[4], words[5])
        return scene.find(color=c, shape=sh)
    raise ValueError(qtype)


def object_patches(o: shapes.Obj, image_size: int, grid: int) -> list[int]:
    step = image_size / grid
    half = o.size / 2
    return [
        i * grid + j
        for i in range(grid)
        for j in range(grid)
        if abs((i + 0.5) * step - o.cy) <= half and abs((j + 0.5) * step - o.cx) <= half
    ]


def make_batch(processor, seeds: list[int], extra: int, aux_grid: int = 0, attn_grid: int = 0):
    """Tokenised batch with labels = -100 except answer tokens + <end_of_utterance>."""
    import torch

    tok = processor.tokenizer
    eou = tok.convert_tokens_to_ids(EOU)
    asst = tok.convert_tokens_to_ids("Assistant")
    colon = tok.convert_tokens_to_ids(":")
    images, texts, scenes, targets = [], [], [], []
    for s in seeds:
        img, msgs, scene = sample_conversation(s, extra)
        scenes.append(scene)
        if attn_grid:
            _, qas = shapes.make_multi_qa(s, extra=extra)
            targets.append(
                [
                    sorted(
                        {
                            k
                            for o in relevant_objects(scene, t, q)
                            for k in object_patches(o, scene.image_size, attn_grid)
                        }
                    )
                    for q, _a, t in qas
                ]
            )
        images.append([img])
        texts.append(processor.apply_chat_template(msgs, add_generation_prompt=False))
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    ids = batch["input_ids"]
    labels = torch.full_like(ids, -100)
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        j = 0
        while j < len(row) - 1:
            if row[j] == asst and row[j + 1] == colon:
                k = j + 2
                while k < len(row) and row[k] != eou:
                    labels[b, k] = row[k]
                    k += 1
                if k < len(row):
                    labels[b, k] = eou
                j = k
            j += 1
    batch["labels"] = labels
    if attn_grid:
        # (batch, position predicting the first answer token, visual-token indices it should read)
        img_id = processor.tokenizer.convert_tokens_to_ids("<image>")
        sup = []
        for b in range(ids.shape[0]):
            row = ids[b].tolist()
            img_pos = [k for k, t in enumerate(row) if t == img_id]
            ans_pos = [k + 1 for k in range(len(row) - 1) if row[k] == asst and row[k + 1] == colon]
            for pos, tgt in zip(ans_pos, targets[b], strict=True):
                if tgt:
                    sup.append((b, pos, [img_pos[k] for k in tgt]))
        batch["attn_sup"] = sup
    if aux_grid:
        lab = [patch_labels(sc, aux_grid) for sc in scenes]
        batch["aux_labels"] = torch.tensor(lab, dtype=torch.long)  # (B, 3, grid*grid)
    return batch


def lr_at(step: int, total: int, base: float, warmup: int, final_frac: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def save_checkpoint(model, processor, out: str) -> None:
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    old_notes = os.path.join(out, "TRAINING.md")
    if os.path.exists(old_notes):
        shutil.copy(old_notes, os.path.join(tmp, "TRAINING.md"))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def write_notes(out: str, info: dict) -> None:
    acc = info.get("heldout_accuracy")
    lines = [
        "# Demo VLM training record",
        "",
        "Idefics3 (SmolVLM) architecture trained from scratch on CPU on the synthetic shapes",
        "VQA task (`vllm_recroute/demo/shapes.py`). Reproduce with:",
        "",
        "```",
        info["command"],
        "```",
        "",
        f"- status: {info['status']}",
        f"- steps: {info['step']} / {info['steps']} (batch {info['batch_size']} scenes, "
        f"{info['extra']} extra questions per scene)",
        f"- training data seed: {info['seed']} (scene seeds drawn from `random.Random(seed)` in "
        f"[0, {shapes.HELDOUT_SEED_BASE}))",
        f"- held-out set: {info['eval_n']} examples from seeds "
        f"{shapes.HELDOUT_SEED_BASE}..{shapes.HELDOUT_SEED_BASE + info['eval_n'] - 1} "
        "(`shapes.make_heldout_examples`), greedy decoding",
        f"- wall time: {info['wall_time_s'] / 60:.1f} min on {info['threads']} CPU thread(s) "
        f"({info['machine']})",
        f"- torch {info['torch']}, transformers {info['transformers']}",
        f"- parameters: {info['params'] / 1e6:.2f} M; architecture: `{json.dumps(info['size'])}`",
        f"- optimiser: AdamW lr {info['lr']} (warmup {info['warmup']}, cosine), "
        f"weight decay {info['weight_decay']}, bf16 autocast {info['bf16_autocast']} "
        "(weights are stored in float32)",
        f"- auxiliary dense visual loss (training only, head not saved): weight "
        f"{info['aux_weight']} for the first {info['aux_until']:.0%} of steps (per visual token: "
        "colour / shape of the object under it and whether it holds an object's centre)",
        f"- attention supervision (training only): weight {info['attn_sup_weight']}, head 0 of "
        f"text layers {info['attn_sup_layers']} at each answer position is trained to put its "
        "attention on the visual tokens of the objects the question is about",
        f"- last training loss on answer tokens (EMA): {info.get('loss_ema', float('nan')):.4f}",
        "",
    ]
    if acc:
        lines += ["## Held-out accuracy (full visual-token budget)", "", format_table(acc), ""]
    hist = info.get("history", [])
    if hist:
        lines += [
            "## Accuracy during training",
            "",
            "| step | minutes | overall | " + " | ".join(shapes.QTYPES) + " |",
            "|---" * (3 + len(shapes.QTYPES)) + "|",
        ]
        for h in hist:
            lines.append(
                f"| {h['step']} | {h['minutes']:.1f} | {h['acc']['overall'] * 100:.1f} | "
                + " | ".join(f"{h['acc'].get(t, 0) * 100:.1f}" for t in shapes.QTYPES)
                + " |"
            )
        lines.append("")
    with open(os.path.join(out, "TRAINING.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out, "training_info.json"), "w") as f:
        json.dump(
            {k: v for k, v in info.items() if k != "history"} | {"history": hist}, f, indent=1
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="vllm_recroute/demo/checkpoint")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0, help="training data + init seed")
    ap.add_argument("--batch-size", type=int, default=16, help="scenes per step")
    ap.add_argument("--extra", type=int, default=2, help="extra random questions per scene")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--final-lr-frac", type=float, default=0.05)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-n", type=int, default=250, help="held-out examples per periodic eval")
    ap.add_argument("--final-eval-n", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-minutes", type=float, default=0, help="stop (and finish up) after this")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument(
        "--aux-weight",
        type=float,
        default=0.0,
        help="weight of the auxiliary dense loss on the visual tokens (per-patch colour/shape/"
        "object-centre classification from the connector output; training only, the head is "
        "not saved)",
    )
    ap.add_argument("--aux-until", type=float, default=1.0, help="fraction of steps using it")
    ap.add_argument(
        "--attn-sup-weight",
        type=float,
        default=0.0,
        help="weight of the attention-supervision loss: at each answer position, head 0 of the "
        "--attn-sup-layers must put its attention mass on the visual tokens of the objects the "
        "question is about (-log mass); training only; needs eager attention",
    )
    ap.add_argument("--attn-sup-layers", default="2,3")
    ap.add_argument(
        "--bf16-autocast",
        type=int,
        default=1,
        help="1: bf16 autocast for forward/backward (fp32 master weights; ~2x faster on "
        "AVX512-BF16 CPUs)",
    )
    ap.add_argument("--size", default="{}", help="JSON overrides of DemoModelSize fields")
    args = ap.parse_args(argv)

    import platform

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    size = DemoModelSize(**json.loads(args.size))
    processor = build_processor(size)
    model = build_model(processor, size, seed=args.seed)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )
    if args.attn_sup_weight > 0:
        model.set_attn_implementation("eager")
    sup_layers = [int(x) for x in args.attn_sup_layers.split(",") if x]
    aux_head = None
    aux_feats: list = []
    grid = size.image_size // size.patch_size // size.scale_factor
    if args.aux_weight > 0:
        aux_head = torch.nn.Linear(
            size.text_hidden, 1 + len(shapes.COLOR_NAMES) + 1 + len(shapes.SHAPES) + 2
        )
        opt.add_param_group({"params": list(aux_head.parameters()), "weight_decay": 0.0})
        model.model.connector.register_forward_hook(
            lambda _m, _i, out: aux_feats.append(out) if model.training else None
        )
    cmd = "python -m vllm_recroute.demo.train " + " ".join(
        shlex.quote(a) for a in (argv or sys.argv[1:])
    )
    info = {
        "command": cmd,
        "status": "running",
        "steps": args.steps,
        "step": 0,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "extra": args.extra,
        "lr": args.lr,
        "warmup": args.warmup,
        "weight_decay": args.weight_decay,
        "bf16_autocast": bool(args.bf16_autocast),
        "aux_weight": args.aux_weight,
        "aux_until": args.aux_until,
        "attn_sup_weight": args.attn_sup_weight,
        "attn_sup_layers": args.attn_sup_layers,
        "eval_n": args.eval_n,
        "threads": args.threads,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "params": n_params,
        "size": asdict(size),
        "wall_time_s": 0.0,
        "history": [],
    }
    print(f"params {n_params / 1e6:.2f}M image_seq_len {size.image_seq_len}", flush=True)
    heldout = shapes.make_heldout_examples(args.eval_n)
    seeds = training_seeds(args.seed)
    predictor = hf_greedy_predictor(model, processor)
    t0 = time.time()
    loss_ema = None
    step = 0

    def evaluate(n_examples=None) -> dict:
        exs = heldout if n_examples is None else shapes.make_heldout_examples(n_examples)
        te = time.time()
        acc = accuracy_by_type(predictor, exs)
        print(
            f"[eval] step {step} n={len(exs)} ({time.time() - te:.0f}s) "
            f"overall {acc['overall']:.3f} "
            + " ".join(f"{t}={acc[t]:.3f}" for t in shapes.QTYPES if t in acc),
            flush=True,
        )
        return acc

    def checkpoint(acc: dict, status: str, eval_n: int) -> None:
        info.update(
            step=step,
            status=status,
            wall_time_s=time.time() - t0,
            loss_ema=loss_ema if loss_ema is not None else float("nan"),
            heldout_accuracy=acc,
            eval_n=eval_n,
        )
        info["history"].append({"step": step, "minutes": (time.time() - t0) / 60, "acc": acc})
        if not args.no_save:
            save_checkpoint(model, processor, args.out)
            write_notes(args.out, info)

    stop_reason = "completed"
    while step < args.steps:
        use_aux = aux_head is not None and step < args.aux_until * args.steps
        use_attn = args.attn_sup_weight > 0 and step < args.aux_until * args.steps
        batch = make_batch(
            processor,
            [next(seeds) for _ in range(args.batch_size)],
            args.extra,
            grid if use_aux else 0,
            grid if use_attn else 0,
        )
        attn_sup = batch.pop("attn_sup", None)
        labels = batch.pop("labels")
        aux_labels = batch.pop("aux_labels", None)
        aux_feats.clear()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup, args.final_lr_frac)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.bf16_autocast)):
            fwd = model(**batch, output_attentions=bool(use_attn))
            logits = fwd.logits.float()
        shift_logits = logits[:, :-1]
        shift_labels = labels[:, 1:]
        mask = shift_labels != -100
        loss = torch.nn.functional.cross_entropy(shift_logits[mask], shift_labels[mask])
        aux_loss = None
        if use_aux:
            nc, ns = 1 + len(shapes.COLOR_NAMES), 1 + len(shapes.SHAPES)
            z = aux_head(aux_feats[-1].float())  # (B, grid*grid, nc + ns + 2)
            ce = torch.nn.functional.cross_entropy
            aux_loss = (
                ce(z[..., :nc].reshape(-1, nc), aux_labels[:, 0].reshape(-1))
                + ce(z[..., nc : nc + ns].reshape(-1, ns), aux_labels[:, 1].reshape(-1))
                + ce(z[..., nc + ns :].reshape(-1, 2), aux_labels[:, 2].reshape(-1))
            )
            total = loss + args.aux_weight * aux_loss
        else:
            total = loss
        attn_loss = None
        if use_attn and attn_sup:
            terms = []
            for layer in sup_layers:
                att = fwd.attentions[layer]
                for b, pos, tgt in attn_sup:
                    terms.append(-torch.log(att[b, 0, pos, tgt].float().sum() + 1e-6))
            attn_loss = torch.stack(terms).mean()
            total = total + args.attn_sup_weight * attn_loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        if step % 10 == 0 or step <= 5:
            el = time.time() - t0
            print(
                f"step {step} loss {loss.item():.4f} ema {loss_ema:.4f} gnorm {gn:.2f} "
                + (f"aux {aux_loss.item():.3f} " if aux_loss is not None else "")
                + (f"attn {attn_loss.item():.3f} " if attn_loss is not None else "")
                + f"lr {opt.param_groups[0]['lr']:.2e} elapsed {el / 60:.1f}m "
                + f"({el / step:.2f}s/step)",
                flush=True,
            )
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            checkpoint(evaluate(), "running (partial checkpoint)", args.eval_n)
        if args.max_minutes and (time.time() - t0) / 60 >= args.max_minutes:
            stop_reason = f"stopped at the --max-minutes {args.max_minutes} limit"
            break
    info["steps_run"] = step
    acc = evaluate(args.final_eval_n)
    checkpoint(acc, stop_reason, args.final_eval_n)
    print(format_table(acc), flush=True)
    print(f"done in {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
