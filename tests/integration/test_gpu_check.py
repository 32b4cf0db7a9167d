"""tools/gpu_check.py: the phases that run on this CPU host.

The micro phase (tests.device_checks.run_all, no vLLM imported) gets its test with
tests/device_checks.py; engine, oracle and speed start engines (minutes) and are run by
hand here, on a GPU host by ``make gpu-check``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_configs_phase_prints_ok_with_every_refusal():
    proc = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--phase", "configs"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stderr[-2000:]
    [result] = lines
    assert result["phase"] == "configs"
    assert result["ok"] is True, result
    assert proc.returncode == 0
    assert result["routed"]["runner"] == "V1"
    assert result["plain"]["runner"] == "V2"  # the simulated Triton host
    assert set(result["refusals"].values()) == {"ok"}
    assert "VLLM_USE_BREAKABLE_CUDAGRAPH" in result["refusals"]
