"""The test-bed trainer's data and resume pieces (training/testbed.py, outside the wheel)."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

from vllm_recroute.demo import shapes

TRAINING = Path(__file__).resolve().parents[2] / "training"


@pytest.fixture(scope="module")
def testbed():
    sys.path.insert(0, str(TRAINING))
    try:
        spec = importlib.util.spec_from_file_location("testbed", TRAINING / "testbed.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["testbed"] = mod  # its dataclasses look their module up
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("testbed", None)
        sys.path.remove(str(TRAINING))


def test_describe_answer_reads_every_cell_in_order(testbed):
    scene = shapes.make_scene(random.Random(3))
    words = testbed.describe_answer(scene).split()
    cells = [(r, c) for r in range(shapes.GRID_ROWS) for c in range(shapes.GRID_COLS)]
    i = 0
    for r, c in cells:  # guard: a scene with empty cells, so "no" is exercised
        o = scene.at(r, c)
        if o is None:
            assert words[i] == "no"
            i += 1
        else:
            assert words[i : i + 2] == [o.color, o.shape]
            i += 2
    assert i == len(words)
    assert len(scene.objects) < len(cells), "the guard needs a scene with an empty cell"


def test_every_scene_gets_its_dense_rows_and_steps_are_pure(testbed):
    h = testbed.Hyper(batch_scenes=4)
    rows = testbed.step_rows(h, 7)
    assert rows == testbed.step_rows(h, 7)  # a resumed run sees the same data
    for _scene, qas in rows:
        assert len(qas) == h.rows_per_scene
        assert [t for _, _, t in qas[: h.dense_rows]] in (["describe"], ["cell"])
        assert all(t in shapes.ALL_QTYPES for _, _, t in qas[h.dense_rows :])
    assert all(s.objects for s, _ in rows)


def test_where_rows_name_an_object_and_answer_its_cell(testbed):
    h = testbed.Hyper(batch_scenes=8, rows_per_scene=5, dense_rows=2, where_share=0.5)
    kinds = []
    for scene, qas in testbed.step_rows(h, 11):
        assert len(qas) == 5 and len({q for q, _, _ in qas}) == 5  # no row twice
        for q, a, t in qas[:2]:
            kinds.append(t)
            if t == "where":  # the object it names sits in the cell it answers
                o = next(o for o in scene.objects if q == f"Where is the {o.color} {o.shape}?")
                assert a == shapes.cell_name(o.row, o.col)
    assert "where" in kinds and set(kinds) - {"where"}, kinds  # guard: both kinds drawn
    # the default (0.0) draws exactly what the steps before the field drew
    assert testbed.step_rows(testbed.Hyper(), 3) == testbed.step_rows(
        testbed.Hyper(where_share=0.0), 3
    )


def test_compact_state_drops_the_optimiser_and_stores_float16(testbed, tmp_path):
    import torch

    state = tmp_path / "state.pt"
    w = torch.randn(3, 4)
    torch.save({"model": {"w": w, "n": torch.tensor(2)}, "opt": {"x": 1}, "step": 5}, state)
    out = tmp_path / "compact.pt"
    testbed.save_compact(str(state), str(out))
    st = torch.load(out, weights_only=False)
    assert "opt" not in st and st["step"] == 5
    assert st["model"]["w"].dtype == torch.float16 and st["model"]["n"].dtype == torch.int64
    assert torch.allclose(st["model"]["w"].float(), w, atol=1e-2)


def test_per_row_loss_weighs_rows_not_tokens(testbed):
    import torch

    logits = torch.zeros(2, 5, 3)
    logits[0, :, 0] = 10.0  # row 0 predicts token 0 everywhere: right on its 3 answer tokens
    labels = torch.full((2, 5), -100)
    labels[0, 1:4] = 0
    labels[1, 4] = 1  # row 1: one answer token, wrong (uniform logits)
    tok = testbed.answer_loss(logits, labels)
    row = testbed.answer_loss(logits, labels, per_row=True)
    uniform = float(torch.log(torch.tensor(3.0)))
    assert abs(float(row) - uniform / 2) < 1e-3  # each row half
    assert abs(float(tok) - uniform / 4) < 1e-3  # each token a quarter
