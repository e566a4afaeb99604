"""lowering="cudagraphs": the refusal without CUDA, and the executor's buffer plan and
schedule run on CPU with EagerCapture standing in for CUDA graph capture."""
import pytest
import torch

import foresight_compile
from foresight_compile import models
from foresight_compile.errors import ForesightError
from foresight_compile.options import Options
from foresight_compile.program import ForesightProgram
from foresight_compile.runtime.cudagraphs import (CudaGraphExecutor, EagerCapture,
                                                  cudagraphs_unavailable, step_schedule)
from foresight_compile.runtime.plan import PlanStep, SegmentPlan
from conftest import rel_err
from test_blocks import small_graph
from toy import ToyDiT

OPTS = {"policy": "foresight", "warmup": 3, "recompute_every": 2, "threshold": 50.0,
        "lowering": "eager", "strict": True}
# The CUDA-graph executor over Inductor segments, with EagerCapture standing in for capture.
GRAPHED = {**OPTS, "lowering": "cudagraphs"}


def _plan(cached_blocks=(0, 1)) -> SegmentPlan:
    """prologue -> block 0 -> glue -> block 1 -> epilogue (which also reads the prologue's
    output, as an epilogue reads the timestep embedding)."""
    def step(block, inputs, outputs):
        cached = block in cached_blocks
        return PlanStep(block, lambda *a: a, (lambda *a: a) if cached else None, None,
                        inputs, outputs)
    steps = (step(-1, (0,), (1,)), step(0, (1,), (2,)), step(-1, (2,), (3,)),
             step(1, (3,), (4,)), step(-1, (4, 1), (5,)))
    return SegmentPlan(steps, num_args=1, num_slots=6, output_spec=(("slot", 5),), num_blocks=2)


def test_step_schedule_replays_only_what_the_step_needs():
    plan = _plan()
    assert step_schedule(plan, [False, False]) == tuple((k, True) for k in range(5))
    # block 0 served: the glue and block 1 still need its (cached) output
    assert step_schedule(plan, [True, False]) == (
        (0, True), (1, False), (2, True), (3, True), (4, True))
    # every block served: the prologue (the epilogue reads it), block 1's cache, the epilogue
    assert step_schedule(plan, [True, True]) == ((0, True), (3, False), (4, True))
    # only the exit holds a cache: a whole step served runs the same, block 0 never
    assert step_schedule(_plan(cached_blocks=(1,)), [True, True]) == (
        (0, True), (3, False), (4, True))
    with pytest.raises(ForesightError, match="block 0 holds no cache"):
        step_schedule(_plan(cached_blocks=(1,)), [True, False])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_cudagraphs_lowering_without_cuda_raises_value_error_naming_the_option():
    assert "CUDA is not available" in cudagraphs_unavailable([torch.zeros(1)])
    fast = torch.compile(ToyDiT(), backend="foresight", options={"lowering": "cudagraphs"})
    with pytest.raises(ValueError, match="option 'lowering'='cudagraphs' needs CUDA"):
        fast(hidden_states=torch.randn(1, 4, 8), timestep=torch.tensor([500.0]))
    torch._dynamo.reset()
    graph = torch.compile(ToyDiT(), backend="foresight",
                          options={"lowering": "cudagraphs", "form": "graph"})
    with pytest.raises(ValueError, match="needs form='segments'"):
        graph(hidden_states=torch.randn(1, 4, 8), timestep=torch.tensor([500.0]))


class RecordingCapture(EagerCapture):
    """EagerCapture that logs every replay into a shared event list."""

    events: list = []

    def capture(self, fn):
        index = sum(e[0] == "captured" for e in self.events)
        self.events.append(("captured", index))
        replay, outs = super().capture(fn)

        def logged():
            self.events.append(("replay", index))
            replay()
        return logged, outs


def _program(gm, inputs, capture=EagerCapture, **options):
    program = ForesightProgram(gm, inputs, Options(**{**GRAPHED, **options}), capture=capture)
    assert isinstance(program.executor, CudaGraphExecutor)
    return program


@pytest.mark.parametrize("name", ["wan", pytest.param("cogvideox", marks=pytest.mark.slow)])
def test_executor_matches_segment_executor_decisions_and_values(name):
    dit = models.FACTORIES[name](layers=2)
    reference = torch.compile(dit.model, backend="foresight", options={**OPTS, "lowering": "inductor"})
    expected = models.denoise(reference, dit, 16)
    expected_mask = foresight_compile.stats(reference).mask
    torch._dynamo.reset()
    programs = []

    def backend(gm, inputs, **_):
        programs.append(_program(gm, inputs))
        return programs[-1]

    got = models.denoise(torch.compile(dit.model, backend=backend), dit, 16)
    (program,) = programs
    rows = program.controller.rows()
    masks = rows.mask
    assert masks == expected_mask and any(map(any, masks))
    assert rows.change == foresight_compile.stats(reference).change  # the metrics fed back
    assert torch.equal(got, expected)  # same segments, same order: bit for bit
    executor = program.executor
    (graphs,) = executor.graphs.values()
    # Output mode: a served block replays nothing (its cache buffers are its outputs), and
    # a segment only served blocks would read does not replay either.
    assert graphs.replayed == sum(compute for mask in masks
                                  for _, compute in step_schedule(executor.plan, mask))
    assert graphs.replayed < 16 * len(executor.steps)


