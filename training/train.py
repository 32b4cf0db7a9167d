"""Train the demo VLM from scratch on CPU on the synthetic shapes VQA task.

    python training/train.py --out vllm_recroute/demo/checkpoint --steps 3000 --seed 0

(from the repository root; outside the installed package, like the rest of ``training/``.
The shipped checkpoint, ``vllm_recroute/demo/checkpoint``, stays in the package.)

Each training row is one single-turn question about a scene (from a training seed, always
< shapes.HELDOUT_SEED_BASE), in the demo model's prompt format: the question BEFORE the
image (``model.chat_messages``), so that the visual tokens can read the question causally.
Several rows (``--qper``, different question types) share one scene and its vision-tower
pass. The loss is on answer tokens and their ``<end_of_utterance>``, plus training-only
auxiliary losses (heads not saved): a dense per-visual-token loss on the connector output
(colour / shape / object centre / grid row / grid column / neighbour shapes of the object
under the patch), a relevance loss on the text model's visual tokens (is this the centre of
an object the question is about), and optionally attention supervision at the answer
position. Held-out accuracy is measured with real greedy decoding
(``evaluate.hf_greedy_predictor``) on held-out seeds. The checkpoint (model + processor, HF
format) is saved at every evaluation, so an interrupted run still leaves a usable model, and
``TRAINING.md`` records the command, seeds, steps, wall time and accuracy per question type.

Depth up-scaling (``--init-from CKPT --grow-layers N``, block expansion as in LLaMA-Pro):
the model starts as CKPT's with each of its L text layers copied N / L times (new layer j is
old layer j // (N / L)); in every group of copies only the last keeps its ``o_proj`` and
``down_proj`` weights, the others get them zeroed, so their residual branches add nothing and
the grown model computes exactly CKPT's function at init (``grow_text_layers``).
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
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from vllm_recroute.demo import shapes
from vllm_recroute.demo.evaluate import accuracy_by_type, format_table, hf_greedy_predictor
from vllm_recroute.demo.model import (
    EOU,
    DemoModelSize,
    build_model,
    build_processor,
    chat_messages,
)


def training_seeds(seed: int):
    """Infinite stream of scene seeds for training, all < HELDOUT_SEED_BASE."""
    rng = random.Random(seed)
    while True:
        yield rng.randrange(0, shapes.HELDOUT_SEED_BASE)


def sample_rows(
    scene_seed: int,
    qper: int,
    extra: int = 2,
    type_weights: dict[str, float] | None = None,
    qtypes: tuple[str, ...] = shapes.QTYPES,
) -> tuple[shapes.Scene, list[tuple[str, str, str]]]:
    """One scene and up to `qper` single-turn (question, answer, qtype) rows about it.

    Without ``type_weights``: question types in the random order of ``shapes.make_multi_qa``
    (so they differ within a scene). With them: each row's type is drawn with these relative
    weights (missing types weigh 1), e.g. to oversample the weak types; the scene is the same
    as ``make_multi_qa`` draws for that seed, questions within a scene are distinct. The types
    come from ``qtypes`` (default: the five original ones, as before ``where`` existed)."""
    if not type_weights:
        scene, qas = shapes.make_multi_qa(scene_seed, extra=extra, qtypes=qtypes)
        return scene, qas[:qper]
    rng = random.Random(scene_seed)
    scene = shapes.make_scene(rng)
    weights = [type_weights.get(t, 1.0) for t in qtypes]
    rows: list[tuple[str, str, str]] = []
    for _ in range(8 * qper):
        if len(rows) == qper:
            break
        t = rng.choices(qtypes, weights=weights)[0]
        qa = shapes.make_question(scene, t, rng)
        if qa is not None and all(qa[0] != q for q, _, _ in rows):
            rows.append((qa[0], qa[1], t))
    return scene, rows


def parse_type_weights(spec: str, qtypes: tuple[str, ...] = shapes.QTYPES) -> dict[str, float]:
    """``"relation=3,count=2"`` -> ``{"relation": 3.0, "count": 2.0}`` (types checked against
    ``qtypes``)."""
    out: dict[str, float] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, _, value = item.partition("=")
        if name not in qtypes:
            raise ValueError(f"unknown question type {name!r} in --type-weights")
        out[name] = float(value)
    return out


def conversation(question: str, answer: str) -> list[dict]:
    """One training row in the demo model's prompt format (question, then image; see
    ``model.chat_messages``) with its answer turn."""
    return [
        *chat_messages(question),
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


# auxiliary per-visual-token labels (training only): name -> number of classes
AUX_LABELS: dict[str, int] = {
    "color": 1 + len(shapes.COLOR_NAMES),  # 0 = background
    "shape": 1 + len(shapes.SHAPES),
    "centre": 2,
    "row": 1 + shapes.GRID_ROWS,
    "col": 1 + shapes.GRID_COLS,
    # shape of the object's nearest neighbour on that side (0 = background, 1 = none)
    "left of": 2 + len(shapes.SHAPES),
    "right of": 2 + len(shapes.SHAPES),
    "above": 2 + len(shapes.SHAPES),
    "below": 2 + len(shapes.SHAPES),
}


def patch_labels(scene: shapes.Scene, grid: int) -> list[list[int]]:
    """Per visual token (row-major ``grid`` x ``grid`` patches), one class per ``AUX_LABELS``
    entry: colour / shape / grid row / grid column / neighbour shapes of the object whose box
    holds the patch centre, and 1 for the patch holding an object's centre. Used only by the
    auxiliary training loss."""
    n = grid * grid
    lab = {k: [0] * n for k in AUX_LABELS}
    for o in scene.objects:
        for k in object_patches(o, scene.image_size, grid):
            lab["color"][k] = 1 + shapes.COLOR_NAMES.index(o.color)
            lab["shape"][k] = 1 + shapes.SHAPES.index(o.shape)
            lab["row"][k] = 1 + o.row
            lab["col"][k] = 1 + o.col
            for rel in shapes.RELATIONS:
                nb = shapes.neighbour(scene, o, rel)
                lab[rel][k] = 1 if nb is None else 2 + shapes.SHAPES.index(nb.shape)
        lab["centre"][centre_patch(o, scene.image_size, grid)] = 1
    return [lab[k] for k in AUX_LABELS]


def centre_patch(o: shapes.Obj, image_size: int, grid: int) -> int:
    step = image_size / grid
    return min(grid - 1, int(o.cy // step)) * grid + min(grid - 1, int(o.cx // step))


def relevant_objects(scene: shapes.Scene, qtype: str, question: str) -> list[shapes.Obj]:
    """The objects a question is about (for the relevance / attention training losses): the
    referent (``relation``: the named object, whose neighbour labels hold the answer; ``row``
    and ``where``: the named object), all objects of the colour (``count``), the matching
    objects (``exists``: possibly none)."""
    import re

    words = re.findall(r"\w+", question)
    if qtype == "color_of_shape":
        return scene.find(shape=words[-1])
    if qtype in ("relation", "where"):
        return scene.find(color=words[-2], shape=words[-1])
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


def make_batch(
    processor,
    seeds: list[int],
    qper: int = 3,
    grid: int = 0,
    extra: int = 2,
    type_weights: dict[str, float] | None = None,
    qtypes: tuple[str, ...] = shapes.QTYPES,
):
    """Tokenised batch: for each scene seed up to `qper` single-turn rows (question, image,
    answer). ``pixel_values`` holds one image per scene and ``rows_per_scene`` says how many
    consecutive rows use it. Labels are -100 except the answer tokens + <end_of_utterance>.
    With ``grid`` > 0 also the auxiliary targets: ``aux_labels`` (scenes, len(AUX_LABELS),
    grid*grid), ``relevant`` (rows, grid*grid; 1 on the centre patch of each object the
    question is about), ``image_pos`` (rows, grid*grid; sequence positions of the visual
    tokens) and ``answer_pos`` (rows; the position whose logits predict the first answer
    token)."""
    import torch

    tok = processor.tokenizer
    eou = tok.convert_tokens_to_ids(EOU)
    asst = tok.convert_tokens_to_ids("Assistant")
    colon = tok.convert_tokens_to_ids(":")
    img_id = tok.convert_tokens_to_ids("<image>")
    images, texts, counts, scenes, rel_rows = [], [], [], [], []
    for s in seeds:
        scene, qas = sample_rows(s, qper, extra, type_weights, qtypes)
        img = scene.render()
        scenes.append(scene)
        counts.append(len(qas))
        for q, a, t in qas:
            images.append([img])
            texts.append(processor.apply_chat_template(conversation(q, a)))
            if grid:
                rel = [0] * (grid * grid)
                for o in relevant_objects(scene, t, q):
                    rel[centre_patch(o, scene.image_size, grid)] = 1
                rel_rows.append(rel)
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    first = [sum(counts[:i]) for i in range(len(counts))]
    batch["pixel_values"] = batch["pixel_values"][first]
    if "pixel_attention_mask" in batch:
        batch["pixel_attention_mask"] = batch["pixel_attention_mask"][first]
    batch["rows_per_scene"] = torch.tensor(counts)
    ids = batch["input_ids"]
    labels = torch.full_like(ids, -100)
    answer_pos = []
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        j = 0
        while j < len(row) - 1:
            if row[j] == asst and row[j + 1] == colon:
                answer_pos.append(j + 1)
                k = j + 2
                while k < len(row) and row[k] != eou:
                    labels[b, k] = row[k]
                    k += 1
                if k < len(row):
                    labels[b, k] = eou
                j = k
            j += 1
    batch["labels"] = labels
    if grid:
        batch["aux_labels"] = torch.tensor([patch_labels(sc, grid) for sc in scenes])
        batch["relevant"] = torch.tensor(rel_rows, dtype=torch.float32)
        batch["image_pos"] = torch.stack(
            [(ids[b] == img_id).nonzero()[:, 0] for b in range(ids.shape[0])]
        )
        batch["answer_pos"] = torch.tensor(answer_pos)
    return batch


def forward(model, batch, output_attentions: bool = False):
    """The HF model's forward, written out so that one image's visual features serve all of
    its rows (``rows_per_scene``). Returns (logits, connector output per scene, text-model
    output with hidden states)."""
    import torch

    inner = model.model
    feats = inner.get_image_features(
        batch["pixel_values"], batch.get("pixel_attention_mask"), return_dict=True
    ).pooler_output
    rows = torch.repeat_interleave(feats, batch["rows_per_scene"], dim=0)
    ids = batch["input_ids"]
    emb = inner.text_model.get_input_embeddings()(ids)
    mask = (ids == model.config.image_token_id).unsqueeze(-1)
    emb = emb.masked_scatter(mask, rows.to(emb.dtype))
    out = inner.text_model(
        inputs_embeds=emb,
        attention_mask=batch["attention_mask"],
        output_hidden_states=True,
        output_attentions=output_attentions,
        use_cache=False,
    )
    return model.lm_head(out.last_hidden_state), feats, out


def aux_terms(z, aux_labels, nb_object_only: bool = False) -> list:
    """Cross-entropy per ``AUX_LABELS`` entry of the dense head's logits ``z`` (scenes,
    grid*grid, sum of classes). With ``nb_object_only`` the neighbour terms ignore background
    patches (label 0), so they measure (and train) the neighbour shape on object patches only
    instead of being diluted by the ~80% of patches that are background."""
    import torch

    terms, o = [], 0
    for i, (name, nc) in enumerate(AUX_LABELS.items()):
        ignore = 0 if nb_object_only and name in shapes.RELATIONS else -100
        y = aux_labels[:, i].reshape(-1)
        t = torch.nn.functional.cross_entropy(
            z[..., o : o + nc].reshape(-1, nc), y, ignore_index=ignore
        )
        terms.append(t if (y != ignore).any() else t.new_zeros(()))
        o += nc
    return terms


def weighted_aux_loss(terms: list, nb_weight: float):
    """Sum of the auxiliary terms with the neighbour-shape terms scaled by ``nb_weight``:
    ``relation`` is read from those labels, and they are learned last (attempt 5's record)."""
    import torch

    w = [nb_weight if name in shapes.RELATIONS else 1.0 for name in AUX_LABELS]
    return torch.stack([t * wi for t, wi in zip(terms, w, strict=True)]).sum()


def load_init(init_from: str, size: DemoModelSize, vocab_size: int | None = None):
    """The model of an existing checkpoint dir (float32), for continued training. Its
    architecture must be ``size`` (so the result stays loadable and of the same size). With
    ``vocab_size`` larger than the checkpoint's (words appended to ``model.vocabulary()``
    since it was trained), its embedding and output matrices get the new rows
    (``extend_vocab``)."""
    import torch
    from transformers import Idefics3ForConditionalGeneration

    model = Idefics3ForConditionalGeneration.from_pretrained(init_from, dtype=torch.float32)
    saved = getattr(model.config, "demo_model_size", None)
    if saved is not None and DemoModelSize(**saved) != size:
        raise ValueError(f"{init_from} has size {saved}, not {asdict(size)}")
    if vocab_size is not None and vocab_size != model.config.text_config.vocab_size:
        extend_vocab(model, vocab_size)
    return model


def new_vocab_rows(old, n_new: int):
    """Rows for ``n_new`` tokens appended to an embedding / output matrix ``old`` (V, d): the
    mean of the old rows (HF's mean resizing without its noise). For the output matrix this
    makes each new token's logit the mean of the old tokens' logits, so greedy decoding over
    the old vocabulary is unchanged at init (the mean never exceeds the max)."""
    return old.mean(dim=0, keepdim=True).expand(n_new, -1).clone()


def extend_vocab(model, vocab_size: int) -> None:
    """Grow ``model``'s input embeddings and ``lm_head`` in place to ``vocab_size`` rows (old
    rows kept at their ids, new rows from ``new_vocab_rows``) and record it in the config."""
    import torch

    emb = model.model.text_model.embed_tokens
    old_v = emb.weight.shape[0]
    if vocab_size < old_v:
        raise ValueError(f"cannot shrink the vocabulary from {old_v} to {vocab_size}")
    with torch.no_grad():
        w = emb.weight
        new_emb = torch.nn.Embedding(vocab_size, w.shape[1], padding_idx=emb.padding_idx)
        new_emb.weight.copy_(torch.cat([w, new_vocab_rows(w, vocab_size - old_v)]))
        model.model.text_model.embed_tokens = new_emb
        h = model.lm_head.weight
        new_head = torch.nn.Linear(h.shape[1], vocab_size, bias=False)
        new_head.weight.copy_(torch.cat([h, new_vocab_rows(h, vocab_size - old_v)]))
        model.lm_head = new_head
    model.config.text_config.vocab_size = vocab_size
    if hasattr(model.config, "vocab_size"):
        model.config.vocab_size = vocab_size


def layer_source(j: int, old_layers: int, new_layers: int) -> tuple[int, bool]:
    """(old layer that new text layer ``j`` copies, whether ``j`` is that layer's active copy).
    Each old layer k becomes the f = new/old consecutive layers f*k .. f*k+f-1; the LAST of
    them is the active copy, so old layer k's output is new layer f*k+f-1's at init, and the
    zeroed copies in front of it see exactly the input distribution its weights were trained
    on (the previous active copy's output)."""
    f = new_layers // old_layers
    return j // f, j % f == f - 1


def copied_param_names(model, old_layers: int) -> set[str]:
    """Names of a grown model's parameters copied from its checkpoint (everything but the
    zeroed layer copies; embeddings and ``lm_head`` count as copied)."""
    new_layers = model.config.text_config.num_hidden_layers
    fresh = {
        f"model.text_model.layers.{j}."
        for j in range(new_layers)
        if not layer_source(j, old_layers, new_layers)[1]
    }
    return {n for n, _ in model.named_parameters() if not any(n.startswith(f) for f in fresh)}


def zeroed_param_names(model, old_layers: int) -> set[str]:
    """Names of the ``o_proj`` / ``down_proj`` weights a grown model's copies got zeroed."""
    new_layers = model.config.text_config.num_hidden_layers
    return {
        f"model.text_model.layers.{j}.{m}.weight"
        for j in range(new_layers)
        if not layer_source(j, old_layers, new_layers)[1]
        for m in ("self_attn.o_proj", "mlp.down_proj")
    }


def freeze_old_grads(model, old_layers: int, n_old_vocab: int) -> None:
    """Drop the gradients of everything a grown model copied from its checkpoint unchanged
    (vision tower, connector, final norm, the active layer copies, the old vocabulary rows of
    the embeddings / ``lm_head``), so that an optimiser step only moves the zeroed copies and
    the new words' rows (params without a gradient are skipped by AdamW, decay included)."""
    new_layers = model.config.text_config.num_hidden_layers
    for j, layer in enumerate(model.model.text_model.layers):
        if layer_source(j, old_layers, new_layers)[1]:
            for p in layer.parameters():
                p.grad = None
    text = model.model.text_model
    for mod in (model.model.vision_model, model.model.connector, text.norm):
        for p in mod.parameters():
            p.grad = None
    for w in (text.embed_tokens.weight, model.lm_head.weight):
        if w.grad is not None:
            w.grad[:n_old_vocab] = 0


def grow_text_layers(old_model, processor, size: DemoModelSize, seed: int = 0):
    """Depth up-scaling by block expansion (LLaMA-Pro): a fresh model of ``size`` (which must
    equal ``old_model``'s size but for ``text_layers``, a multiple of the old count) whose
    every weight is copied from ``old_model``: vision tower, connector, final norm, embeddings
    and ``lm_head`` as they are (new vocabulary rows from ``new_vocab_rows``), text layer j
    from old layer ``layer_source(j)[0]``, with ``o_proj`` and ``down_proj`` zeroed in all but
    the active copy. A layer whose two output projections are zero adds nothing to the
    residual stream, so the grown model's logits over the old vocabulary equal the old
    model's at init; training then moves the zeroed copies away from identity."""
    import re

    import torch

    old_size = getattr(old_model.config, "demo_model_size", None)
    old_layers = old_model.config.text_config.num_hidden_layers
    if old_size is not None and DemoModelSize(**old_size) != replace(size, text_layers=old_layers):
        raise ValueError(f"cannot grow size {old_size} into {asdict(size)}")
    if size.text_layers % old_layers:
        raise ValueError(f"{size.text_layers} text layers is not a multiple of {old_layers}")
    new_model = build_model(processor, size, seed=seed)
    old_sd = old_model.state_dict()
    new_sd = new_model.state_dict()
    layer_re = re.compile(r"^(model\.text_model\.layers\.)(\d+)(\..*)$")
    vocab_keys = ("model.text_model.embed_tokens.weight", "lm_head.weight")
    out = {}
    for key, target in new_sd.items():
        m = layer_re.match(key)
        if m:
            src, active = layer_source(int(m.group(2)), old_layers, size.text_layers)
            w = old_sd[f"{m.group(1)}{src}{m.group(3)}"].clone()
            if not active and key.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
                w.zero_()
        elif key in vocab_keys:
            w = old_sd[key]
            w = torch.cat([w, new_vocab_rows(w, target.shape[0] - w.shape[0])])
        else:
            w = old_sd[key].clone()
        if w.shape != target.shape:
            raise ValueError(f"{key}: {tuple(w.shape)} vs {tuple(target.shape)}")
        out[key] = w
    new_model.load_state_dict(out, strict=True)
    return new_model


def previous_run(init_from: str) -> dict:
    """Summary of the run that produced ``init_from`` (from its training_info.json)."""
    path = os.path.join(init_from, "training_info.json")
    if not os.path.exists(path):
        return {"dir": init_from}
    with open(path) as f:
        prev = json.load(f)
    keys = ("command", "seed", "steps_run", "wall_time_s", "heldout_accuracy", "previous")
    return {"dir": init_from} | {k: prev[k] for k in keys if k in prev}


def head_losses(aux_head, rel_head, feats, out, batch, rel_layer: int, nb_object_only: bool):
    """(auxiliary dense loss terms, relevance loss) of the training-only heads."""
    import torch

    z = aux_head(feats).float()  # (scenes, grid*grid, sum of classes)
    terms = aux_terms(z, batch["aux_labels"], nb_object_only)
    hs = out.hidden_states[rel_layer + 1]  # output of text layer rel_layer
    rows = torch.arange(hs.shape[0]).unsqueeze(1)
    vis = hs[rows, batch["image_pos"]]  # (rows, grid*grid, hidden)
    r = rel_head(vis).float().squeeze(-1)
    rel_loss = torch.nn.functional.binary_cross_entropy_with_logits(
        r, batch["relevant"], pos_weight=torch.tensor(10.0)
    )
    return terms, rel_loss


def update_ema(ema: dict[str, float], terms, decay: float = 0.98) -> None:
    for name, t in zip(AUX_LABELS, terms, strict=True):
        v = float(t.detach())
        ema[name] = v if name not in ema else decay * ema[name] + (1 - decay) * v


def warm_up_heads(model, heads, opt, make, args) -> dict[str, float]:
    """``args.head_warmup`` steps fitting only the training-only heads on the frozen model
    (model params get no gradient, so the optimiser leaves them and their state alone).
    ``make()`` gives a batch with auxiliary targets. Returns the per-term aux loss EMA."""
    import torch

    ema: dict[str, float] = {}
    for g in opt.param_groups:
        g["lr"] = args.lr
    for i in range(args.head_warmup):
        batch = make()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.bf16_autocast)):
            with torch.no_grad():
                _, feats, out = forward(model, batch)
            terms, rel_loss = head_losses(
                *heads, feats, out, batch, args.rel_layer, bool(args.nb_object_only)
            )
        opt.zero_grad(set_to_none=True)
        (torch.stack(terms).sum() + rel_loss).backward()
        opt.step()
        update_ema(ema, terms, decay=0.9)
        if (i + 1) % 10 == 0:
            print(
                f"head warm-up {i + 1}/{args.head_warmup} rel {rel_loss.item():.3f} "
                + " ".join(f"{k}={v:.3f}" for k, v in ema.items()),
                flush=True,
            )
    return ema


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


