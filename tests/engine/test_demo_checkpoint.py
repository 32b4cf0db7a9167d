"""The shipped demo checkpoint (16 text layers, six question types including the grounding
type `where`) loads through the routed architecture and answers held-out questions at full
budget as the HF model does (and still answers under routing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import ROUTED_IDEFICS3, make_llm, shutdown

pytestmark = pytest.mark.engine

CHECKPOINT = Path(__file__).resolve().parents[2] / "vllm_recroute" / "demo" / "checkpoint"
N = 24  # the first N held-out examples, 4 per question type; never used in training
# 23/24 measured on this machine with the shipped float16 weights (one relation answer
# wrong; TRAINING.md: 97.0% on 600 held-out); the per-type answer prior is ~35%, so a
# broken or untrained model fails, and so does the 4-layer model (its vocabulary has no
# `where` words) and the previous 16-layer checkpoint (29% on `where`).
MIN_CORRECT = 22


def _examples(n: int = N):
    from vllm_recroute.demo.shapes import ALL_QTYPES, make_heldout_examples

    return make_heldout_examples(n, qtypes=ALL_QTYPES)


@pytest.fixture(scope="module")
def demo_llm():
    assert (CHECKPOINT / "config.json").exists(), f"demo checkpoint missing at {CHECKPOINT}"
    llm = make_llm(CHECKPOINT, routed_arch=ROUTED_IDEFICS3, recroute={"mode": "off"})
    yield llm
    shutdown(llm)


def _answers(llm, examples, xargs=None) -> list[str]:
    from transformers import AutoProcessor
    from vllm import SamplingParams

    from vllm_recroute.demo.model import prompt_text

    proc = AutoProcessor.from_pretrained(str(CHECKPOINT))
    reqs = [
        {"prompt": prompt_text(proc, ex.question), "multi_modal_data": {"image": ex.image}}
        for ex in examples
    ]
    params = SamplingParams(temperature=0, max_tokens=4, extra_args=xargs)
    outs = llm.generate(reqs, params, use_tqdm=False)
    return [o.outputs[0].text.split("<end_of_utterance>")[0].strip().lower() for o in outs]


def test_the_shipped_model_is_the_deep_one():
    config = json.loads((CHECKPOINT / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 16
    assert config["demo_model_size"]["text_layers"] == 16


def test_full_budget_answers_held_out_questions(demo_llm):
    """Through vLLM and the routed architecture at full budget, the shipped checkpoint gives
    the answers the HF model gives (greedy), and is right about as often as its training
    record says (checkpoint/TRAINING.md)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vllm_recroute.demo.evaluate import hf_greedy_predictor, normalize_answer

    examples = _examples()
    answers = _answers(demo_llm, examples)
    hf = AutoModelForImageTextToText.from_pretrained(str(CHECKPOINT), dtype=torch.float32)
    proc = AutoProcessor.from_pretrained(str(CHECKPOINT))
    expected = [normalize_answer(a) for a in hf_greedy_predictor(hf, proc)(examples)]
    assert answers == expected
    correct = sum(a == ex.answer for a, ex in zip(answers, examples, strict=True))
    wrong = [(a, ex.answer) for a, ex in zip(answers, examples, strict=True) if a != ex.answer]
    assert correct >= MIN_CORRECT, (correct, wrong)


def test_routed_model_still_answers(demo_llm):
    examples = _examples()
    xargs = {"recroute_mode": "reroute", "recroute_schedule": "pdrop"}
    answers = _answers(demo_llm, examples, xargs)
    vocabulary = {ex.answer for ex in _examples(300)}
    assert all(a in vocabulary for a in answers), answers  # well-formed answers
