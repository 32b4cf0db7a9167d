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
        for t in shapes.QTYPES:
            ex = shapes.make_example(s, t)
            ids = tok(ex.question + " " + ex.answer, add_special_tokens=False)["input_ids"]
            assert unk not in ids, ex.question
    for special in M.SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(special) != unk or special == M.UNK
    assert tok.eos_token == M.EOU and tok.bos_token == M.BOS


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
    from vllm_recroute.demo.train import make_batch, relevant_objects, sample_rows

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
    from vllm_recroute.demo.train import AUX_LABELS, centre_patch, patch_labels

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

    from vllm_recroute.demo.train import AUX_LABELS, weighted_aux_loss

    terms = [torch.tensor(float(i + 1)) for i in range(len(AUX_LABELS))]
    plain = sum(range(1, len(AUX_LABELS) + 1))
    neighbour = sum(i + 1 for i, k in enumerate(AUX_LABELS) if k in shapes.RELATIONS)
    assert neighbour > 0
    assert float(weighted_aux_loss(terms, 1.0)) == plain
    assert float(weighted_aux_loss(terms, 3.0)) == plain + 2 * neighbour
