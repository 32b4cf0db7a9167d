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
    text = M.prompt_text(processor, "What color is the star?")
    assert text == "<|im_start|>User:<image>What color is the star?<end_of_utterance>\nAssistant:"
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
    from vllm_recroute.demo.train import make_batch

    batch = make_batch(processor, [1, 2], extra=1)
    tok = processor.tokenizer
    eou = tok.convert_tokens_to_ids(M.EOU)
    for b, seed in enumerate([1, 2]):
        _, qas = shapes.make_multi_qa(seed, extra=1)
        lab = [t for t in batch["labels"][b].tolist() if t != -100]
        want = []
        for _, a, _ in qas:
            want += tok(a, add_special_tokens=False)["input_ids"] + [eou]
        assert lab == want


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
