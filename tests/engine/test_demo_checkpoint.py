"""The shipped demo checkpoint loads through the routed architecture and answers held-out
questions at full budget (and still answers under routing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import ROUTED_IDEFICS3, make_llm, shutdown

pytestmark = pytest.mark.engine

CHECKPOINT = Path(__file__).resolve().parents[2] / "vllm_recroute" / "demo" / "checkpoint"
N = 20  # the first N held-out examples, 4 per question type; never used in training


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


def test_full_budget_answers_held_out_questions(demo_llm):
    """Through vLLM and the routed architecture at full budget, the shipped checkpoint gives
    the answers the HF model gives (greedy), and is right about as often as its training
    record says (checkpoint/TRAINING.md)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vllm_recroute.demo.evaluate import hf_greedy_predictor, normalize_answer
    from vllm_recroute.demo.shapes import make_heldout_examples

    examples = make_heldout_examples(N)
    answers = _answers(demo_llm, examples)
    hf = AutoModelForImageTextToText.from_pretrained(str(CHECKPOINT), dtype=torch.float32)
    proc = AutoProcessor.from_pretrained(str(CHECKPOINT))
    expected = [normalize_answer(a) for a in hf_greedy_predictor(hf, proc)(examples)]
    assert answers == expected
    correct = sum(a == ex.answer for a, ex in zip(answers, examples, strict=True))
    # 20/20 measured on this machine (TRAINING.md: 96.2% over 1000 held-out examples). The
    # attempt-5 checkpoint (84.4%) got 18/20 here, so this fails if an older or weaker model is
    # shipped; the per-type answer prior is ~37%.
    assert correct >= 19


def test_routed_model_still_answers(demo_llm):
    from vllm_recroute.demo.shapes import make_heldout_examples

    examples = make_heldout_examples(N)
    xargs = {"recroute_mode": "reroute", "recroute_schedule": "pdrop"}
    answers = _answers(demo_llm, examples, xargs)
    vocabulary = {ex.answer for ex in make_heldout_examples(200)}
    assert all(a in vocabulary for a in answers), answers  # well-formed one-word answers