def previous_commands(prev: dict | None) -> list[str]:
    """The commands that produced the starting checkpoint, oldest first."""
    if not prev:
        return []
    return [*previous_commands(prev.get("previous")), prev.get("command", f"# ({prev['dir']})")]


def grow_notes(info: dict) -> list[str]:
    """TRAINING.md lines on the depth up-scaling and where the auxiliary losses sit in it."""
    old, new = info["grown_from_layers"], info["size"]["text_layers"]
    f = new // old
    sup = [int(x) for x in str(info.get("attn_sup_layers", "")).split(",") if x]

    def old_of(j: int) -> str:
        k, active = layer_source(j, old, new)
        return f"{j} (copy of old layer {k}{', active' if active else ''})"

    lines = [
        f"- depth up-scaling (`--grow-layers {new}`, block expansion as in LLaMA-Pro): the "
        f"{old}-layer starting checkpoint's text layer k became layers {f}k..{f}k+{f - 1}; the "
        f"last of each group (the active copy) keeps all weights, the other {f - 1} have "
        "`o_proj` and `down_proj` zeroed, so at init they add nothing to the residual stream "
        f"and the {new}-layer model computes the {old}-layer one (old layer k's output = new "
        f"layer {f}k+{f - 1}'s); the zeroed copies in front of an active one see the input its "
        "weights were trained on. Vision tower, connector, final norm, embeddings and "
        "`lm_head` copied; rows of words added to the vocabulary since = the mean of the old "
        "rows. The training objective knows nothing about visual-token routing",
        f"- auxiliary layers in the grown model: relevance probe after text layer "
        f"{old_of(info['rel_layer'])}; attention supervision on head 0 of layers "
        + ", ".join(old_of(j) for j in sup),
    ]
    if info.get("grow_zeroed_lr_mult", 1.0) != 1.0:
        lines.append(
            f"- the zeroed `o_proj` / `down_proj` weights trained at {info['grow_zeroed_lr_mult']}"
            " x the learning rate: at zero their gradient is a sum of outer products with one "
            "sign pattern, so Adam's first steps move every element by the full learning rate "
            "the same way (measured on the 4-layer checkpoint grown to 16: one such step at "
            "1e-4 took the answer loss on the original types from 0.03 to 14, at 1e-5 to 0.028;"
            " a first 16-layer attempt with these weights at the full 3e-4 fell to 62% held-out "
            "by step 200)"
        )
    if info.get("freeze_old_steps"):
        lines.append(
            f"- for the first {info['freeze_old_steps']} steps only the zeroed copies and the "
            "new words' embedding / `lm_head` rows were trained (the copied weights got no "
            "update, as in LLaMA-Pro), so the old question types kept the checkpoint's "
            "function while the new layers and `where` were learned; after that everything "
            f"trained, the copied weights with their own {info['warmup']}-step learning-rate "
            "warm-up (their Adam moments start fresh at the unfreeze)"
        )
    if old == 4 and info["rel_layer"] == new // 4 - 1 and sup == list(range(new // 2, new)):
        lines[-1] += (
            ". In the 4-layer model they were layer 1 and layers 2,3, i.e. relevance "
            "marked half-way and the answer position's attention supervised in the second half; "
            "here the second half is supervised the same way (its copies of old layers 2,3 start "
            "with the old attention patterns on the old inputs), while relevance is asked for "
            "after the first quarter, where at init only old layer 0 has run: the copies of old "
            "layer 0 have to learn the marking, which leaves the later layers to work on the "
            "marked tokens"
        )
    return lines


