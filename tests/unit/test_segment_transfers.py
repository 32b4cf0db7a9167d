"""Routed segments under CUDA's device rules (tests/devices.py:FakeCuda): host bookkeeping,
one packed host-to-device copy per segment and KV group, tables only as wide as the step
needs, vLLM's prefill rule, and metadata builders that never overwrite each other.

Transfer budget per routed segment and KV group: 1 host-to-device copy, of
``8 * rows + 4 * (2 * reqs + 1 + reqs * width)`` bytes (slot mapping and, for the first
group, the active rows as int64; query_start_loc, seq_lens and a block table of ``width``
columns, the widest row the compacted ``seq_lens`` need, as int32); no device-to-host copy,
no synchronisation."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.worker.utils import AttentionGroup

from tests.devices import FakeCuda, is_device
from vllm_recroute import vllm_view
from vllm_recroute.kv.table_view import ReleasedRows
from vllm_recroute.vllm_view import StepBatch
from vllm_recroute.worker.compaction import Segment, StepTables, compact_segment

B = 4
MAX_WIDTH = 64  # vLLM's block table row: max_model_len's blocks
SPEC = FullAttentionSpec(block_size=B, num_kv_heads=1, head_size=8, dtype=torch.float32)


class PersistentBuilder:
    """A builder like FlashInfer's: writes a persistent buffer, returns views of it."""

    requires_block_table_width = False

    def __init__(self, spec, layer_names, vllm_config, device) -> None:
        self.buf = torch.zeros(32, dtype=torch.int32, device=device)

    def build(self, common_prefix_len, cm, **kwargs):
        n = cm.num_reqs
        self.buf[:n].copy_(cm.seq_lens)
        return SimpleNamespace(seq_lens=self.buf[:n], cm=cm)


class Backend:
    @staticmethod
    def get_builder_cls():
        return PersistentBuilder


class BlockTable:
    def __init__(self, rows: list[list[int]], device: str, fc: FakeCuda | None) -> None:
        self.cpu = torch.zeros(len(rows), MAX_WIDTH, dtype=torch.int32)
        for r, ids in enumerate(rows):
            self.cpu[r, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        self.num_blocks_per_row = np.array([len(ids) for ids in rows])
        self.gpu = fc.tensor(self.cpu) if fc is not None else self.cpu.clone()

    def get_cpu_tensor(self):
        return self.cpu

    def get_device_tensor(self, n):
        return self.gpu[:n]


def runner(rows: list[list[int]], num_groups: int = 1, fc: FakeCuda | None = None):
    device = "cuda" if fc is not None else "cpu"
    groups = []
    for gid in range(num_groups):
        g = AttentionGroup(Backend, [f"l{gid}"], SPEC, gid)
        g.create_metadata_builders(SimpleNamespace(), device)  # vLLM's own builder
        groups.append([g])
    return SimpleNamespace(
        attn_groups=groups,
        kv_cache_config=SimpleNamespace(
            kv_cache_groups=[SimpleNamespace(kv_cache_spec=SPEC) for _ in range(num_groups)]
        ),
        input_batch=SimpleNamespace(
            block_table=[BlockTable(rows, device, fc) for _ in range(num_groups)]
        ),
        vllm_config=SimpleNamespace(),
        device=torch.device(device),
    )


def batch(num_computed, prompt_lens, query_lens) -> StepBatch:
    qsl = torch.zeros(len(query_lens) + 1, dtype=torch.long)
    qsl[1:] = torch.cumsum(torch.tensor(query_lens), 0)
    return StepBatch(
        req_ids=tuple(f"r{i}" for i in range(len(query_lens))),
        qsl=qsl,
        num_computed=torch.tensor(num_computed, dtype=torch.long),
        prompt_lens=tuple(prompt_lens),
        token_ids=torch.zeros(int(qsl[-1]), dtype=torch.long),
    )


# three decode requests, 10 / 20 / 7 tokens with KV, 2 / 5 / 0 of them deferred at the stage
DECODE = dict(num_computed=[10, 20, 7], prompt_lens=[8, 15, 5], query_lens=[1, 1, 1])
ROWS = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]]
OFFSETS = torch.tensor([2, 5, 0])


def segment(r, b, start, offsets, active=None, num_groups=1):
    groups = list(vllm_view.kv_groups_of_layers(r, [f"l{g}" for g in range(num_groups)]).values())
    active = torch.ones(b.num_rows, dtype=torch.bool) if active is None else active
    rows = None if bool(active.all()) else torch.nonzero(active).flatten()
    seg = Segment(start, start + 1, rows)
    compact_segment(seg, b, active, offsets, groups, StepTables(r, b, ReleasedRows()))
    return seg


