"""The tiny PaliGemma: Gemma text, SigLIP tower (``tiny`` preset only: the shapes of
`common.py`'s ``TEXT`` / ``VISION``; 64-px images, patch 8 -> 64 visual tokens)."""

from __future__ import annotations

from pathlib import Path

from vllm_recroute.tiny.common import TEXT, VISION, build_tokenizer, init_std, save


def build(out: Path, preset: str) -> None:
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = build_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<image>"])
    tok.pad_token, tok.eos_token, tok.bos_token, tok.unk_token = "<pad>", "<eos>", "<bos>", "<unk>"
    # PaliGemma prompts end in "\n" and vLLM looks that token up by its literal text (as in
    # Gemma's SentencePiece vocabulary), which byte-level BPE spells differently.
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken("\n", normalized=False)])
    vis = VISION[preset]
    image_proc = SiglipImageProcessorPil(
        size={"height": vis["image_size"], "width": vis["image_size"]},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    num_tokens = (vis["image_size"] // vis["patch_size"]) ** 2
    image_proc.image_seq_length = num_tokens
    proc = PaliGemmaProcessor(image_processor=image_proc, tokenizer=tok)  # adds loc/seg tokens
    text = dict(TEXT[preset])
    text.update(
        model_type="gemma",
        vocab_size=len(tok),
        initializer_range=init_std(text),
        rms_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh",
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    config = PaliGemmaConfig(
        text_config=text,
        vision_config=dict(
            vis,
            model_type="siglip_vision_model",
            initializer_range=init_std(vis),
            num_image_tokens=num_tokens,
            projection_dim=text["hidden_size"],
            vision_use_head=False,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vocab_size=len(tok),
        projection_dim=text["hidden_size"],
        hidden_size=text["hidden_size"],
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    # vLLM's CPU attention has no bidirectional multimodal-prefix mode (PaliGemma's default),
    # so this test model is declared causal; see docs/architecture.md.
    config.is_mm_prefix_lm = False
    model = PaliGemmaForConditionalGeneration(config)
    save(model, proc, out)
    _hub_layout(out / "model.safetensors")


def _hub_layout(path: Path) -> None:
    # transformers 5 saves the SigLIP tower without its `vision_model.` level; published
    # PaliGemma checkpoints (and so vLLM's weight mapper) have it. HF loads either.
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    renamed = {
        (
            "vision_tower.vision_model." + k.removeprefix("vision_tower.")
            if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.")
            else k
        ): v
        for k, v in tensors.items()
    }
    save_file(renamed, path, metadata={"format": "pt"})
