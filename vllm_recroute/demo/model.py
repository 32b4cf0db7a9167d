"""Config, tokenizer and processor of the demo VLM (Idefics3 / SmolVLM architecture).

Everything here is built from code (no hub download): a word-level tokenizer over the
shapes task's vocabulary, an ``Idefics3Processor`` (PIL image processor + tokenizer +
SmolVLM-style chat template) and a small ``Idefics3Config`` (SigLIP-style vision tower,
identity pixel-shuffle connector, Llama text model).

Image pipeline: the generator's 256x256 images go through the vision tower as a single
256 px tile (no splitting) with 16 px patches and ``scale_factor=1``, so every image is
``(256 / 16) ** 2 = 256`` visual tokens in the language model.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from vllm_recroute.demo import shapes

PAD = "<pad>"
UNK = "<unk>"
BOS = "<|im_start|>"
EOU = "<end_of_utterance>"
IMAGE = "<image>"
FAKE = "<fake_token_around_image>"
GLOBAL_IMG = "<global-img>"
ROW_COL = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
SPECIAL_TOKENS = [PAD, UNK, BOS, EOU, IMAGE, FAKE, GLOBAL_IMG, *ROW_COL]

# SmolVLM's chat template (User:/Assistant: turns closed by <end_of_utterance>), extended to
# accept plain-string message contents. The demo model's prompt format puts a turn's text
# BEFORE its image(s) whatever their order in the message ("User: {question}<image>"), so
# that the visual tokens can read the question causally (see checkpoint/TRAINING.md); the
# template enforces that order, so OpenAI-style requests with the image first get it too.
CHAT_TEMPLATE = (
    "<|im_start|>"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}"
    "{{ ': ' + message['content'] }}"
    "{% else %}"
    "{{ ': ' }}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}{% endif %}"
    "{% endfor %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# The test-bed model's template (training/testbed.py): a turn's image(s) BEFORE its text, the
# order SmolVLM, LLaVA and Qwen-VL are trained on, whatever the order in the message; the
# visual tokens then cannot read the question, so nothing marks them for it in early layers.
CHAT_TEMPLATE_IMAGE_FIRST = CHAT_TEMPLATE.replace(
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}{% endif %}"
    "{% endfor %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}",
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}{% endif %}"
    "{% endfor %}",
)
assert CHAT_TEMPLATE_IMAGE_FIRST != CHAT_TEMPLATE

_WORD_RE = re.compile(r"\w+|[^\w\s]+")


@dataclass(frozen=True)
class DemoModelSize:
    """Architecture knobs (defaults: ~5M parameters, ~20 MB in float32)."""

    image_size: int = shapes.IMAGE_SIZE  # vision tile, pixels
    patch_size: int = 16
    scale_factor: int = 1
    vision_hidden: int = 192
    vision_intermediate: int = 768
    vision_layers: int = 3
    vision_heads: int = 3
    text_hidden: int = 256
    text_intermediate: int = 768
    text_layers: int = 4
    text_heads: int = 4  # head_dim = text_hidden / text_heads (vLLM CPU attention needs >= 32)
    text_kv_heads: int = 0  # 0: as many as text_heads (no GQA)
    max_position_embeddings: int = 2048

    @property
    def image_seq_len(self) -> int:
        return (self.image_size // self.patch_size) ** 2 // self.scale_factor**2


def vocabulary() -> list[str]:
    """Special tokens then every word/punctuation of the task, in a fixed order: the words of
    the five original question types sorted (the ids the 4-layer checkpoint was trained with),
    then the words only the newer types use (``shapes.extra_vocabulary_corpus``: ``Where``,
    ``midleft``, ``midright``) sorted, appended so that the original ids stay the same."""
    words: set[str] = set()
    for line in [*shapes.vocabulary_corpus(), "User: Assistant: System:"]:
        words.update(_WORD_RE.findall(line))
    extra: set[str] = set()
    for line in shapes.extra_vocabulary_corpus():
        extra.update(_WORD_RE.findall(line))
    return SPECIAL_TOKENS + sorted(words) + sorted(extra - words)


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOU,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=[IMAGE, FAKE, GLOBAL_IMG, *ROW_COL],
        model_max_length=2048,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_image_processor(size: DemoModelSize = DemoModelSize()):
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    return Idefics3ImageProcessorPil(
        do_convert_rgb=True,
        do_resize=True,
        size={"longest_edge": size.image_size},
        max_image_size={"longest_edge": size.image_size},
        do_image_splitting=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pad=True,
    )


def build_processor(size: DemoModelSize = DemoModelSize(), image_first: bool = False):
    from transformers import Idefics3Processor

    return Idefics3Processor(
        image_processor=build_image_processor(size),
        tokenizer=build_tokenizer(),
        image_seq_len=size.image_seq_len,
        chat_template=CHAT_TEMPLATE_IMAGE_FIRST if image_first else CHAT_TEMPLATE,
    )


def build_config(tokenizer, size: DemoModelSize = DemoModelSize()):
    from transformers import Idefics3Config, LlamaConfig

    ids = tokenizer.convert_tokens_to_ids
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.text_hidden,
        intermediate_size=size.text_intermediate,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads or size.text_heads,
        head_dim=size.text_hidden // size.text_heads,
        max_position_embeddings=size.max_position_embeddings,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=ids(BOS),
        eos_token_id=ids(EOU),
        pad_token_id=ids(PAD),
    )
    vision = dict(
        hidden_size=size.vision_hidden,
        intermediate_size=size.vision_intermediate,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        num_channels=3,
        image_size=size.image_size,
        patch_size=size.patch_size,
    )
    cfg = Idefics3Config(
        vision_config=vision,
        text_config=text,
        scale_factor=size.scale_factor,
        image_token_id=ids(IMAGE),
        pad_token_id=ids(PAD),
        tie_word_embeddings=False,
    )
    cfg.bos_token_id = ids(BOS)
    cfg.eos_token_id = ids(EOU)
    # the default GQA field is left out so that older checkpoints' records stay as they were
    cfg.demo_model_size = {k: v for k, v in asdict(size).items() if k != "text_kv_heads" or v}
    return cfg


def build_model(processor, size: DemoModelSize = DemoModelSize(), seed: int = 0):
    import torch
    from transformers import GenerationConfig, Idefics3ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = build_config(processor.tokenizer, size)
    model = Idefics3ForConditionalGeneration(cfg)
    ids = processor.tokenizer.convert_tokens_to_ids
    model.generation_config = GenerationConfig(
        bos_token_id=ids(BOS),
        eos_token_id=ids(EOU),
        pad_token_id=ids(PAD),
        do_sample=False,
        max_new_tokens=8,
    )
    return model


def chat_messages(question: str) -> list[dict]:
    """The demo model's prompt format: the question BEFORE the image, so that (causally) the
    visual tokens can read the question and mark which of them are relevant to it; the
    answer position then only has to gather from the marked tokens (TRAINING.md)."""
    return [{"role": "user", "content": [{"type": "text", "text": question}, {"type": "image"}]}]


def prompt_text(processor, question: str) -> str:
    return processor.apply_chat_template(chat_messages(question), add_generation_prompt=True)
