"""Routed VLM architectures: one generic routed decoder (worker/decoder.py), thin per-model
classes.

Names follow `Recroute<vLLM class name>`; select one with
`--hf-overrides '{"architectures": ["RecrouteIdefics3ForConditionalGeneration"]}'`.
"""

ROUTED_ARCHITECTURES: dict[str, str] = {
    "RecrouteIdefics3ForConditionalGeneration": (
        "vllm_recroute.models.idefics3:RecrouteIdefics3ForConditionalGeneration"
    ),
    "RecroutePaliGemmaForConditionalGeneration": (
        "vllm_recroute.models.paligemma:RecroutePaliGemmaForConditionalGeneration"
    ),
    # Keye-VL: Qwen3 text with M-RoPE (the [3, T] positions path that Qwen2.5-VL takes)
    "RecrouteKeyeForConditionalGeneration": (
        "vllm_recroute.models.keye:RecrouteKeyeForConditionalGeneration"
    ),
    # Phi-3-Vision: Phi-3 text (fused qkv), run by vLLM as its Llama model
    "RecroutePhi3VForCausalLM": "vllm_recroute.models.phi3v:RecroutePhi3VForCausalLM",
    # MiniCPM-V (2.6: Qwen2 text): keeps the version dispatch; routes the `<unk>` run
    "RecrouteMiniCPMV": "vllm_recroute.models.minicpmv:RecrouteMiniCPMV",
    # Not importable on this project's CPU hosts (their HF processors import torchvision);
    # registered lazily so that GPU hosts with torchvision can use them.
    "RecrouteQwen2_5_VLForConditionalGeneration": (
        "vllm_recroute.models.qwen2_5_vl:RecrouteQwen2_5_VLForConditionalGeneration"
    ),
    "RecrouteQwen3VLForConditionalGeneration": (
        "vllm_recroute.models.qwen3_vl:RecrouteQwen3VLForConditionalGeneration"
    ),
    "RecrouteLlavaForConditionalGeneration": (
        "vllm_recroute.models.llava:RecrouteLlavaForConditionalGeneration"
    ),
}

# HF architecture name -> routed architecture name, used by the CLI to pick the wrapper.
ROUTED_FOR_HF_ARCH: dict[str, str] = {
    arch.removeprefix("Recroute"): arch for arch in ROUTED_ARCHITECTURES
}