def test_caches_are_the_compute_graphs_static_outputs_and_never_move():
    gm, inputs = small_graph("wan", layers=2)
    program = _program(gm, inputs)
    executor = program.executor
    addresses = []
    for t in torch.linspace(999, 1, 10):
        with torch.no_grad():  # as pipelines call the model
            executor(*[t.expand(1) if i == program.controller.timestep_index else a
                       for i, a in enumerate(inputs)])
        (state,) = program.controller.live_states()
        graphs = executor.graphs[state]
        blocks = [k for k, b in enumerate(executor.step_blocks) if b >= 0]
        # Output mode: the block outputs the next segments read are the cache buffers.
        outputs = [graphs.env[s] for k in blocks for s in executor.steps[k].outputs if s >= 0]
        assert all(any(o is c for cs in state.buffers.tensors for c in cs) for o in outputs)
        addresses.append(tuple(c.data_ptr() for cs in state.buffers.tensors for c in cs))
    assert len(set(addresses)) == 1 and len(executor.graphs) == 1
    assert state.buffers.nbytes == sum(c.nbytes for cs in state.buffers.tensors for c in cs) > 0


def test_no_graph_replays_after_the_next_mask_copy_is_queued():
    gm, inputs = small_graph("wan", layers=2)
    RecordingCapture.events = events = []
    program = _program(gm, inputs, capture=RecordingCapture)
    controller = program.controller
    begin, end = controller.begin, controller.end

    def logged_begin(args):
        state = begin(args)
        events.append(("begin", tuple(state.mask)))
        return state

    def logged_end(state):
        events.append(("end",))
        end(state)

    controller.begin, controller.end = logged_begin, logged_end
    with torch.no_grad():
        for t in torch.linspace(999, 1, 12):
            program(*[t.expand(1) if i == controller.timestep_index else a
                      for i, a in enumerate(inputs)])
    calls, current = [], None
    for event in events:
        if event[0] == "begin":
            current = {"mask": event[1], "replays": [], "ended": False}
            calls.append(current)
        elif event[0] == "replay":
            assert not current["ended"], "a graph replayed after controller.end queued the mask"
            current["replays"].append(event[1])
        elif event[0] == "end":
            current["ended"] = True
    assert len(calls) == 12 and all(c["ended"] for c in calls)
    plan = program.executor.plan
    for call in calls:  # exactly the schedule, in plan order
        assert call["replays"] == [k for k, r in step_schedule(plan, call["mask"]) if r]
    assert any(len(c["replays"]) < len(plan.steps) for c in calls)  # some steps reused blocks


def test_a_parameter_whose_storage_moved_is_refused_with_both_addresses():
    gm, inputs = small_graph("wan", layers=2)
    program = _program(gm, inputs)
    with torch.no_grad():
        program(*inputs)
    index = next(iter(program.executor.param_slots))
    moved = list(inputs)
    moved[index] = torch.nn.Parameter(inputs[index].detach().clone())
    ts = program.controller.timestep_index
    moved[ts] = inputs[ts] - 100  # the next step of the same generation (same dtype)
    with torch.no_grad(), pytest.raises(ForesightError,
                                        match=r"storage moved since capture \(captured at 0x"):
        program(*moved)


def test_policy_none_replays_every_graph_and_holds_no_cache():
    gm, inputs = small_graph("wan", layers=2)
    program = _program(gm, inputs, policy="none")
    ts = program.controller.timestep_index
    with torch.no_grad():
        for t in (900, 800, 700):
            step_inputs = [torch.tensor([t]) if i == ts else a for i, a in enumerate(inputs)]
            got = program(*step_inputs)
            # Inductor segments vs the eager graph: equal up to float rounding (the
            # equivalence bound of reuse switched off).
            assert rel_err(got[0], gm(*step_inputs)[0]) < 1e-5
    executor = program.executor
    (graphs,) = executor.graphs.values()
    assert graphs.replayed == 3 * len(executor.steps)
    (state,) = program.controller.live_states()
    assert state.buffers.tensors == (None, None) and state.buffers.nbytes == 0


@pytest.mark.parametrize("name", ["wan", pytest.param("cogvideox", marks=pytest.mark.slow)])
def test_forecasts_and_the_latent_probe_match_the_segment_executor(name):
    """The default policy (forecast history of two slots that rotate, latent-change probe)
    under the CUDA-graph executor: the segment executor's decisions and values."""
    options = {"tolerance": 2.0, "strict": True}
    dit = models.FACTORIES[name](layers=2)
    reference = torch.compile(dit.model, backend="foresight", options=options)
    with foresight_compile.generation(num_steps=16):
        expected = models.denoise(reference, dit, 16)
    expected_mask = foresight_compile.stats(reference).mask
    torch._dynamo.reset()
    programs = []

    def backend(gm, inputs, **_):
        programs.append(ForesightProgram(gm, inputs, Options(**options, lowering="cudagraphs"),
                                         capture=EagerCapture))
        return programs[-1]

    with foresight_compile.generation(num_steps=16):
        got = models.denoise(torch.compile(dit.model, backend=backend), dit, 16)
    (program,) = programs
    assert program.controller.rows().mask == expected_mask
    assert any(map(all, expected_mask)) and not all(map(all, expected_mask))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
