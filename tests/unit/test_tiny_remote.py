"""The tiny checkpoints' remote processors take what vLLM's memory profiling feeds them at
startup (a video clip as a ``[T, H, W, 3]`` uint8 array), as the published processors do;
images give the same pixels as before; the cache key follows the remote code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

import vllm_recroute
from vllm_recroute.tiny import ARCHS, TINY_ARCHS, build_tokenizer, make_test_image
from vllm_recroute.tiny.remote.keye import KeyeImageProcessor, KeyeProcessor
from vllm_recroute.tiny.remote.minicpmv import MiniCPMVImageProcessor

# what vLLM's dummy-input builder makes: white frames, uint8, channels last
CLIP = np.full((3, 128, 128, 3), 255, dtype=np.uint8)


def test_keye_video_is_frames_cut_like_images():
    proc = KeyeImageProcessor(patch_size=8, merge_size=2)
    out = proc(videos=[CLIP])
    assert out["video_grid_thw"].tolist() == [[3, 16, 16]]
    assert out["pixel_values_videos"].shape == (3 * 16 * 16, 3, 8, 8)
    frame = proc(images=[Image.fromarray(CLIP[0])])["pixel_values"]
    np.testing.assert_array_equal(out["pixel_values_videos"][: 16 * 16], frame)


def test_keye_processor_expands_video_tokens():
    tok = build_tokenizer(["<|endoftext|>", "<|image_pad|>", "<|video_pad|>"])
    proc = KeyeProcessor(image_processor=KeyeImageProcessor(), tokenizer=tok)
    image = make_test_image(1, size=128)
    out = proc(text="<|image_pad|><|video_pad|>", images=[image], videos=[CLIP])
    ids = out["input_ids"][0]
    pad = tok.convert_tokens_to_ids
    # an image: 16 x 16 patches / 2 x 2 merge; the clip: 3 frames of the same
    assert ids.count(pad("<|image_pad|>")) == 64 and ids.count(pad("<|video_pad|>")) == 3 * 64


def test_keye_image_as_array_equals_pil():
    proc = KeyeImageProcessor()
    image = make_test_image(2, size=96)
    np.testing.assert_array_equal(
        proc(images=[np.asarray(image)])["pixel_values"], proc(images=[image])["pixel_values"]
    )


def test_minicpmv_video_frames_become_slices():
    proc = MiniCPMVImageProcessor(image_size=64, patch_size=8, image_feature_size=64)
    out = proc([CLIP])  # vLLM: mm_data {"images": [clip]}, one sample of frames
    assert len(out["pixel_values"]) == 1 and len(out["pixel_values"][0]) == 3
    assert out["image_sizes"] == [[(128, 128)] * 3]
    assert out["tgt_sizes"][0].tolist() == [[8, 8]] * 3
    image = proc([[Image.fromarray(CLIP[0])]])["pixel_values"][0][0]
    assert out["pixel_values"][0][0].equal(image)


def test_cache_key_follows_the_remote_code(monkeypatch, tmp_path):
    import vllm_recroute.tiny.common as common

    keye, idefics3 = TINY_ARCHS["keye"], TINY_ARCHS["idefics3"]
    before, native = keye.cache_key(0, "tiny"), idefics3.cache_key(0, "tiny")
    (tmp_path / "keye.py").write_text("# edited\n")
    monkeypatch.setattr(common, "REMOTE_DIR", tmp_path)
    assert keye.cache_key(0, "tiny") != before
    assert idefics3.cache_key(0, "tiny") == native


def test_readme_serves_each_tiny_model_with_the_flags_it_needs():
    """README.md's architecture section: the commands `make-tiny-model` prints."""
    readme = (Path(vllm_recroute.__file__).parent.parent / "README.md").read_text()
    for arch in ARCHS:
        remote = TINY_ARCHS[arch].remote is not None  # copied: auto_map
        flag = " --trust-remote-code" if remote else ""
        assert f"vllm-recroute make-tiny-model /tmp/tiny-{arch} --arch {arch}\n" in readme
        assert f"vllm-recroute serve /tmp/tiny-{arch} --routing pdrop{flag}\n" in readme