def write_notes(out: str, info: dict) -> None:
    acc = info.get("heldout_accuracy")
    prev = info.get("previous")
    how = "continued from an earlier checkpoint" if prev else "trained from scratch"
    lines = [
        "# Demo VLM training record",
        "",
        f"Idefics3 (SmolVLM) architecture {how} on CPU on the synthetic shapes",
        "VQA task (`vllm_recroute/demo/shapes.py`). Reproduce with:",
        "",
        "```",
        *previous_commands(prev),
        info["command"],
        "```",
        "",
    ]
    if prev:
        lines += [
            f"- continuation (`--init-from {prev['dir']}`): the command before the last one "
            f"above produced the starting checkpoint ({prev.get('steps_run', '?')} steps, "
            f"data seed {prev.get('seed', '?')}, {prev.get('wall_time_s', 0) / 60:.1f} min, "
            f"held-out {prev.get('heldout_accuracy', {}).get('overall', float('nan')):.1%}); "
            f"the training-only heads were freshly initialised and fitted for "
            f"{info.get('head_warmup', 0)} steps on the frozen model first",
        ]
    if info.get("grown_from_layers"):
        lines += grow_notes(info)
    if tuple(info.get("qtypes", shapes.QTYPES)) != shapes.QTYPES:
        lines.append(f"- question types (training rows and held-out sets): `{info['qtypes']}`")
    if info.get("type_weights"):
        lines.append(f"- question-type weights in the training mix: `{info['type_weights']}`")
    if info.get("nb_object_only"):
        lines.append("- neighbour terms of the auxiliary loss on object patches only")
    if info.get("nb_weight", 1.0) != 1.0:
        lines.append(f"- neighbour terms weighted {info['nb_weight']} in the auxiliary loss")
    if info.get("aux_terms_ema"):
        terms = ", ".join(f"{k} {v:.3f}" for k, v in info["aux_terms_ema"].items())
        lines.append(f"- auxiliary loss per term at the end (EMA): {terms}")
    if info.get("aux_terms_after_head_warmup"):
        terms = ", ".join(f"{k} {v:.3f}" for k, v in info["aux_terms_after_head_warmup"].items())
        lines.append(f"- auxiliary loss per term after the head warm-up (EMA): {terms}")
    lines += [
        f"- status: {info['status']}",
        f"- steps: {info['step']} / {info['steps']} (batch {info['batch_size']} scenes x "
        f"{info.get('qper', 1)} single-turn question rows per scene)",
        f"- training data seed: {info['seed']} (scene seeds drawn from `random.Random(seed)` in "
        f"[0, {shapes.HELDOUT_SEED_BASE}))",
        f"- held-out set: {info['eval_n']} examples from seeds "
        f"{shapes.HELDOUT_SEED_BASE}..{shapes.HELDOUT_SEED_BASE + info['eval_n'] - 1} "
        "(`shapes.make_heldout_examples`), greedy decoding",
        f"- wall time: {info['wall_time_s'] / 60:.1f} min on {info['threads']} CPU thread(s) "
        f"({info['machine']})",
        f"- torch {info['torch']}, transformers {info['transformers']}",
        f"- parameters: {info['params'] / 1e6:.2f} M; architecture: `{json.dumps(info['size'])}`",
        f"- optimiser: AdamW lr {info['lr']} (warmup {info['warmup']}, cosine to "
        f"{info.get('final_lr_frac', 0.05)} x), "
        f"weight decay {info['weight_decay']}, bf16 autocast {info['bf16_autocast']} "
        "(weights are stored in float32)"
        + (
            "; after the warm-up, schedule position = max(step / steps, fraction of the time "
            "budget passed) (`--lr-by-time`)"
            if info.get("lr_by_time")
            else ""
        ),
        "- prompt format: question before the image "
        "(`User: {question}<image><end_of_utterance>\\nAssistant:`)",
        f"- auxiliary dense visual loss (training only, head not saved): weight "
        f"{info['aux_weight']} for the first {info['aux_until']:.0%} of steps (per visual token: "
        "colour / shape / grid row / grid column / neighbour shapes of the object under it and "
        "whether it holds an object's centre)",
        f"- relevance loss (training only, probe not saved): weight {info.get('rel_weight')}, "
        f"visual-token hidden states after text layer {info.get('rel_layer')} must say whether "
        "the token is the centre of an object the question is about",
        f"- attention supervision (training only): weight {info['attn_sup_weight']}, head 0 of "
        f"text layers {info['attn_sup_layers']} at each answer position is trained to put its "
        "attention on the centre tokens of the objects the question is about",
        f"- last training loss on answer tokens (EMA): {info.get('loss_ema', float('nan')):.4f}",
        "",
    ]
    if acc:
        lines += ["## Held-out accuracy (full visual-token budget)", "", format_table(acc), ""]
    hist = info.get("history", [])
    qtypes = info.get("qtypes", shapes.QTYPES)
    if hist:
        lines += [
            "## Accuracy during training",
            "",
            "| step | minutes | overall | " + " | ".join(qtypes) + " |",
            "|---" * (3 + len(qtypes)) + "|",
        ]
        for h in hist:
            lines.append(
                f"| {h['step']} | {h['minutes']:.1f} | {h['acc']['overall'] * 100:.1f} | "
                + " | ".join(f"{h['acc'].get(t, 0) * 100:.1f}" for t in qtypes)
                + " |"
            )
        lines.append("")
    with open(os.path.join(out, "TRAINING.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out, "training_info.json"), "w") as f:
        json.dump(
            {k: v for k, v in info.items() if k != "history"} | {"history": hist}, f, indent=1
        )


def _add_run_args(ap: argparse.ArgumentParser) -> None:
    """Output, schedule, evaluation and time limits."""
    ap.add_argument("--out", default="vllm_recroute/demo/checkpoint")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0, help="training data + init seed")
    ap.add_argument("--batch-size", type=int, default=8, help="scenes per step")
    ap.add_argument("--qper", type=int, default=3, help="question rows per scene (image shared)")
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
    ap.add_argument(
        "--lr-by-time",
        type=int,
        default=0,
        help="1 (with --max-minutes): after the --warmup steps, the learning-rate schedule's "
        "position is the larger of step / --steps and the fraction of the time left after the "
        "head warm-up that has passed, so a run slowed down (e.g. by a shared CPU) still ends "
        "its cosine decay when the time limit stops it",
    )
    ap.add_argument("--no-save", action="store_true")


def _add_loss_args(ap: argparse.ArgumentParser) -> None:
    """The training-only auxiliary losses."""
    ap.add_argument(
        "--aux-weight",
        type=float,
        default=1.0,
        help="weight of the auxiliary dense loss on the visual tokens (per-patch colour / shape /"
        " object centre / grid row / grid column / neighbour shapes, from the connector output;"
        " training only, the head is not saved)",
    )
    ap.add_argument(
        "--rel-weight",
        type=float,
        default=1.0,
        help="weight of the relevance loss: a linear probe on the text model's visual-token "
        "hidden states after --rel-layer must say whether the token is the centre of an object "
        "the question is about (training only, the probe is not saved)",
    )
    ap.add_argument("--rel-layer", type=int, default=1, help="text layer (0-based) for it")
    ap.add_argument("--aux-until", type=float, default=1.0, help="fraction of steps using them")
    ap.add_argument(
        "--attn-sup-weight",
        type=float,
        default=0.0,
        help="weight of the attention-supervision loss: at each answer position, head 0 of the "
        "--attn-sup-layers must put its attention mass on the centre tokens of the objects the "
        "question is about (-log mass); training only; needs eager attention",
    )
    ap.add_argument("--attn-sup-layers", default="2,3")


def _add_model_args(ap: argparse.ArgumentParser) -> None:
    """Precision, architecture, and where the weights start (fresh, a checkpoint, grown)."""
    ap.add_argument(
        "--bf16-autocast",
        type=int,
        default=1,
        help="1: bf16 autocast for forward/backward (fp32 master weights; ~2x faster on "
        "AVX512-BF16 CPUs)",
    )
    ap.add_argument("--size", default="{}", help="JSON overrides of DemoModelSize fields")
    ap.add_argument(
        "--init-from",
        default="",
        help="start from the weights of this HF checkpoint dir (same architecture) instead of a "
        "fresh init; the training-only heads are freshly initialised (see --head-warmup)",
    )
    ap.add_argument(
        "--grow-layers",
        type=int,
        default=0,
        help="with --init-from: depth up-scaling to this many text layers (a multiple of the "
        "checkpoint's); new layer j copies old layer j // (N / L), all copies but the last of "
        "each old layer with o_proj / down_proj zeroed, so the grown model starts as the "
        "checkpoint's function (block expansion, LLaMA-Pro); --size then describes the rest",
    )
    ap.add_argument(
        "--freeze-old-steps",
        type=int,
        default=0,
        help="with --grow-layers: for the first this many steps only the zeroed layer copies "
        "and the embedding / lm_head rows of new words are trained (LLaMA-Pro's recipe); the "
        "starting checkpoint's weights get no update until then",
    )
    ap.add_argument(
        "--grow-zeroed-lr-mult",
        type=float,
        default=1.0,
        help="with --grow-layers: learning-rate multiplier of the zeroed o_proj / down_proj "
        "weights. At zero their gradients are coherent (sum of outer products with the same "
        "sign pattern), so Adam's first steps move every element by the full learning rate in "
        "the same direction; for the 4-layer demo checkpoint one such step at 1e-4 took the "
        "answer loss from 0.03 to 14",
    )


def _add_data_args(ap: argparse.ArgumentParser) -> None:
    """Question types and mix, the heads' warm-up, the neighbour terms."""
    ap.add_argument(
        "--qtypes",
        default="",
        help='question types of the training rows and held-out evals: "" (default) the five '
        'original ones, "all" also the newer ones (shapes.ALL_QTYPES), or a comma list',
    )
    ap.add_argument(
        "--head-warmup",
        type=int,
        default=0,
        help="steps fitting only the fresh training-only heads (model frozen, lr --lr) before "
        "the schedule starts, so their random init does not push noise into the model",
    )
    ap.add_argument(
        "--type-weights",
        default="",
        help='relative weights of question types in the training rows, e.g. "relation=3,count=2"'
        " (others 1); default: every type the scene hosts, in random order",
    )
    ap.add_argument(
        "--nb-object-only",
        type=int,
        default=0,
        help="1: the auxiliary neighbour-shape terms ignore background patches",
    )
    ap.add_argument(
        "--nb-weight",
        type=float,
        default=1.0,
        help="weight of the four neighbour-shape terms inside the auxiliary loss (others 1)",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    for add in (_add_run_args, _add_loss_args, _add_model_args, _add_data_args):
        add(ap)
    return ap


def check_args(args: argparse.Namespace) -> None:
    if args.grow_layers and not args.init_from:
        raise SystemExit("--grow-layers needs --init-from")
    if args.freeze_old_steps and not args.grow_layers:
        raise SystemExit("--freeze-old-steps needs --grow-layers")


def initial_model(args: argparse.Namespace, size: DemoModelSize, processor):
    """(model, its size, text layers of the checkpoint it was grown from or None, that
    checkpoint's vocabulary size or 0): a fresh model, ``--init-from``'s, or ``--init-from``'s
    grown to ``--grow-layers`` text layers."""
    import torch

    if args.init_from and args.grow_layers:
        from transformers import Idefics3ForConditionalGeneration

        old = Idefics3ForConditionalGeneration.from_pretrained(args.init_from, dtype=torch.float32)
        grown_from = old.config.text_config.num_hidden_layers
        n_old_vocab = old.config.text_config.vocab_size
        size = replace(size, text_layers=args.grow_layers)
        model = grow_text_layers(old, processor, size, seed=args.seed)
        del old
        torch.manual_seed(args.seed)  # the fresh training-only heads below
        return model, size, grown_from, n_old_vocab
    if args.init_from:
        model = load_init(args.init_from, size, vocab_size=len(processor.tokenizer))
        torch.manual_seed(args.seed)  # the fresh training-only heads below
        return model, size, None, 0
    return build_model(processor, size, seed=args.seed), size, None, 0


def param_groups(model, args: argparse.Namespace, grown_from: int | None) -> list[dict]:
    """The optimiser's parameter groups: fresh / copied / zeroed parameters (the last two
    only in a grown model), each with and without weight decay; empty groups left out."""
    copied = copied_param_names(model, grown_from) if grown_from else set()
    zeroed = zeroed_param_names(model, grown_from) if grown_from else set()
    groups = []
    for part in ("fresh", "copied", "zeroed"):
        named = [
            (n, p)
            for n, p in model.named_parameters()
            if part == ("zeroed" if n in zeroed else "copied" if n in copied else "fresh")
        ]
        decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
        extra = {"copied": part == "copied" and args.freeze_old_steps > 0}
        extra["lr_mult"] = args.grow_zeroed_lr_mult if part == "zeroed" else 1.0
        groups += [
            {"params": decay, "weight_decay": args.weight_decay, **extra},
            {"params": no_decay, "weight_decay": 0.0, **extra},
        ]
    return [g for g in groups if g["params"]]


def make_optimizer(model, args: argparse.Namespace, grown_from: int | None):
    import torch

    return torch.optim.AdamW(
        param_groups(model, args, grown_from), lr=args.lr, betas=(0.9, 0.98), eps=1e-8
    )


def training_heads(opt, size: DemoModelSize) -> tuple:
    """The training-only heads (dense auxiliary head on the connector output, relevance probe
    on the text model's visual tokens), fresh, and added to ``opt`` without weight decay."""
    import torch

    aux_head = torch.nn.Linear(size.text_hidden, sum(AUX_LABELS.values()))
    rel_head = torch.nn.Linear(size.text_hidden, 1)
    opt.add_param_group(
        {"params": [*aux_head.parameters(), *rel_head.parameters()], "weight_decay": 0.0}
    )
    return aux_head, rel_head


# how TRAINING.md says to run this file (from the repository root); same CLI as the
# `python -m vllm_recroute.demo.train` it was until issue 23
COMMAND = "python training/train.py"


def command_line(argv: list[str] | None) -> str:
    return COMMAND + " " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))


