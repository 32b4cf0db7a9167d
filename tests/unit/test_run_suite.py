"""tools/run_suite.py (`make test`): which pytest runs where, and the exit status."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "run_suite", Path(__file__).resolve().parents[2] / "tools" / "run_suite.py"
)
run_suite = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(run_suite)


class FakeUnit:
    def __init__(self, rc: int, calls: list) -> None:
        self.rc = rc
        self.calls = calls

    def wait(self) -> int:
        return self.rc


def fake(monkeypatch, cores, rest_rc=0, unit_rc=0) -> list:
    calls: list = []
    monkeypatch.setattr(run_suite, "_cores", lambda: cores)
    monkeypatch.setattr(
        run_suite.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or rest_rc
    )

    def popen(cmd, **kw):
        calls.append(("unit", cmd, kw["preexec_fn"] is not None, kw["env"]["OMP_NUM_THREADS"]))
        return FakeUnit(unit_rc, calls)

    monkeypatch.setattr(run_suite.subprocess, "Popen", popen)
    return calls


def test_the_unit_tests_run_beside_the_rest_on_the_last_core(monkeypatch):
    calls = fake(monkeypatch, [0, 1])
    assert run_suite.main([]) == 0
    (tag, unit, pinned, threads), rest = calls
    assert tag == "unit" and unit[-1] == "tests/unit" and pinned and threads == "1"
    assert rest[-2:] == ["--ignore", "tests/unit"]  # guard: the rest does not run them again


@pytest.mark.parametrize(
    ("rest_rc", "unit_rc", "rc"),
    [(0, 1, 1), (2, 0, 2), (1, 5, 1), (5, 0, 0), (0, 5, 0), (5, 5, 5), (5, 2, 2)],
)
def test_a_failure_in_either_run_fails_the_suite(monkeypatch, rest_rc, unit_rc, rc):
    fake(monkeypatch, [0, 1], rest_rc, unit_rc)
    assert run_suite.main([]) == rc


@pytest.mark.parametrize(("cores", "argv"), [([0], []), ([0, 1], ["tests/unit/test_x.py"])])
def test_one_core_or_a_selection_is_one_pytest(monkeypatch, cores, argv):
    calls = fake(monkeypatch, cores)
    assert run_suite.main(argv) == 0
    (cmd,) = calls
    assert cmd == [*run_suite.PYTEST, *argv]  # the whole suite or the selection, once
