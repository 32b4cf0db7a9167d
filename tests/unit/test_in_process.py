"""The test engines' process policy (tests/in_process.py): one in-process engine at a time,
parallel engines never, and the mode set only around the engine's construction."""

from __future__ import annotations

import os

import pytest

from tests import in_process


@pytest.fixture(autouse=True)
def _threads_back():
    """A start without an engine (no ``release``) leaves the engine's thread count set."""
    yield
    in_process._restore_threads()


@pytest.fixture
def live(monkeypatch):
    """An engine object and an empty registry of live in-process engines (restored after)."""
    monkeypatch.setattr(in_process, "_live", set())
    return object()


def test_first_single_engine_runs_here_the_next_in_processes(live):
    assert in_process.wanted(None, {}) is True
    in_process.register(live)
    assert in_process.is_in_process(live)
    assert in_process.wanted(None, {}) is False  # a second engine beside it: processes
    assert in_process.wanted(False, {}) is False


@pytest.mark.parametrize("key", ["tensor_parallel_size", "data_parallel_size"])
def test_parallel_engines_run_in_processes(live, key):
    assert in_process.wanted(None, {key: 2}) is False
    with pytest.raises(RuntimeError, match="parallel engine"):
        in_process.wanted(True, {key: 2})


def test_demanding_in_process_beside_a_live_one_is_an_error(live):
    in_process.register(live)
    with pytest.raises(RuntimeError, match="another in-process engine is alive"):
        in_process.wanted(True, {})


@pytest.mark.parametrize("here", [True, False])
def test_mode_is_set_only_around_construction(monkeypatch, here):
    monkeypatch.setenv(in_process.ENV, "sentinel")
    with in_process.started(here):
        assert os.environ[in_process.ENV] == ("0" if here else "1")
    assert os.environ[in_process.ENV] == "sentinel"
    monkeypatch.delenv(in_process.ENV)
    with in_process.started(here):
        pass
    assert in_process.ENV not in os.environ


def test_an_in_process_start_serves_on_one_thread_and_a_failed_one_gives_them_back(
    monkeypatch,
):
    import torch

    own = in_process.ENGINE_THREADS + 1  # this process's threads before any engine
    monkeypatch.setattr(in_process, "_THREADS", own)
    with pytest.raises(ValueError), in_process.started(True):
        assert torch.get_num_threads() == in_process.ENGINE_THREADS
        raise ValueError("engine construction failed")
    assert torch.get_num_threads() == own