def run_info(
    args: argparse.Namespace,
    argv: list[str] | None,
    model,
    size: DemoModelSize,
    qtypes: tuple[str, ...],
    type_weights: dict[str, float],
    grown_from: int | None,
) -> dict:
    """The run's record (``training_info.json``, and TRAINING.md through ``write_notes``)."""
    import platform

    import torch
    import transformers

    info = {
        "command": command_line(argv),
        "status": "running",
        "steps": args.steps,
        "step": 0,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "qper": args.qper,
        "extra": args.extra,
        "lr": args.lr,
        "warmup": args.warmup,
        "weight_decay": args.weight_decay,
        "bf16_autocast": bool(args.bf16_autocast),
        "aux_weight": args.aux_weight,
        "aux_until": args.aux_until,
        "rel_weight": args.rel_weight,
        "rel_layer": args.rel_layer,
        "attn_sup_weight": args.attn_sup_weight,
        "attn_sup_layers": args.attn_sup_layers,
        "final_lr_frac": args.final_lr_frac,
        "type_weights": type_weights,
        "qtypes": list(qtypes),
        "grown_from_layers": grown_from,
        "nb_object_only": bool(args.nb_object_only),
        "nb_weight": args.nb_weight,
        "head_warmup": args.head_warmup,
        "freeze_old_steps": args.freeze_old_steps,
        "lr_by_time": bool(args.lr_by_time),
        "grow_zeroed_lr_mult": args.grow_zeroed_lr_mult,
        "eval_n": args.eval_n,
        "threads": args.threads,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "params": sum(p.numel() for p in model.parameters()),
        "size": asdict(size),
        "wall_time_s": 0.0,
        "history": [],
    }
    if args.init_from:
        info["previous"] = previous_run(args.init_from)
    return info


