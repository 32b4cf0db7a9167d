"""The chunk rule of a routed prompt: pure arithmetic on token positions, no vLLM.

A question-conditioned score needs every token from the first image to the prompt's end in
one forward (worker/step.py routes a prompt only then). Text before the first image can be
chunked like any prompt, so the rule only moves a chunk's end:

    prompt:   t t t t [ v v v v v v v v ] t t t q q q      (first image at 4, end 18)
    budget 8: t t t t | v v v v v v v v t t t q q q        (first chunk ends at 4,
                                                            the next takes all 14)

A chunk that would end inside ``[first image, prompt end)`` is cut back to end right before
the first image. When the span alone is larger than any step can hold, no cut helps: the
chunk stays as vLLM chose it, and the worker runs the prompt unrouted (counted in
``chunked_fallbacks``).
"""

from __future__ import annotations

__all__ = ["aligned_chunk", "span_fits"]


def span_fits(
    prompt_end: int,
    first_image: int,
    step_tokens: int,
    span_embeds: int = 0,
    step_embeds: int | None = None,
) -> bool:
    """Whether one step can hold the span ``[first_image, prompt_end)``: its tokens within
    ``step_tokens`` and its images' encoder embeddings within ``step_embeds`` (None: no
    encoder limit), since vLLM runs a chunk's encoder inputs in the same step."""
    if prompt_end - first_image > step_tokens:
        return False
    return step_embeds is None or span_embeds <= step_embeds


def aligned_chunk(
    computed: int, num_new: int, prompt_end: int, first_image: int | None, fits: bool
) -> int:
    """Tokens to schedule for a routed prompt, given vLLM's chunk ``num_new``.

    ``computed``: tokens already computed (a prefix-cache hit included); ``prompt_end``: the
    number of prompt tokens; ``first_image``: where the first multimodal item starts (None:
    text only); ``fits``: :func:`span_fits` of the span. Returns ``num_new`` unless the
    chunk ends strictly inside the span and the span fits one step; then the tokens up to
    the first image (0 when the chunk starts there: the request waits for a step with the
    whole span's budget).
    """
    if first_image is None or computed > first_image or not fits:
        return num_new  # text only, the first image already computed, or hopeless
    end = computed + num_new
    if first_image < end < prompt_end:
        return first_image - computed
    return num_new
