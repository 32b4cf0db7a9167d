"""routing/reentry.py: the mean residual update owed to returning visual tokens."""

from __future__ import annotations

import torch

from vllm_recroute.routing.reentry import Reentry, reentry_flops

M = torch.tensor  # masks over 4 visual tokens


def test_first_stage_updates_nobody():
    r = Reentry()
    x = torch.arange(8.0).view(4, 2)
    assert torch.equal(r.at_stage_start(x, M([True, True, False, False])), torch.zeros(4, 2))


def test_a_returner_gets_the_active_tokens_mean_update_of_the_stage_it_skipped():
    r = Reentry()
    x0 = torch.zeros(4, 2)
    r.at_stage_start(x0, M([True, True, False, False]))  # stage 1: tokens 0, 1 run
    x1 = x0.clone()
    x1[0] = torch.tensor([2.0, 0.0])
    x1[1] = torch.tensor([4.0, 2.0])  # their mean update: (3, 1)
    up = r.at_stage_start(x1, M([True, False, True, False]))  # token 2 returns
    assert torch.equal(up, M([[0.0, 0.0], [0.0, 0.0], [3.0, 1.0], [0.0, 0.0]]))


def test_updates_accumulate_over_every_skipped_stage():
    r = Reentry()
    x = torch.zeros(4, 1)
    r.at_stage_start(x, M([True, False, False, False]))
    x = x + M([[1.0], [0.0], [0.0], [0.0]])  # stage 1 moved token 0 by 1
    assert torch.equal(r.at_stage_start(x, M([True, False, False, False])), torch.zeros(4, 1))
    x = x + M([[2.0], [0.0], [0.0], [0.0]])  # stage 2 moved it by 2
    up = r.at_stage_start(x, M([False, True, True, False]))
    assert up.flatten().tolist() == [0.0, 3.0, 3.0, 0.0]  # 1 + 2, owed since stage 1
    # tokens 1, 2 are paid; token 3 is still owed and token 0 starts owing
    x = x + up + M([[0.0], [5.0], [5.0], [0.0]])
    up = r.at_stage_start(x, M([True, False, False, True]))
    assert up.flatten().tolist() == [5.0, 0.0, 0.0, 8.0]


def test_flops_bound():
    assert reentry_flops(576, 4096, 3) == 4 * 576 * 4096 * 3
    assert reentry_flops(576, 4096, 0) == 0