def test_a_routed_decode_step_makes_one_packed_copy_per_segment_and_group():
    with FakeCuda() as fc:
        r, b = runner(ROWS, num_groups=2, fc=fc), batch(**DECODE)
        fc.reset()
        seg = segment(r, b, 2, OFFSETS, num_groups=2)
        copies, nbytes, d2h, syncs = fc.h2d, fc.h2d_bytes, fc.d2h, sum(fc.syncs.values())
    # compacted seq_lens 9 / 16 / 8 -> the widest row needs cdiv(16, 4) = 4 blocks
    reqs, rows, width = 3, 3, 4
    per_group = 8 * rows + 4 * (2 * reqs + 1 + reqs * width)
    assert copies == 2  # budget: 1 per segment and group (bd74ee7: 4 each)
    assert nbytes == 2 * per_group  # bd74ee7: the full-width table, 64 columns
    assert d2h == 0 and syncs == 0
    for gid in (0, 1):
        cm = seg.attn_metadata[gid].cm
        assert tuple(cm.block_table_tensor.shape) == (reqs, width)
        assert cm.block_table_tensor.tolist() == [[1, 2, 3, 0], [4, 5, 6, 7], [9, 10, 0, 0]]


def test_device_tensors_on_the_table_device_and_cpu_fields_on_the_host():
    with FakeCuda() as fc:
        fc_runner = runner(ROWS, fc=fc)
        b = batch(num_computed=[0, 20], prompt_lens=[6, 15], query_lens=[6, 1])
        active = torch.tensor([True, True, False, True, False, True, True])
        seg = segment(fc_runner, b, 1, torch.tensor([0, 5]), active=active)
        cm = seg.attn_metadata[0].cm
        for t in (cm.query_start_loc, cm.seq_lens, cm.block_table_tensor, cm.slot_mapping):
            assert is_device(t)
        assert is_device(seg.slot_mapping[0])
        for t in (cm.query_start_loc_cpu, cm.seq_lens_cpu_upper_bound, cm.is_prefilling):
            assert not is_device(t)
        assert not is_device(seg.active_rows)
        assert is_device(seg.device_rows)
        assert seg.device_rows.tolist() == seg.active_rows.tolist() == [0, 1, 3, 5, 6]
        assert cm.query_start_loc_cpu.tolist() == [0, 4, 5]
        assert cm.seq_lens_cpu_upper_bound.tolist() == [4, 16]
        # request 0 writes compacted positions 0..3 (block 1), request 1 position 15 (block 7)
        assert seg.slot_mapping[0].tolist() == [4, 5, 6, 7, 7 * B + 3]
        assert fc.h2d == 1


def test_is_prefilling_is_vllms_rule_not_first_chunk_only():
    """vLLM: num_computed < num_prompt_tokens (gpu_model_runner.py,
    _build_attention_metadata); a later chunk of a prompt is still prefilling."""
    r = runner(ROWS)
    b = batch(num_computed=[4, 20, 0], prompt_lens=[8, 15, 5], query_lens=[4, 1, 5])
    seg = segment(r, b, 1, torch.tensor([0, 5, 0]))
    assert seg.attn_metadata[0].cm.is_prefilling.tolist() == [True, False, True]


def test_each_segment_builds_with_its_own_builder():
    """A builder writing a persistent buffer (FlashInfer's kind): building two routed
    segments leaves vLLM's stage-0 metadata and the first segment's unchanged."""
    r, b = runner(ROWS), batch(**DECODE)
    vllm_group = r.attn_groups[0][0]
    own = vllm_group.build_metadata(SimpleNamespace(num_reqs=3, seq_lens=torch.tensor([11, 21, 8])))
    first = segment(r, b, 1, OFFSETS)
    second = segment(r, b, 2, torch.tensor([4, 9, 0]))
    assert own.seq_lens.tolist() == [11, 21, 8]
    assert first.attn_metadata[0].seq_lens.tolist() == [9, 16, 8]
    assert second.attn_metadata[0].seq_lens.tolist() == [7, 12, 8]


def test_staging_alternates_and_grows():
    """Consecutive steps use two staging buffers (the earlier step's copy may still be
    pending under async scheduling); a larger step grows them; every copy is right."""
    with FakeCuda() as fc:
        r = runner(ROWS, fc=fc)
        group = vllm_view.kv_groups_of_layers(r, ["l0"])["l0"]  # persistent, as LayerGroups
        io = group.io(1)
        small = batch(**DECODE)
        big = batch(num_computed=[0, 20, 0], prompt_lens=[9, 15, 8], query_lens=[9, 1, 8])
        steps = ((small, OFFSETS), (big, torch.tensor([0, 5, 0])), (small, OFFSETS))
        slots, buffers = [], []
        for b, offsets in steps:
            seg = Segment(1, 2, None)
            active = torch.ones(b.num_rows, dtype=torch.bool)
            compact_segment(seg, b, active, offsets, [group], StepTables(r, b, ReleasedRows()))
            slots.append(seg.slot_mapping[0].tolist())
            buffers.append(io._staging[io._turn])
        assert fc.h2d == 3
    assert buffers[0] is not buffers[1] and buffers[0] is buffers[2]
    assert slots[0] == slots[2] == [3 * B, 7 * B + 3, 10 * B + 3]
    assert slots[1] == [*range(4, 13), 7 * B + 3, *range(36, 44)]