@dataclass
class Run:
    """One run's state, shared by the training loop, the evaluations and the checkpoints."""

    args: argparse.Namespace
    model: Any
    processor: Any
    opt: Any
    heads: tuple
    info: dict
    qtypes: tuple[str, ...]
    type_weights: dict[str, float]
    grid: int  # visual tokens per side (the auxiliary targets' grid)
    sup_layers: list[int]  # --attn-sup-layers
    grown_from: int | None
    n_old_vocab: int
    heldout: list  # the periodic evaluations' examples
    seeds: Iterator[int]  # training scene seeds
    predictor: Callable
    t0: float  # start time
    step: int = 0
    loss_ema: float | None = None
    aux_ema: dict[str, float] = field(default_factory=dict)

    def evaluate(self, n_examples: int | None = None) -> dict:
        exs = (
            self.heldout
            if n_examples is None
            else shapes.make_heldout_examples(n_examples, qtypes=self.qtypes)
        )
        te = time.time()
        acc = accuracy_by_type(self.predictor, exs)
        print(
            f"[eval] step {self.step} n={len(exs)} ({time.time() - te:.0f}s) "
            f"overall {acc['overall']:.3f} "
            + " ".join(f"{t}={acc[t]:.3f}" for t in self.qtypes if t in acc),
            flush=True,
        )
        return acc

    def checkpoint(self, acc: dict, status: str, eval_n: int) -> None:
        self.info.update(
            step=self.step,
            status=status,
            wall_time_s=time.time() - self.t0,
            loss_ema=self.loss_ema if self.loss_ema is not None else float("nan"),
            heldout_accuracy=acc,
            eval_n=eval_n,
        )
        minutes = (time.time() - self.t0) / 60
        self.info["history"].append({"step": self.step, "minutes": minutes, "acc": acc})
        if not self.args.no_save:
            save_checkpoint(self.model, self.processor, self.args.out)
            write_notes(self.args.out, self.info)

    def make(self, with_aux: bool = True):
        """The next training batch (with the auxiliary targets unless ``with_aux`` is off)."""
        a = self.args
        return make_batch(
            self.processor,
            [next(self.seeds) for _ in range(a.batch_size)],
            a.qper,
            self.grid if with_aux else 0,
            a.extra,
            self.type_weights,
            self.qtypes,
        )


