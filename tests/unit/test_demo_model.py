"""Demo VLM tokenizer / processor / config, training batches, and the accuracy helper."""

from __future__ import annotations

import pytest

from vllm_recroute.demo import shapes

pytest.importorskip("transformers")

from vllm_recroute.demo import model as M
from vllm_recroute.demo.evaluate import accuracy_by_type, normalize_answer


@pytest.fixture(scope="module")
def processor():
    return M.build_processor()


def test_tokenizer_covers_task_without_unk(processor):
    tok = processor.tokenizer
    unk = tok.unk_token_id
    for s in range(100):
        for t in shapes.ALL_QTYPES:
            ex = shapes.make_example(s, t)
            ids = tok(ex.question + " " + ex.answer, add_special_tokens=False)["input_ids"]
            assert unk not in ids, ex.question
    for special in M.SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(special) != unk or special == M.UNK
    assert tok.eos_token == M.EOU and tok.bos_token == M.BOS


def test_vocabulary_appends_the_new_words_after_the_original_ids(processor):
    import json
    from pathlib import Path

    vocab = M.vocabulary()
    tok = processor.tokenizer
    # the words of `where` are single tokens, appended at the end
    assert vocab[-3:] == ["Where", "midleft", "midright"]
    for c in ("left", "midleft", "midright", "right"):
        assert len(tok(c, add_special_tokens=False)["input_ids"]) == 1
    ids = tok("bottom midright", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["bottom", "midright"]
    # the 4-layer checkpoint's 96 ids come first, unchanged (it was grown, not retrained);
    # the shipped (grown) checkpoint was trained with exactly these ids
    assert len(vocab) == 96 + 3
    saved = Path(__file__).parents[2] / "vllm_recroute/demo/checkpoint/tokenizer.json"
    shipped = json.loads(saved.read_text())["model"]["vocab"]
    assert shipped == {w: i for i, w in enumerate(vocab)}


def test_chat_template_smolvlm_style(processor):
    # the demo model's prompt format puts the question before the image (TRAINING.md)
    text = M.prompt_text(processor, "What color is the star?")
    assert text == "<|im_start|>User: What color is the star?<image><end_of_utterance>\nAssistant:"
    # the template puts the text first even when a (OpenAI-style) message has the image first
    image_first = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it?"}]}
    ]
    assert processor.apply_chat_template(image_first, add_generation_prompt=True) == (
        "<|im_start|>User: Is it?<image><end_of_utterance>\nAssistant:"
    )
    full = processor.apply_chat_template(
        [
            *M.chat_messages("Is there a red star?"),
            {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
        ]
    )
    assert full.endswith("Assistant: yes<end_of_utterance>\n")


def test_processor_gives_256_visual_tokens(processor):
    ex = shapes.make_example(3)
    batch = processor(
        text=M.prompt_text(processor, ex.question), images=[ex.image], return_tensors="pt"
    )
    ids = batch["input_ids"][0].tolist()
    assert ids.count(processor.tokenizer.convert_tokens_to_ids(M.IMAGE)) == 256
    assert tuple(batch["pixel_values"].shape) == (1, 1, 3, 256, 256)
    # pixels are passed through unresized: x/255 normalised with mean=std=0.5
    px = batch["pixel_values"][0, 0, :, 10, 20]
    r, g, b = ex.image.getpixel((20, 10))
    assert [round(float(v), 4) for v in px] == [round(c / 255 * 2 - 1, 4) for c in (r, g, b)]


def test_config_image_seq_len_and_head_dim(processor):
    size = M.DemoModelSize()
    cfg = M.build_config(processor.tokenizer, size)
    v = cfg.vision_config
    assert ((v.image_size // v.patch_size) ** 2) // cfg.scale_factor**2 == size.image_seq_len >= 256
    assert processor.image_seq_len == size.image_seq_len
    assert cfg.text_config.head_dim >= 32
    assert cfg.image_token_id == processor.tokenizer.convert_tokens_to_ids(M.IMAGE)
    assert cfg.text_config.vocab_size == len(processor.tokenizer)


def test_training_batch_labels_only_answers(processor):
    from training.train import make_batch, relevant_objects, sample_rows

    seeds = [1, 2]
    batch = make_batch(processor, seeds, qper=3, grid=16)
    tok = processor.tokenizer
    eou = tok.convert_tokens_to_ids(M.EOU)
    img = tok.convert_tokens_to_ids(M.IMAGE)
    rows = [(s, *qa) for s in seeds for qa in sample_rows(s, 3)[1]]
    assert batch["rows_per_scene"].tolist() == [len(sample_rows(s, 3)[1]) for s in seeds]
    assert batch["input_ids"].shape[0] == len(rows) == 6
    assert batch["pixel_values"].shape[0] == len(seeds)  # one image per scene
    for b, (seed, q, a, t) in enumerate(rows):
        ids = batch["input_ids"][b].tolist()
        lab = [x for x in batch["labels"][b].tolist() if x != -100]
        assert lab == tok(a, add_special_tokens=False)["input_ids"] + [eou]
        # question first, then <fake_token_around_image><global-img> and the 256 visual tokens
        q_ids = tok(q, add_special_tokens=False)["input_ids"]
        first_img = ids.index(img)
        assert ids[first_img - len(q_ids) - 2 : first_img - 2] == q_ids
        assert ids.count(img) == 256
        assert batch["image_pos"][b].tolist() == [k for k, x in enumerate(ids) if x == img]
        # the answer position is the ':' after 'Assistant', which predicts the first answer token
        pos = int(batch["answer_pos"][b])
        assert tok.convert_ids_to_tokens(ids[pos - 1 : pos + 1]) == ["Assistant", ":"]
        assert batch["labels"][b, pos + 1] == lab[0]
        scene = sample_rows(seed, 3)[0]
        assert int(batch["relevant"][b].sum()) == len(relevant_objects(scene, t, q))
    assert tuple(batch["aux_labels"].shape[:2]) == (len(seeds), 9)


def test_patch_labels_match_scene():
    from training.train import AUX_LABELS, centre_patch, patch_labels

    scene = shapes.make_example(5).scene
    lab = dict(zip(AUX_LABELS, patch_labels(scene, 16), strict=True))
    for o in scene.objects:
        k = centre_patch(o, scene.image_size, 16)
        assert lab["centre"][k] == 1
        assert lab["color"][k] == 1 + shapes.COLOR_NAMES.index(o.color)
        assert lab["shape"][k] == 1 + shapes.SHAPES.index(o.shape)
        assert (lab["row"][k], lab["col"][k]) == (1 + o.row, 1 + o.col)
        nb = shapes.neighbour(scene, o, "left of")
        assert lab["left of"][k] == (1 if nb is None else 2 + shapes.SHAPES.index(nb.shape))
    assert sum(lab["centre"]) == len(scene.objects)


def test_accuracy_by_type():
    exs = shapes.make_heldout_examples(10)

    def oracle(chunk):
        return [e.answer + "." if i % 2 else e.answer.upper() for i, e in enumerate(chunk)]

    acc = accuracy_by_type(oracle, exs, batch_size=3)
    assert acc["overall"] == 1.0 and all(acc[t] == 1.0 for t in shapes.QTYPES)
    assert acc["n"] == {t: 2 for t in shapes.QTYPES}
    wrong = accuracy_by_type(lambda chunk: ["nothing"] * len(chunk), exs)
    assert wrong["overall"] == 0.0
    assert normalize_answer(" Red. ") == "red"


def test_weighted_aux_loss_scales_only_the_neighbour_terms():
    import torch

    from training.train import AUX_LABELS, weighted_aux_loss

    terms = [torch.tensor(float(i + 1)) for i in range(len(AUX_LABELS))]
    plain = sum(range(1, len(AUX_LABELS) + 1))
    neighbour = sum(i + 1 for i, k in enumerate(AUX_LABELS) if k in shapes.RELATIONS)
    assert neighbour > 0
    assert float(weighted_aux_loss(terms, 1.0)) == plain
    assert float(weighted_aux_loss(terms, 3.0)) == plain + 2 * neighbour


def test_batch_with_where_rows(processor):
    from training.train import make_batch, relevant_objects, sample_rows

    weights = {"where": 5.0}
    seeds = [3, 4, 5]
    rows = [(s, *qa) for s in seeds for qa in sample_rows(s, 3, 2, weights, shapes.ALL_QTYPES)[1]]
    assert any(t == "where" for *_, t in rows)
    batch = make_batch(processor, seeds, 3, 16, 2, weights, shapes.ALL_QTYPES)
    tok = processor.tokenizer
    for b, (seed, q, a, t) in enumerate(rows):
        lab = [x for x in batch["labels"][b].tolist() if x != -100]
        assert lab == tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if t == "where":
            assert len(lab) == 3  # row word, column word, <end_of_utterance>
            scene = sample_rows(seed, 3, 2, weights, shapes.ALL_QTYPES)[0]
            (ref,) = relevant_objects(scene, t, q)
            assert shapes.cell_name(ref.row, ref.col) == a
            assert int(batch["relevant"][b].sum()) == 1
    # the default mix stays the five original types
    assert all(t in shapes.QTYPES for s in range(20) for *_, t in sample_rows(s, 3)[1])


TINY = dict(
    vision_hidden=32,
    vision_intermediate=64,
    vision_layers=1,
    vision_heads=1,
    text_hidden=64,
    text_intermediate=96,
    text_layers=2,
    text_heads=2,
)


def _truncate_vocab(model, n: int) -> None:
    """Make `model` look like a checkpoint from before the last words were added."""
    import torch

    with torch.no_grad():
        emb = model.model.text_model.embed_tokens
        small = torch.nn.Embedding(n, emb.weight.shape[1])
        small.weight.copy_(emb.weight[:n])
        model.model.text_model.embed_tokens = small
        head = torch.nn.Linear(model.lm_head.weight.shape[1], n, bias=False)
        head.weight.copy_(model.lm_head.weight[:n])
        model.lm_head = head
    model.config.text_config.vocab_size = n


def test_grown_model_computes_the_small_one_at_init(processor):
    from dataclasses import replace

    import torch

    from training.train import forward, grow_text_layers, layer_source, make_batch

    assert [layer_source(j, 4, 16) for j in (0, 3, 4, 7, 15)] == [
        (0, False),
        (0, True),
        (1, False),
        (1, True),
        (3, True),
    ]
    torch.set_num_threads(1)
    size = M.DemoModelSize(**TINY)
    old = M.build_model(processor, size, seed=1).eval()
    n_old = len(processor.tokenizer) - 3  # the checkpoint's vocabulary had no `where` words
    _truncate_vocab(old, n_old)
    big = replace(size, text_layers=6)
    new = grow_text_layers(old, processor, big, seed=2).eval()
    assert new.config.text_config.num_hidden_layers == 6
    assert new.config.demo_model_size["text_layers"] == 6
    assert new.config.text_config.vocab_size == len(processor.tokenizer)
    layers = new.model.text_model.layers
    for j in range(6):
        src, active = layer_source(j, 2, 6)
        o = layers[j].self_attn.o_proj.weight
        assert bool(o.abs().sum() > 0) == active
        ref = old.model.text_model.layers[src]
        assert torch.equal(layers[j].self_attn.q_proj.weight, ref.self_attn.q_proj.weight)
        if active:
            assert torch.equal(layers[j].mlp.down_proj.weight, ref.mlp.down_proj.weight)
        else:
            assert not layers[j].mlp.down_proj.weight.any()
    batch = make_batch(processor, [7, 8], qper=3)  # original question types: old token ids
    batch.pop("labels")
    with torch.no_grad():
        lo, feats_o, _ = forward(old, batch)
        ln, feats_n, _ = forward(new, batch)
    torch.testing.assert_close(feats_n, feats_o, rtol=0, atol=0)
    torch.testing.assert_close(ln[..., :n_old], lo, rtol=1e-5, atol=1e-6)
    # the new tokens' logits are the mean of the old ones: greedy decoding is unchanged
    assert (ln[..., n_old:].max(-1).values <= lo.max(-1).values + 1e-6).all()
    with pytest.raises(ValueError):
        grow_text_layers(old, processor, replace(size, text_layers=5))
    with pytest.raises(ValueError):
        grow_text_layers(old, processor, replace(big, text_hidden=128, text_heads=4))


def test_extend_vocab_keeps_old_rows(processor):
    import torch

    from training.train import extend_vocab

    model = M.build_model(processor, M.DemoModelSize(**TINY), seed=3)
    n = len(processor.tokenizer)
    _truncate_vocab(model, n - 3)
    emb = model.model.text_model.embed_tokens.weight.detach().clone()
    extend_vocab(model, n)
    new = model.model.text_model.embed_tokens.weight
    assert new.shape[0] == n == model.lm_head.weight.shape[0] == model.config.text_config.vocab_size
    assert torch.equal(new[: n - 3], emb)
    torch.testing.assert_close(new[n - 1], emb.mean(0))


def test_freeze_keeps_copied_weights(processor):
    import torch

    from training.train import (
        copied_param_names,
        forward,
        freeze_old_grads,
        grow_text_layers,
        layer_source,
        make_batch,
        zeroed_param_names,
    )

    torch.set_num_threads(1)
    size = M.DemoModelSize(**{**TINY, "text_layers": 4})
    old = M.build_model(processor, M.DemoModelSize(**TINY), seed=1)
    n_old = len(processor.tokenizer) - 3
    _truncate_vocab(old, n_old)
    new = grow_text_layers(old, processor, size, seed=2)
    copied = copied_param_names(new, 2)
    zeroed = zeroed_param_names(new, 2)
    assert zeroed == {
        f"model.text_model.layers.{j}.{m}.weight"
        for j in (0, 2)
        for m in ("self_attn.o_proj", "mlp.down_proj")
    }
    assert not zeroed & copied
    names = dict(new.named_parameters())
    assert (
        "lm_head.weight" in copied and "model.connector.modality_projection.proj.weight" in copied
    )
    for j in range(4):
        active = layer_source(j, 2, 4)[1]
        assert (f"model.text_model.layers.{j}.mlp.up_proj.weight" in copied) == active
    batch = make_batch(processor, [9], qper=3, qtypes=shapes.ALL_QTYPES)
    labels = batch.pop("labels")
    logits, _, _ = forward(new, batch)
    mask = labels[:, 1:] != -100
    torch.nn.functional.cross_entropy(logits[:, :-1][mask], labels[:, 1:][mask]).backward()
    freeze_old_grads(new, 2, n_old)
    for n, p in names.items():
        if n in ("lm_head.weight", "model.text_model.embed_tokens.weight"):
            assert not p.grad[:n_old].any()
        elif n in copied:
            assert p.grad is None, n
    assert any(names[n].grad is not None and names[n].grad.any() for n in names if n not in copied)
