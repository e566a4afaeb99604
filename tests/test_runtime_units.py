"""Direct unit tests of the runtime core's small classes, no ``torch.compile``: the call
context (``context.py``), caller tracks (``frames.py``), host staging (``staging.py``),
the per-branch state (``state.py``), the step history ring (``history.py``), the cache
buffers (``buffers.py``) and the slot contract (``cache_history.py``).

They pin what each API promises, value by value, so that a planted fault (an operator
swapped, a condition negated, a statement removed: ``scripts/mutation_test.py``) fails a
test in well under a second. The behaviour of the whole (a model, a controller, a policy)
is the business of the other files.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import math
import threading
import weakref

import numpy as np
import pytest
import torch

from foresight_compile import Options
from foresight_compile.errors import ForesightValueError
from foresight_compile.runtime import context
from foresight_compile.runtime.buffers import CacheBuffers
from foresight_compile.runtime.cache_history import ROW_FLOATS, CacheHistory, HistoryLayout
from foresight_compile.runtime.frames import CallerTrack, FrameGroup
from foresight_compile.runtime.history import HistoryRows, StepHistory
from foresight_compile.runtime.policies.registry import get_policy
from foresight_compile.runtime.staging import HostToDevice
from foresight_compile.runtime.state import BranchState, HostMask

# Nothing here compiles: no Dynamo state to reset around each test (conftest).
pytestmark = pytest.mark.shared_dynamo
CPU = torch.device("cpu")


# -- context.py ------------------------------------------------------------------------------

def test_requests_get_increasing_ids_and_close_runs_each_callback_once():
    a, b = context.Request(), context.Request(num_steps=7)
    assert a.id > 0  # 0: a ``BranchState`` that serves no request yet
    assert b.id == a.id + 1 and context.next_request_id() == b.id + 1
    assert (a.num_steps, b.num_steps, a.closed) == (None, 7, False)
    seen = []
    b.on_close(lambda r: seen.append(("first", r)))
    b.on_close(lambda r: seen.append(("second", r)))
    b.close()
    assert seen == [("first", b), ("second", b)] and b.closed
    b.close()  # the callbacks ran once
    assert len(seen) == 2
    assert repr(b) == f"Request(id={b.id}, num_steps=7, closed=True)"
    weakref.ref(b)  # controllers key their tables weakly by request


def test_call_contexts_merge_over_the_enclosing_one_and_restore_it():
    assert context.current_context() is None
    with context.call_context(branch="cond") as outer:
        assert context.current_context() is outer == context.CallContext(branch="cond")
        with context.call_context(num_steps=5) as inner:
            assert inner == context.CallContext(num_steps=5, branch="cond")
            assert context.current_context() is inner
        assert context.current_context() is outer
    assert context.current_context() is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        outer.branch = "uncond"  # shared by every call in the block: never changed in place
    with pytest.raises(RuntimeError):
        with context.call_context(branch="x"):
            raise RuntimeError
    assert context.current_context() is None  # restored on an exception too


def test_request_context_opens_a_request_per_block_and_closes_it():
    closed = []
    with context.request_context(num_steps=3) as request:
        request.on_close(closed.append)
        current = context.current_context()
        assert current.request is request and current.num_steps == 3 and request.num_steps == 3
        assert not request.closed
    assert request.closed and closed == [request] and context.current_context() is None
    with pytest.raises(KeyError):
        with context.request_context() as failed:
            raise KeyError
    assert failed.closed and failed.num_steps is None


def test_a_context_is_invisible_to_other_threads():
    seen = []
    with context.call_context(branch="cond"):
        thread = threading.Thread(target=lambda: seen.append(context.current_context()))
        thread.start()
        thread.join()
    assert seen == [None]


# -- frames.py -------------------------------------------------------------------------------

def test_unnamed_calls_are_branches_by_their_order_at_one_timestep():
    track = CallerTrack()
    assert track.key(10.0, None, 0) == ("order", 0)
    assert track.key(10.0, None, 0) == ("order", 1)
    assert track.key(10.0, None, 0) == ("order", 2)
    assert track.key(9.0, None, 0) == ("order", 0)
    assert track.key(9.0, None, 0) == ("order", 1)
    assert track.previous_timestep == 9.0 and track.order == 1


def test_named_calls_and_a_new_epoch_break_the_call_order():
    track = CallerTrack()
    assert track.key(10.0, None, 0) == ("order", 0)
    assert track.key(10.0, "cond", 0) == ("name", "cond")
    assert track.previous_timestep is None
    assert track.key(10.0, None, 0) == ("order", 0)  # a first call again
    assert track.key(10.0, None, 1) == ("order", 0)  # reset(): a first call again
    assert track.epoch == 1
    assert track.key(10.0, None, 1) == ("order", 1)
    # epochs are compared by value (past the small ints Python shares)
    assert track.key(10.0, None, int("1000")) == ("order", 0)
    assert track.key(10.0, None, int("1000")) == ("order", 1)


def test_ran_elsewhere_says_when_another_member_ran_the_branch_last():
    class Member:
        pass

    track, a, b = CallerTrack(), Member(), Member()
    key = ("order", 0)
    assert not track.ran_elsewhere(key, a)  # nobody ran it before
    assert not track.ran_elsewhere(key, a)  # a ran it last
    assert track.ran_elsewhere(key, b)
    assert not track.ran_elsewhere(("order", 1), b)  # another branch: its own record
    assert track.ran_elsewhere(key, a)
    del b
    gc.collect()
    c = Member()
    assert not track.ran_elsewhere(("order", 1), c)  # its last member is gone


def test_frame_group_keeps_one_track_per_caller_and_counts_resets():
    group = FrameGroup()
    assert group.epoch == 0
    group.reset()
    group.reset()
    assert group.epoch == 2

    class Caller:
        pass

    a, b = Caller(), Caller()
    track = group.track(a)
    assert isinstance(track, CallerTrack) and group.track(a) is track
    assert group.track(b) is not track
    del a
    gc.collect()
    assert len(group._tracks) == 1  # weakly keyed: a finished caller drops its track


# -- staging.py ------------------------------------------------------------------------------

class _Copies:
    def __init__(self) -> None:
        self.log = []

    def host_like(self, device_tensor):
        return torch.zeros_like(device_tensor)

    def event(self):
        return "event"

    def wait(self, event):
        self.log.append(("wait", event))

    def copy(self, device_tensor, host, event):
        self.log.append(("copy", event))
        device_tensor.copy_(host)


def test_host_to_device_with_a_copy_engine_writes_a_separate_host_copy():
    device, copies = torch.zeros(2), _Copies()
    staging = HostToDevice(device, copies)
    assert staging.host is not device and staging.device_tensor is device
    view = staging.begin()
    view[:] = [1.0, 2.0]
    assert device.tolist() == [0.0, 0.0] and copies.log == []
    assert staging.commit() is device and device.tolist() == [1.0, 2.0]
    assert copies.log == [("copy", "event")]
    assert staging.begin() is view and copies.log[-1] == ("wait", "event")
    staging.begin()
    assert len(copies.log) == 2  # no copy in flight: no wait
    cpu = HostToDevice(torch.zeros(2))
    assert cpu.host is cpu.device_tensor and cpu._event is None


# -- state.py --------------------------------------------------------------------------------

def test_host_mask_reads_the_mask_queued_lookahead_steps_ago():
    with pytest.raises(ValueError, match="lookahead must be 1 or 2"):
        HostMask(2, CPU, lookahead=3)
    with pytest.raises(ValueError):
        HostMask(2, CPU, lookahead=0)
    one = HostMask(2, CPU)
    assert not one.ready
    one.start(torch.tensor([True, False]))
    assert one.ready and one.read() == [True, False]
    one.start(torch.tensor([False, True]))
    assert one.read() == [False, True]
    two = HostMask(2, CPU, lookahead=2)
    two.start(torch.tensor([True, False]))
    assert not two.ready
    two.start(torch.tensor([False, True]))
    assert two.ready and two.read() == [True, False]
    two.start(torch.tensor([True, True]))
    assert two.read() == [False, True]
    two.clear()
    assert not two.ready and two._next == 0
    two.start(torch.tensor([False, False]))
    assert not two.ready
    two.start(torch.tensor([True, False]))
    assert two.read() == [False, False]


def _branch(num_blocks=2, slots=1, policy="static"):
    opts = Options(policy=policy, lowering="eager")
    return BranchState(3, HistoryLayout.every_block(num_blocks, slots), CPU,
                       get_policy(policy)(opts))


def test_a_new_branch_state_starts_empty():
    state = _branch(3)
    assert (state.branch, state.num_blocks, state.device, state.request) == (3, 3, CPU, 0)
    assert (state.generation, state.epoch, state.signature, state.step) == (-1, -1, None, 0)
    assert state.last_timestep == math.inf and state.previous_length is None
    assert state.warmup is None and state.total_steps is None and state.length_source is None
    assert state.mask == [False, False, False] and math.isnan(state.timestep_record)
    assert state.decision.tolist() == [False] * 3 and state.finite_ok.tolist() == [False] * 3
    assert state.buffers is state.history.buffers
    assert state.next_mask.lookahead == 1
    assert repr(state).startswith("BranchState(request=0, branch=3, generation=-1, step=0, warmup=None")


def test_branch_reset_keeps_the_buffers_for_the_same_signature_only():
    state = _branch(2, slots=2)
    x = torch.ones(2)

    def sig(name):  # equal signatures are compared by value (the controller builds new ones)
        return tuple([name])

    state.reset(sig("sig"))
    state.history.allocate(0, (x,))
    state.history.record(0, [False, True])
    state.next_mask.start(torch.tensor([True, True]))
    state.policy_state.storage.fill_(5.0)
    state.step, state.last_timestep, state.mask = 4, 3.0, [True, False]
    state.reset(sig("sig"))
    assert state.previous_length == 4 and state.step == 0 and state.last_timestep == math.inf
    assert state.mask == [False, False] and not state.next_mask.ready
    assert state.buffers.has(0) and not state.history.held(0)
    assert float(state.policy_state.storage[0, 0]) == 0.0
    state.reset(sig("sig"))  # a generation of no step: the last length stands
    assert state.previous_length == 4
    state.reset(sig("other"))
    assert state.signature == ("other",) and not state.buffers.has(0)


# -- history.py ------------------------------------------------------------------------------

def _record(history, i, timestep, change=None):
    history.record(100 + i, 10 + i, i % 2, i, [bool(i % 2), False], timestep, CPU,
                   change, None if change is None else change + 1)


def test_step_history_keeps_the_last_capacity_rows_oldest_first():
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        StepHistory(2, capacity=0)
    StepHistory(2, capacity=1)
    assert StepHistory(2).capacity == 8192  # the default ring: constant memory
    history = StepHistory(2, capacity=3)
    assert len(history) == 0 and history.rows() == HistoryRows([], [], [], [], [], [], [], [], [])
    for i in range(5):
        _record(history, i, float(1000 - i))
    assert len(history) == 3 and history.count == 5
    rows = history.rows()
    assert rows.request == [102, 103, 104] and rows.generation == [12, 13, 14]
    assert rows.branch == [0, 1, 0] and rows.step == [2, 3, 4]
    assert rows.timestep == [998.0, 997.0, 996.0]
    assert rows.mask == [[False, False], [True, False], [False, False]]
    assert rows.change == [None] * 3 and rows.thresholds == [None] * 3
    assert rows.call[0] < rows.call[1] < rows.call[2]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rows.step = []  # a snapshot
    for i in range(5, 8):  # round the ring more than twice
        _record(history, i, float(1000 - i))
    assert history.rows().step == [5, 6, 7] and history.rows().timestep == [995.0, 994.0, 993.0]
    history.clear()
    assert len(history) == 0 and history.rows().step == []
    _record(history, 7, 5.0)
    assert history.rows().step == [7]


def test_step_history_copies_device_timesteps_and_metrics():
    history = StepHistory(2, capacity=4)
    _record(history, 0, torch.tensor([700.0, 1.0]), torch.tensor([0.5, 0.25]))
    _record(history, 1, 600.0)
    _record(history, 2, torch.tensor(500.0), torch.tensor([1.5, 2.0]))
    rows = history.rows()
    assert rows.timestep == [700.0, 600.0, 500.0]
    assert rows.change == [[0.5, 0.25], None, [1.5, 2.0]]
    assert rows.thresholds == [[1.5, 1.25], None, [2.5, 3.0]]
    assert len(history._rings) == 1 and history._ring(CPU) == 0
    # a host timestep overwrites the device one of an older row in the same slot
    for i in range(3, 5):
        _record(history, i, float(i))
    assert history.rows().timestep == [600.0, 500.0, 3.0, 4.0]
    # ... and a device timestep the host one of an older row
    _record(history, 5, torch.tensor([400.0]))
    assert history.rows().timestep == [500.0, 3.0, 4.0, 400.0]


# -- buffers.py ------------------------------------------------------------------------------

class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record) -> None:
        self.messages.append(record.getMessage())


def test_allocate_keeps_matching_buffers_and_replaces_mismatched_ones():
    buffers = CacheBuffers(2)
    assert buffers.held(0) is None and not buffers.has(0) and buffers.tensors == (None, None)
    x = torch.ones(2, 3)
    first = buffers.allocate(0, (x,))
    assert buffers.version == 1 and buffers.held(0) is first and buffers.has(0)
    assert first[0].shape == (2, 3) and first[0].dtype == torch.float32
    assert buffers.allocate(0, (x.clone(),)) is first and buffers.version == 1
    assert buffers.tensors == (first, None)
    logger, records = logging.getLogger("foresight_compile.runtime.buffers"), _Records()
    logger.addHandler(records)
    level, logger.level = logger.level, logging.INFO
    try:
        for like in [(x, x), (torch.ones(3, 2),), (x.double(),), (x.t(),)]:
            replaced = buffers.allocate(0, like)
            assert replaced is not first and [t.shape for t in replaced] == [t.shape for t in like]
            assert [t.stride() for t in replaced] == [t.stride() for t in like]
            first = replaced
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    assert buffers.version == 5
    assert records.messages[-1] == "reallocating cache buffers of block 0 for shapes [(3, 2)]"
    assert len(records.messages) == 4
    # each of shape, stride and count, in either direction
    for like in [(x,), (torch.ones(4, 3),), (torch.ones(2, 3),),  # shape (same strides)
                 (torch.ones(2, 3).t(),), (torch.ones(3, 2),), (torch.ones(2, 3).t(),),  # strides
                 (x, x), (x,)]:  # count
        replaced = buffers.allocate(0, like)
        assert replaced is not first and len(replaced) == len(like)
        assert [(t.shape, t.stride()) for t in replaced] == [(t.shape, t.stride()) for t in like]
        first = replaced
    narrow = buffers.allocate(1, (x, x), dtypes=[torch.bfloat16, None])
    assert [t.dtype for t in narrow] == [torch.bfloat16, torch.float32]
    assert buffers.allocate(1, (x, x), dtypes=[torch.bfloat16, None]) is narrow
    assert buffers.allocate(1, (x, x), dtypes=[torch.float16, None]) is not narrow


def test_store_copies_values_and_allocate_empty_zeroes():
    buffers = CacheBuffers(2)
    value = torch.arange(6.0).reshape(2, 3)
    buffers.store(0, (value,))
    assert torch.equal(buffers.held(0)[0], value) and buffers.held(0)[0] is not value
    buffers.store(1, (value,), like=(value.double(),))
    assert buffers.held(1)[0].dtype == torch.float64 and buffers.held(1)[0].tolist() == value.tolist()
    version = buffers.version
    empty = buffers.allocate_empty(0, [((2, 2), torch.float16), ((3,), torch.int64)], CPU)
    assert [(t.shape, t.dtype) for t in empty] == [((2, 2), torch.float16), ((3,), torch.int64)]
    assert all(not t.any() for t in empty) and buffers.held(0) is empty
    assert buffers.version == version + 1


def test_two_banks_flip_and_one_bank_stays():
    buffers = CacheBuffers(2)
    a = [(torch.zeros(1),), (torch.zeros(2),)]
    b = [(torch.ones(1),), (torch.ones(2),)]
    for wrong in ([], [a, b, a], [a[:1]], [a + b]):
        with pytest.raises(ValueError, match="1 or 2 banks of 2 blocks"):
            buffers.install(wrong)
    buffers.install([a, b])
    assert buffers.version == 1 and buffers.held(1) is a[1]
    assert buffers.nbytes == 2 * (4 + 8)
    buffers.flip()
    assert buffers.held(1) is b[1] and buffers.version == 2
    buffers.flip()
    assert buffers.held(0) is a[0]
    buffers.install([b])
    buffers.flip()
    assert buffers.held(0) is b[0] and buffers.version == 5
    assert repr(buffers) == "CacheBuffers(2/2 blocks, 1 bank(s), 12 bytes)"


def test_probe_is_kept_for_the_same_latent_and_invalidate_forgets_everything():
    buffers = CacheBuffers(2)
    latent = torch.ones(2, 3).t()  # not contiguous: the probe is
    probe = buffers.probe_like(latent)
    assert probe.is_contiguous() and probe.shape == (3, 2) and not probe.any()
    assert buffers.probe_like(latent.clone()) is probe
    for other in (torch.ones(2, 3), latent.double()):
        assert buffers.probe_like(other) is not buffers.probe_like(latent)
    buffers.store(0, (torch.ones(4),))
    assert buffers.nbytes == 16 + probe.nbytes
    version = buffers.version
    buffers.invalidate()
    assert buffers.probe is None and buffers.tensors == (None, None) and buffers.nbytes == 0
    assert buffers.version == version + 1
    buffers.install([[(torch.ones(1),), (torch.ones(1),)], [(torch.ones(1),), (torch.ones(1),)]])
    buffers.flip()
    buffers.invalidate()
    assert buffers._current == 0 and len(buffers._banks) == 1
    assert repr(buffers) == "CacheBuffers(0/2 blocks, 1 bank(s), 0 bytes)"


def test_the_byte_limit_counts_every_buffer_but_the_one_replaced():
    buffers = CacheBuffers(2, limit=64)
    buffers.allocate(0, (torch.ones(8),))  # 32 bytes
    buffers.allocate(0, (torch.ones(8, dtype=torch.float64),))  # replaces them: 64 bytes
    with pytest.raises(ForesightValueError, match=r"'max_cache_bytes'=64: these inputs need 68 "
                                                  r"bytes of cache in this branch \(block 1 alone 4\)"):
        buffers.allocate(1, (torch.ones(1),))
    buffers.allocate(0, (torch.ones(4),))  # 16 bytes
    buffers.allocate(1, (torch.ones(4, dtype=torch.float64),), dtypes=[torch.float32])  # 16 bytes
    with pytest.raises(ForesightValueError, match=r"the latent probe alone 36"):
        buffers.probe_like(torch.ones(9))
    assert buffers.probe_like(torch.ones(8)).nbytes == 32  # 64 in all: at the limit
    assert buffers.probe_like(torch.ones(4, dtype=torch.float64)).nbytes == 32  # replaces it
    with pytest.raises(ForesightValueError, match="block 0 alone 20"):
        buffers.allocate_empty(0, [((5,), torch.float32)], CPU)
    buffers.allocate_empty(0, [((4,), torch.float32)], CPU)
    CacheBuffers(1).allocate(0, (torch.ones(1000),))  # no limit


# -- cache_history.py ------------------------------------------------------------------------

def test_layouts_say_which_blocks_cache_and_how_many_values():
    for slots in (0, 4):
        with pytest.raises(ValueError, match="history slots must be 1, 2 or 3"):
            HistoryLayout((True,), slots)
    every = HistoryLayout.every_block(3, slots=2, max_bytes=10, storage="bfloat16")
    assert every == HistoryLayout((True, True, True), 2, 10, "bfloat16")
    assert every.num_blocks == 3 and every.order == 1 and every.cached_blocks == (0, 1, 2)
    assert not every.scaled and not every.exit_only_region
    exit_ = HistoryLayout.exit_only(3, 2, slots=3, storage="float8_e4m3fn")
    assert exit_.cached == (False, False, True) and exit_.cached_blocks == (2,)
    assert exit_.exit_only_region and exit_.scaled and exit_.order == 2
    assert not HistoryLayout.exit_only(1, 0).exit_only_region  # one block: every block
    assert HistoryLayout.exit_only(2, 1).exit_only_region and HistoryLayout.exit_only(2, 1).slots == 1
    assert not HistoryLayout((False, False)).exit_only_region
    assert HistoryLayout.every_block(1).slots == 1 and HistoryLayout.every_block(1).order == 0
    assert HistoryLayout((True,)).slots == 1
    assert HistoryLayout.exit_only(3, 1).cached == (False, True, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        every.slots = 3  # shared by every branch of a compiled graph
    assert not HistoryLayout((True,), storage=None).scaled


def test_record_rotates_the_slots_of_the_computed_blocks_only():
    history = CacheHistory(HistoryLayout.every_block(2, slots=2), CPU)
    assert history.device_table.shape == (2, 16) and ROW_FLOATS == 16  # 64-byte rows
    assert np.isnan(history.steps).all() and history.run == 0
    assert history.weights[1].data_ptr() == history.device_table[1].data_ptr()
    assert history.held_mask() == [False, False] and history.all_computed_at == -1
    history.record(0, [False, False])
    assert history.newest.tolist() == [1, 1] and history.valid.tolist() == [1, 1]
    assert history.all_computed_at == 0 and history.run == 0
    history.record(1, [True, False])
    assert history.newest.tolist() == [1, 0] and history.valid.tolist() == [1, 2]
    assert history.steps[0].tolist()[0] == 0 and history.steps[1].tolist() == [1, 0]
    assert history.run == 1 and history.all_computed_at == 0
    history.record(2, [True, True])
    assert history.run == 2 and history.newest.tolist() == [1, 0]
    history.record(3, [False, False])
    assert history.valid.tolist() == [2, 2] and history.newest.tolist() == [0, 1]
    assert history.steps.tolist() == [[3, 0], [3, 1]] and history.run == 0
    assert history.held(0) and history.held_mask() == [True, True]
    history.start(same_inputs=True)
    assert history.held_mask() == [False, False] and history.all_computed_at == -1
    assert np.isnan(history.steps).all() and history.run == 0
    history.record(0, [False, True])
    assert history.held_mask() == [True, False] and history.valid.tolist() == [1, 0]
    assert history.held(0) and not history.held(1)


def test_start_keeps_buffers_for_the_same_inputs_and_zeroes_the_probe():
    history = CacheHistory(HistoryLayout.every_block(1), CPU)
    history.allocate(0, (torch.ones(2),))
    history.buffers.probe_like(torch.ones(3)).fill_(2.0)
    history.start(same_inputs=True)
    assert history.buffers.has(0) and history.buffers.probe.tolist() == [0.0, 0.0, 0.0]
    history.start(same_inputs=False)
    assert not history.buffers.has(0) and history.buffers.probe is None
    history.start(same_inputs=True)  # no probe: nothing to zero


def test_aged_lists_the_tensors_newest_first_and_follows_reallocation():
    history = CacheHistory(HistoryLayout.every_block(2, slots=3), CPU)
    x, y = torch.ones(2), torch.ones(3)
    held = history.allocate(1, (x, y))  # physical order: slot 0 (x, y), slot 1, slot 2
    assert len(held) == 6 and [t.shape[0] for t in held] == [2, 3] * 3
    assert history.aged(1, newest=0) == (held[0], held[1], held[4], held[5], held[2], held[3])
    assert history.aged(1, newest=2) == (held[4], held[5], held[2], held[3], held[0], held[1])
    assert history.aged(1) == history.aged(1, newest=0)
    history.record(0, [True, False])
    assert history.aged(1) == history.aged(1, newest=1) and history.aged(1)[0] is held[2]
    assert history.aged(1) is history.aged(1)  # cached
    history.record(1, [True, False])
    assert history.newest.tolist() == [0, 2] and history.aged(1)[0] is held[4]
    history.record(2, [True, False])
    assert history.newest.tolist() == [0, 0] and history.aged(1)[0] is held[0]
    again = history.allocate(1, (x.double(), y))
    assert history.aged(1)[0] is again[0]  # a new version: rebuilt
    three = CacheHistory(HistoryLayout.every_block(1, slots=2), CPU)
    held = three.allocate(0, (x, y, x))
    assert three.aged(0, newest=1) == held[3:] + held[:3]


def test_allocate_in_a_storage_dtype_with_a_scale_per_value():
    narrow = CacheHistory(HistoryLayout.every_block(1, slots=2, storage="bfloat16"), CPU)
    held = narrow.allocate(0, (torch.ones(4),))
    assert [t.dtype for t in held] == [torch.bfloat16] * 2
    scaled = CacheHistory(HistoryLayout.every_block(1, slots=2, storage="float8_e4m3fn"), CPU)
    held = scaled.allocate(0, (torch.ones(4), torch.ones(2)))
    assert [(t.dtype, t.dim()) for t in held] == (
        [(torch.float8_e4m3fn, 1)] * 2 + [(torch.float32, 0)] * 2) * 2
    held = scaled.allocate(0, (torch.ones(4),))
    assert [t.dtype for t in held] == [torch.float8_e4m3fn, torch.float32] * 2
    plain = CacheHistory(HistoryLayout.every_block(1, max_bytes=16), CPU)
    assert plain.allocate(0, (torch.ones(2, dtype=torch.float64),))[0].dtype == torch.float64
    assert plain.nbytes == plain.buffers.nbytes == 16
    with pytest.raises(ForesightValueError):
        plain.allocate(0, (torch.ones(5),))
    assert repr(plain) == "CacheHistory(1/1 blocks cached, 1 slot(s), CacheBuffers(1/1 blocks, 1 bank(s), 16 bytes))"


def test_forecast_weights_are_lagrange_over_the_valid_values():
    history = CacheHistory(HistoryLayout.every_block(3, slots=3), CPU)
    history.record(2, [False, False, False])
    history.record(4, [False, False, True])
    history.record(5, [False, True, True])
    history.prepare(6)
    # block 0: steps 5, 4, 2 -> weights of a parabola at 6
    expected = [(6 - 4) * (6 - 2) / ((5 - 4) * (5 - 2)), (6 - 5) * (6 - 2) / ((4 - 5) * (4 - 2)),
                (6 - 5) * (6 - 4) / ((2 - 5) * (2 - 4))]
    assert history.weights[0].tolist() == pytest.approx(expected)
    assert history.weights[1].tolist() == pytest.approx([(6 - 2) / (4 - 2), (6 - 4) / (2 - 4), 0.0])
    assert history.weights[2].tolist() == [1.0, 0.0, 0.0]
    assert history._lagrange(6.0).shape == (3, 3)
    one = CacheHistory(HistoryLayout.every_block(1), CPU)
    one.record(0, [False])
    one.table.device_tensor.fill_(7.0)
    one.prepare(1)  # one slot: nothing to write
    assert one.weights[0].tolist() == [7.0]