@dataclass
class StepLosses:
    total: Any  # what is back-propagated
    answer: Any  # next-token loss on the answer tokens
    aux: Any = None
    rel: Any = None
    attn: Any = None


def _autocast(args: argparse.Namespace):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.bf16_autocast))


def set_learning_rates(run: Run, t_loop: float) -> int:
    """Set every parameter group's learning rate for ``run.step``; returns the schedule's
    step (``run.step``, or further along with ``--lr-by-time``)."""
    args, step = run.args, run.step
    sched_step = step
    if args.lr_by_time and args.max_minutes and step >= args.warmup:
        # after the warm-up the schedule runs on whichever is further along: steps or the
        # time left after the head warm-up (so a slowed-down run still anneals)
        frac = (time.time() - t_loop) / max(1.0, 60 * args.max_minutes - (t_loop - run.t0))
        sched_step = max(step, min(args.steps, int(frac * args.steps)))
    for g in run.opt.param_groups:
        g["lr"] = lr_at(sched_step, args.steps, args.lr, args.warmup, args.final_lr_frac)
        g["lr"] *= g.get("lr_mult", 1.0)
        if g.get("copied") and step >= args.freeze_old_steps:
            # the copied weights' own warm-up once they are unfrozen (fresh Adam moments)
            g["lr"] *= min(1.0, (step - args.freeze_old_steps + 1) / max(1, args.warmup))
    return sched_step


