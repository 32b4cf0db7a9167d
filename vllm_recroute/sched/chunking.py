"""The chunk rule of a routed prompt: pure arithmetic on token positions, no vLLM.

A question-conditioned score needs every token from the first image to the prompt's end in
one forward (worker/step.py routes a prompt only then). Text before the first image can be
chunked like any prompt, so the rule only moves a chunk's end:

    prompt:   t t t t [ v v v v v v v v ] t t t q q q      (first image at 4, end 18)
    budget 8: t t t t | v v v v v v v v t t t q q q        (first chunk ends at 4,
                                                            the next takes all 14)

A chunk that would end inside ``[first image, prompt end)`` is cut back to end right before
the first image. A request not admitted yet whose whole remaining prompt fits one step is
not cut: it waits for a step that holds all of it (``admit_whole``). Otherwise a step with
budget left would admit it with only the few text tokens before its image, and vLLM's
admission check (``scheduler_reserve_full_isl``) would count its whole prompt against a
pool that the step's other such admissions count too: over-admission, then preemption.
When the span alone is larger than any step can hold, no cut helps: the
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
    computed: int,
    num_new: int,
    prompt_end: int,
    first_image: int | None,
    fits: bool,
    admit_whole: bool = False,
) -> int:
    """Tokens to schedule for a routed prompt, given vLLM's chunk ``num_new``.

    ``computed``: tokens already computed (a prefix-cache hit included); ``prompt_end``: the
    number of prompt tokens; ``first_image``: where the first multimodal item starts (None:
    text only); ``fits``: :func:`span_fits` of the span. Returns ``num_new`` unless the
    chunk ends strictly inside the span and the span fits one step; then the tokens up to
    the first image (0 when the chunk starts there: the request waits for a step with the
    whole span's budget), or 0 with ``admit_whole`` (a waiting request whose remaining
    prompt fits one step: it is admitted with all of it, at a later step).
    """
    if first_image is None or computed > first_image or not fits:
        return num_new  # text only, the first image already computed, or hopeless
    end = computed + num_new
    if first_image < end < prompt_end:
        return 0 if admit_whole else first_image - computed
    return num_new
