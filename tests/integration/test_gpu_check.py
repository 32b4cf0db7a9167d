"""tools/gpu_check.py: the phases that run on this CPU host.

micro (tests.device_checks under FakeCuda, no vLLM module imported) and configs (a
simulated Triton host); engine, oracle and speed start engines (minutes) and are run by
hand here, on a GPU host by ``make gpu-check``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _phase(name: str) -> tuple[dict, int]:
    proc = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--phase", name],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0], proc.returncode


def test_micro_phase_runs_every_device_check_without_vllm():
    from tests.device_checks import CHECKS

    result, rc = _phase("micro")
    assert result["ok"] is True and rc == 0, result
    assert result["device"] == "fake" and result["checks"] == len(CHECKS) >= 6
    assert result["failed"] == {} and result["vllm_modules_imported"] == []


def test_configs_phase_prints_ok_with_every_refusal():
    result, returncode = _phase("configs")
    assert result["phase"] == "configs"
    assert result["ok"] is True, result
    assert returncode == 0
    assert result["routed"]["runner"] == "V1"
    assert result["plain"]["runner"] == "V2"  # the simulated Triton host
    assert set(result["refusals"].values()) == {"ok"}
    assert "VLLM_USE_BREAKABLE_CUDAGRAPH" in result["refusals"]