def attention_sup_loss(out, batch, sup_layers: list[int]):
    """Mean over rows and ``sup_layers`` of -log(attention mass of head 0 at the answer
    position on the centre tokens of the question's objects); None if no row has any."""
    import torch

    terms = []
    for layer in sup_layers:
        att = out.attentions[layer]
        for b in range(att.shape[0]):
            tgt = batch["image_pos"][b][batch["relevant"][b] > 0]
            if len(tgt):
                pos = batch["answer_pos"][b]
                terms.append(-torch.log(att[b, 0, pos, tgt].float().sum() + 1e-6))
    return torch.stack(terms).mean() if terms else None


def step_losses(run: Run, batch, labels, use_aux: bool, use_attn: bool) -> StepLosses:
    """One step's forward pass and losses (updates the auxiliary terms' EMA)."""
    import torch

    args = run.args
    with _autocast(args):
        logits, feats, out = forward(run.model, batch, output_attentions=use_attn)
    logits = logits.float()
    shift_logits = logits[:, :-1]
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    loss = torch.nn.functional.cross_entropy(shift_logits[mask], shift_labels[mask])
    res = StepLosses(total=loss, answer=loss)
    if use_aux:
        with _autocast(args):
            terms, res.rel = head_losses(
                *run.heads, feats, out, batch, args.rel_layer, bool(args.nb_object_only)
            )
        res.aux = weighted_aux_loss(terms, args.nb_weight)
        update_ema(run.aux_ema, terms)
        run.info["aux_terms_ema"] = run.aux_ema
        res.total = res.total + args.aux_weight * res.aux + args.rel_weight * res.rel
    if use_attn:
        res.attn = attention_sup_loss(out, batch, run.sup_layers)
        if res.attn is not None:
            res.total = res.total + args.attn_sup_weight * res.attn
    return res


