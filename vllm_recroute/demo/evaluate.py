"""Held-out accuracy per question type (HF side; the predictor is pluggable).

``accuracy_by_type(predict_fn, examples)`` works with any predictor that maps a list of
``shapes.Example`` to a list of answer strings, e.g. ``hf_greedy_predictor(model, processor)``
below or a vLLM-backed one.

    python -m vllm_recroute.demo.evaluate --model vllm_recroute/demo/checkpoint --n 500
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Callable, Sequence

from vllm_recroute.demo import shapes

PredictFn = Callable[[Sequence[shapes.Example]], list[str]]


def normalize_answer(text: str) -> str:
    """Lower-case, strip whitespace and trailing punctuation (the answer is one word)."""
    return text.strip().lower().rstrip(".!?").strip()


def accuracy_by_type(
    predict_fn: PredictFn,
    examples: Sequence[shapes.Example],
    batch_size: int = 50,
    return_predictions: bool = False,
) -> dict:
    """Exact-match accuracy per question type, plus ``"overall"`` (over all examples) and
    ``"n"`` (example count per type). ``predict_fn`` gets lists of up to ``batch_size``
    examples and must return one answer string per example."""
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    preds: list[str] = []
    for i in range(0, len(examples), batch_size):
        chunk = list(examples[i : i + batch_size])
        out = predict_fn(chunk)
        if len(out) != len(chunk):
            raise ValueError(f"predict_fn returned {len(out)} answers for {len(chunk)} examples")
        for ex, p in zip(chunk, out, strict=True):
            preds.append(p)
            total[ex.qtype] += 1
            correct[ex.qtype] += int(normalize_answer(p) == normalize_answer(ex.answer))
    res: dict = {t: correct[t] / total[t] for t in shapes.ALL_QTYPES if total[t]}
    res["overall"] = sum(correct.values()) / max(1, sum(total.values()))
    res["n"] = {t: total[t] for t in shapes.ALL_QTYPES if total[t]}
    if return_predictions:
        res["predictions"] = preds
    return res


def hf_greedy_predictor(model, processor, max_new_tokens: int = 4) -> PredictFn:
    """Real greedy decoding with the HF model (batched, left-padded). The answer is the
    decoded text up to the first ``<end_of_utterance>``; a model that never emits it within
    ``max_new_tokens`` gets all its tokens decoded (and so is wrong unless it's the word)."""
    import torch

    from vllm_recroute.demo.model import prompt_text

    tok = processor.tokenizer
    eou = tok.convert_tokens_to_ids("<end_of_utterance>")

    def predict(examples: Sequence[shapes.Example]) -> list[str]:
        texts = [prompt_text(processor, ex.question) for ex in examples]
        old_side = tok.padding_side
        tok.padding_side = "left"
        try:
            batch = processor(
                text=texts,
                images=[[ex.image] for ex in examples],
                return_tensors="pt",
                padding=True,
            )
        finally:
            tok.padding_side = old_side
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eou,
                pad_token_id=tok.pad_token_id,
            )
        if was_training:
            model.train()
        new = out[:, batch["input_ids"].shape[1] :].tolist()
        answers = []
        for ids in new:
            if eou in ids:
                ids = ids[: ids.index(eou)]
            answers.append(tok.decode(ids, skip_special_tokens=True))
        return answers

    return predict


def format_table(acc: dict) -> str:
    lines = ["| question type | n | accuracy |", "|---|---|---|"]
    for t in shapes.ALL_QTYPES:
        if t in acc:
            lines.append(f"| {t} | {acc['n'][t]} | {acc[t] * 100:.1f}% |")
    lines.append(f"| **overall** | {sum(acc['n'].values())} | {acc['overall'] * 100:.1f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="vllm_recroute/demo/checkpoint")
    ap.add_argument("--n", type=int, default=500, help="held-out examples (balanced over types)")
    ap.add_argument("--seed", type=int, default=shapes.HELDOUT_SEED_BASE)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--qtypes",
        default="",
        help='"" (default) the five original question types, "all" also the newer ones '
        "(shapes.ALL_QTYPES), or a comma list",
    )
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    torch.set_num_threads(args.threads)
    processor = AutoProcessor.from_pretrained(args.model)
    model = Idefics3ForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    qtypes = shapes.parse_qtypes(args.qtypes)
    exs = shapes.make_heldout_examples(args.n, args.seed, qtypes=qtypes)
    acc = accuracy_by_type(hf_greedy_predictor(model, processor), exs)
    print(format_table(acc))
    print(json.dumps(acc))


if __name__ == "__main__":
    main()
