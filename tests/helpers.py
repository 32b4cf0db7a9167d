"""Prompt building shared by engine tests and the oracle (same processor, same ids)."""

from __future__ import annotations

from functools import lru_cache

from vllm_recroute.tiny_models import make_test_image


@lru_cache(maxsize=4)
def processor_for(model_dir: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir)


def chat_prompt(model_dir: str, question: str, num_images: int = 1, before: str = "") -> str:
    """User turn: optional text ``before`` the images, the images, the question."""
    content = [{"type": "text", "text": before}] if before else []
    content += [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": question})
    messages = [{"role": "user", "content": content}]
    return processor_for(model_dir).apply_chat_template(messages, add_generation_prompt=True)


def hf_inputs(model_dir: str, prompt: str, images: list) -> dict:
    proc = processor_for(model_dir)
    return dict(proc(text=[prompt], images=[images], return_tensors="pt"))


# (image seeds, image size, question): different images and prompt lengths; requests 0
# and 2 share an image with different questions (the prefix-caching hazard).
REQUESTS = [
    ((1,), 128, "what is in the picture?"),
    ((2,), 96, "describe the colors of the shapes on the left side of the image please"),
    ((1,), 128, "where is the red square?"),
]


def request_inputs(model_dir: str, spec) -> tuple[str, list]:
    seeds, size, question = spec
    images = [make_test_image(seed, size=size) for seed in seeds]
    return chat_prompt(model_dir, question, len(images)), images