def optimiser_step(run: Run, total) -> Any:
    """Back-propagate ``total`` and step (gradients of the copied weights dropped during
    ``--freeze-old-steps``, norm clipped to 1); returns the gradient norm before clipping."""
    import torch

    run.opt.zero_grad(set_to_none=True)
    total.backward()
    if run.step < run.args.freeze_old_steps:
        freeze_old_grads(run.model, run.grown_from, run.n_old_vocab)
    gn = torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
    run.opt.step()
    return gn


def log_step(run: Run, losses: StepLosses, gn) -> None:
    step = run.step
    if step % 10 == 0 or step <= 5:
        el = time.time() - run.t0
        print(
            f"step {step} loss {losses.answer.item():.4f} ema {run.loss_ema:.4f} gnorm {gn:.2f} "
            + (f"aux {losses.aux.item():.3f} " if losses.aux is not None else "")
            + (f"rel {losses.rel.item():.3f} " if losses.rel is not None else "")
            + (f"attn {losses.attn.item():.3f} " if losses.attn is not None else "")
            + f"lr {run.opt.param_groups[0]['lr']:.2e} elapsed {el / 60:.1f}m "
            + f"({el / step:.2f}s/step)",
            flush=True,
        )
    if step % 100 == 0 and run.aux_ema:
        print("aux terms " + " ".join(f"{k}={v:.3f}" for k, v in run.aux_ema.items()), flush=True)


def time_limit_reason(args: argparse.Namespace, sched_step: int, t0: float) -> str | None:
    """Why the run stops now (``--max-minutes``), or None."""
    if args.lr_by_time and sched_step >= args.steps:
        return f"stopped at the --max-minutes {args.max_minutes} limit (schedule done)"
    if args.max_minutes and (time.time() - t0) / 60 >= args.max_minutes:
        return f"stopped at the --max-minutes {args.max_minutes} limit"
    return None


def train(run: Run) -> str:
    """The training loop, from ``run.step`` to ``--steps`` or the time limit; returns why it
    stopped. Checkpoints (with an evaluation) every ``--eval-every`` steps."""
    args = run.args
    t_loop = time.time()
    while run.step < args.steps:
        use_aux = run.step < args.aux_until * args.steps
        use_attn = args.attn_sup_weight > 0 and use_aux
        batch = run.make(use_aux)
        labels = batch.pop("labels")
        sched_step = set_learning_rates(run, t_loop)
        losses = step_losses(run, batch, labels, use_aux, use_attn)
        gn = optimiser_step(run, losses.total)
        run.step += 1
        loss = losses.answer.item()
        run.loss_ema = loss if run.loss_ema is None else 0.98 * run.loss_ema + 0.02 * loss
        log_step(run, losses, gn)
        if args.eval_every and run.step % args.eval_every == 0 and run.step < args.steps:
            run.checkpoint(run.evaluate(), "running (partial checkpoint)", args.eval_n)
        reason = time_limit_reason(args, sched_step, run.t0)
        if reason:
            return reason
    return "completed"


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    size = DemoModelSize(**json.loads(args.size))
    check_args(args)
    processor = build_processor(size)
    model, size, grown_from, n_old_vocab = initial_model(args, size, processor)
    qtypes = shapes.parse_qtypes(args.qtypes)
    type_weights = parse_type_weights(args.type_weights, qtypes)
    model.train()
    opt = make_optimizer(model, args, grown_from)
    if args.attn_sup_weight > 0:
        model.set_attn_implementation("eager")
    heads = training_heads(opt, size)
    info = run_info(args, argv, model, size, qtypes, type_weights, grown_from)
    print(f"params {info['params'] / 1e6:.2f}M image_seq_len {size.image_seq_len}", flush=True)
    run = Run(
        args=args,
        model=model,
        processor=processor,
        opt=opt,
        heads=heads,
        info=info,
        qtypes=qtypes,
        type_weights=type_weights,
        grid=size.image_size // size.patch_size // size.scale_factor,
        sup_layers=[int(x) for x in args.attn_sup_layers.split(",") if x],
        grown_from=grown_from,
        n_old_vocab=n_old_vocab,
        heldout=shapes.make_heldout_examples(args.eval_n, qtypes=qtypes),
        seeds=training_seeds(args.seed),
        predictor=hf_greedy_predictor(model, processor),
        t0=time.time(),
    )
    if args.head_warmup:
        info["aux_terms_after_head_warmup"] = warm_up_heads(model, heads, opt, run.make, args)
    stop_reason = train(run)
    info["steps_run"] = run.step
    acc = run.evaluate(args.final_eval_n)
    run.checkpoint(acc, stop_reason, args.final_eval_n)
    print(format_table(acc), flush=True)
    print(f"done in {(time.time() - run.t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
