"""bench/: the shared set-up (bench/common.py) and every script's command line.

The benchmarks take minutes to an hour (docs/benchmarks.md), so nothing here runs one: each
script's ``--help`` (imports and argument parser) and common's pure helpers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import common
from vllm_recroute.models import ROUTED_ARCHITECTURES

BENCH = Path(common.__file__).parent
MODULES = sorted(p.name for p in BENCH.glob("*.py") if p.name not in ("__init__.py", "common.py"))
# the ones run by path (the rest are pieces of them, e.g. quality_*.py of quality.py)
SCRIPTS = [m for m in MODULES if 'if __name__ == "__main__":' in (BENCH / m).read_text()]


def test_the_scripts_are_found():
    assert {"quality.py", "throughput.py", "ttft.py"} <= set(SCRIPTS) < set(MODULES)


def test_the_routed_architecture_is_registered():
    assert common.ROUTED in ROUTED_ARCHITECTURES


def test_routed_overrides():
    assert common.routed_overrides(None) == {}
    assert common.routed_overrides({}) == {
        "hf_overrides": {"architectures": [common.ROUTED]},
        "additional_config": {"recroute": {}},
    }
    assert common.routed_overrides({"mode": "off"})["additional_config"] == {
        "recroute": {"mode": "off"}
    }


class _Processor:
    """What the helpers use of an HF processor."""

    class tokenizer:
        @staticmethod
        def convert_tokens_to_ids(token: str) -> int:
            return {"<image>": 9}[token]

    def apply_chat_template(self, messages, add_generation_prompt):
        assert add_generation_prompt
        return repr(messages)

    def __call__(self, text, images):
        assert len(text) == len(images) == 1
        return {"input_ids": [[1, 9, 9, 9, 2, 3]]}


def test_chat_prompt_puts_the_image_before_the_question():
    proc = _Processor()
    with_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}]
    assert common.chat_prompt(proc, "q") == repr(with_image)
    text_only = [{"role": "user", "content": [{"type": "text", "text": "q"}]}]
    assert common.chat_prompt(proc, "q", image=False) == repr(text_only)


def test_prompt_token_counts():
    assert common.prompt_token_counts(_Processor(), "p", object()) == (6, 3)


def test_request_stages_over_a_base_config():
    from vllm_recroute.config import RoutingConfig

    cfg, stages = common.request_stages({"recroute_mode": "off"}, 30, 640)
    assert not cfg.enabled and stages == ()
    cfg, stages = common.request_stages(
        {"recroute_schedule": "pdrop"}, 30, 640, RoutingConfig(mode="remove")
    )
    assert cfg.mode == "remove" and len(stages) == 3 and stages[-1].end == 30


def test_median_seconds_calls_repeats_times():
    calls = []
    assert common.median_seconds(lambda: calls.append(1), 3) >= 0
    assert len(calls) == 3


def test_write_table(tmp_path, capsys):
    common.write_table(["a", "b"], None)
    assert capsys.readouterr().out == "a\nb\n"
    out = tmp_path / "t.md"
    common.write_table(["a"], str(out))
    assert out.read_text() == "a\n"


@pytest.mark.parametrize("script", MODULES)
def test_what_is_shared_lives_in_common(script):
    """The routed architecture, the engine's routed overrides and the default model are
    spelt once, in common.py."""
    text = (BENCH / script).read_text()
    assert common.ROUTED not in text.replace(f"({common.ROUTED})", "")  # docstrings may name it
    assert "hf_overrides" not in text
    assert "cached_tiny_model" not in text
    assert not re.search(r"^ROOT = ", text, re.M)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    out = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(f"usage: {script}")
