"""CUDA-graph executor of the host-branch form: ``options={"lowering": "cudagraphs"}``.

Every step of the segment plan is captured as a CUDA graph per CFG branch state, over
static buffers: prologue, glue and epilogue segments; for each block its compute graph (the
compiled cache update: block, change metric into the branch's metric row, new cache into
the branch's ``CacheBuffers``) and, where serving needs work, its serve graph.

* the graph inputs that are not parameters are copied into static input buffers each call;
* a segment reads the static outputs of the segments before it (addresses fixed at capture);
* a block's static outputs are what downstream segments read. In output mode with nothing
  to copy they are the cache buffers themselves: serving a block replays nothing. Otherwise
  (residual mode, or an output that escapes or is mutated downstream) the serve graph
  writes the served values into the compute graph's static outputs;
* with forecasts (order k), the history slots rotate (``cache_history.py``): each cached
  block has one compute and one serve graph per rotation (k + 1 of each), all writing the
  block's outputs into one static buffer, and the forecast weights are read from the
  branch's weights table;
* a block that holds no cache (inside a region whose exit alone is cached) has its plain
  segment's graph, replayed on steps that compute;
* a policy reading the latent's change has one more graph, replayed first.

Per call: ``controller.begin`` reads the host mask (copied from the device at the end of an
earlier step), the executor replays what ``step_schedule`` lists (only what the step needs,
as ``executor.live_steps`` works it out: on a step that serves every block, the prologue,
the exit's serve and the epilogue), and ``controller.end`` queues the next mask's copy
behind the last replayed graph.

Capture needs CUDA; ``capture=EagerCapture`` runs the same executor anywhere with plain
calls standing in for graphs (a replay re-runs and copies into the captured outputs), so
the buffer plan and the schedule are tested on CPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
import weakref
from typing import Any, Callable, Iterator, Sequence

import torch

from foresight_compile.errors import ForesightError
from foresight_compile.runtime.controller import ReuseController
from foresight_compile.runtime.executor import Executor, ScheduleCache, live_steps
from foresight_compile.runtime.plan import PlanStep, SegmentPlan
from foresight_compile.runtime.state import BranchState

log = logging.getLogger(__name__)


def cudagraphs_unavailable(example_inputs: Sequence[Any]) -> str | None:
    """Why ``lowering="cudagraphs"`` cannot run these inputs, or None when it can."""
    if not torch.cuda.is_available():
        return "CUDA is not available here (torch.cuda.is_available() is False)"
    devices = sorted({str(t.device) for t in example_inputs if isinstance(t, torch.Tensor)})
    if any(not d.startswith("cuda") for d in devices):
        return f"the model's tensors are on {', '.join(devices)}; move model and inputs to CUDA"
    if len(devices) > 1:
        return f"the model's tensors are on several devices ({', '.join(devices)})"
    return None


def step_schedule(plan: SegmentPlan, mask: Sequence[bool]) -> tuple[tuple[int, bool], ...]:
    """What one call replays, in plan order: ``(plan step, compute)`` for the steps
    ``live_steps`` says the call needs. A non-block step replays its graph; a block step its
    compute graph unless ``mask`` serves its block (then its serve graph, if it has one)."""
    blocks = tuple(s.block for s in plan.steps)
    return tuple((k, blocks[k] < 0 or not mask[blocks[k]]) for k in live_steps(plan, mask))


class CudaCapture:
    """Real CUDA graphs: warm-up on a side stream, one shared pool per branch state."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()

    @contextlib.contextmanager
    def warmup(self) -> Iterator[None]:
        # As torch.cuda.graphs recommends: first runs (Inductor compiles, cuBLAS handles,
        # workspace allocations) on a side stream, outside any capture.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)

    def capture(self, fn: Callable[[], tuple]) -> tuple[Callable[[], None], tuple]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = fn()
        return graph.replay, outputs


class EagerCapture:
    """Stand-in for ``CudaCapture`` on any device (tests, debugging).

    ``capture`` calls ``fn`` once and keeps its outputs as the static outputs; a replay
    calls ``fn`` again and copies the results into them, which is what replaying a CUDA
    graph does to the tensors allocated during its capture."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def warmup(self):
        return contextlib.nullcontext()

    def capture(self, fn: Callable[[], tuple]) -> tuple[Callable[[], None], tuple]:
        static = fn()

        def replay() -> None:
            for out, new in zip(static, fn()):
                if out is not new:
                    out.copy_(new)
        return replay, static


@dataclasses.dataclass
class BranchGraphs:
    """The captured graphs and static buffers of one branch state."""

    signature: tuple | None
    static_inputs: list  # per graph input: the static buffer (or the parameter itself)
    copied: tuple[int, ...]  # graph inputs copied into their static buffer each call
    param_ptrs: tuple[int, ...]  # storage addresses of the parameters at capture
    computes: tuple  # per plan step: a replay, or per rotation a tuple of replays
    serves: tuple  # per plan step: None (nothing runs), a replay, or per rotation a tuple
    probe: Callable[[], None] | None  # the latent-change graph
    env: list  # slot -> static tensor
    replayed: int = 0  # graph replays so far (for stats and tests)


class CudaGraphExecutor(Executor):
    """Host-branch executor whose segments replay as CUDA graphs (see the module docstring).

    Assumes static shapes per branch (a shape change recaptures that branch, logged) and
    that parameters keep their storage (checked each call; a moved parameter raises).
    Guarantees: the same decisions and values as ``SegmentExecutor``; cache buffers and
    every static buffer keep their addresses from capture on; no graph is replayed after
    ``controller.end`` queues the next mask, so that mask sees every metric of the step."""

    def __init__(self, plan: SegmentPlan, controller: ReuseController,
                 example_inputs: Sequence[Any],
                 capture: Callable[[torch.device], Any] = CudaCapture) -> None:
        self.controller = controller
        self.capture_factory = capture
        self.num_args = plan.num_args
        self.param_slots = tuple(i for i, v in enumerate(example_inputs)
                                 if isinstance(v, torch.nn.Parameter))
        self._params = operator.itemgetter(*self.param_slots) if len(self.param_slots) > 1 else (
            (lambda args: (args[self.param_slots[0]],)) if self.param_slots else (lambda args: ()))
        self.plan = plan
        self.steps = plan.steps
        self.step_blocks = tuple(s.block for s in plan.steps)
        self.output_spec = plan.output_spec
        self.num_slots = plan.num_slots
        self.num_blocks = plan.num_blocks
        self._schedule = ScheduleCache(lambda mask: step_schedule(self.plan, mask))
        self.graphs: "weakref.WeakKeyDictionary[BranchState, BranchGraphs]" = \
            weakref.WeakKeyDictionary()

    # -- capture ---------------------------------------------------------------------------
    def _capture(self, state: BranchState, args: Sequence[Any]) -> BranchGraphs:
        capture = self.capture_factory(state.device)
        params = set(self.param_slots)
        static = [a if (i in params or not isinstance(a, torch.Tensor)) else a.clone()
                  for i, a in enumerate(args)]
        copied = tuple(i for i, a in enumerate(args)
                       if i not in params and isinstance(a, torch.Tensor))
        env: list = [None] * self.num_slots
        env[: self.num_args] = static
        history = state.history
        buffers = history.buffers
        buffers.invalidate()
        # 1. Warm-up: every segment runs once with real values outside capture, so Inductor
        #    compiles now and the cache buffers get their shapes.
        with capture.warmup():
            for step in self.steps:
                ins = tuple(env[i] for i in step.inputs)
                outs = step.segment(*ins)
                if step.update is not None:
                    values = outs if step.residual is None else tuple(
                        o - ins[p] for o, p in zip(outs, step.residual))
                    step.store(*values, *history.allocate(step.block, outs))
                    extra = (history.weights[step.block],) if step.slots > 1 else ()
                    held = history.aged(step.block, 0)
                    step.update(*ins, *held, *extra, state.policy_state.rows[step.block])
                    if step.serve is not None:
                        step.serve(*ins, *held, *extra)
                for slot, value in zip(step.outputs, outs):
                    if slot >= 0:
                        env[slot] = value
        # 2. Capture in plan order; each step reads the static outputs captured before it.
        computes, serves = [], []
        probe = None
        if self.plan.probe is not None:
            latent = static[self.plan.probe_slot]
            previous = buffers.probe_like(latent)
            aux = state.policy_state.aux
            probe, _ = capture.capture(lambda: (self.plan.probe(latent, previous, aux), ())[1])
        env[self.num_args:] = [None] * (self.num_slots - self.num_args)
        for step in self.steps:
            ins = tuple(env[i] for i in step.inputs)
            compute, serve, outs = self._capture_step(capture, step, ins, state)
            computes.append(compute)
            serves.append(serve)
            for slot, value in zip(step.outputs, outs):
                if slot >= 0:
                    env[slot] = value
        log.info("captured %d CUDA graphs for branch %d", len(computes) + sum(
            s is not None for s in serves), state.branch)
        ptrs = tuple(p.data_ptr() for p in self._params(args))
        return BranchGraphs(state.signature, static, copied, ptrs, tuple(computes),
                            tuple(serves), probe, env)

    def _capture_step(self, capture, step: PlanStep, ins: tuple, state: BranchState):
        if step.update is None:
            replay, outs = capture.capture(lambda: step.segment(*ins))
            return replay, None, outs
        held = state.buffers.held(step.block)
        row = state.policy_state.rows[step.block]
        if step.slots > 1:
            return self._capture_rotations(capture, step, ins, state, row)
        if step.serve is None:
            # Output mode, nothing to copy: the cache buffers are the block's outputs.
            def compute():
                step.update(*ins, *held, row)
                return held
            replay, outs = capture.capture(compute)
            return replay, None, outs
        replay, outs = capture.capture(lambda: step.update(*ins, *held, row))

        def serve():
            torch._foreach_copy_(list(outs), list(step.serve(*ins, *held)))
            return ()
        serve_replay, _ = capture.capture(serve)
        return replay, serve_replay, outs

    def _capture_rotations(self, capture, step: PlanStep, ins: tuple, state: BranchState, row):
        """Forecast history: per rotation of the slots, a compute and a serve graph, all
        writing the block's outputs into one static buffer."""
        history, weights = state.history, state.history.weights[step.block]
        first = step.segment(*ins)
        outs = tuple(torch.empty_like(o) for o in first)
        computes, serves = [], []
        for rotation in range(step.slots):
            held = history.aged(step.block, rotation)

            def compute(held=held):
                torch._foreach_copy_(list(outs), list(step.update(*ins, *held, weights, row)))
                return ()

            def serve(held=held):
                torch._foreach_copy_(list(outs), list(step.serve(*ins, *held, weights)))
                return ()
            computes.append(capture.capture(compute)[0])
            serves.append(capture.capture(serve)[0])
        return tuple(computes), tuple(serves), outs

    def _graphs(self, state: BranchState, args: Sequence[Any]) -> BranchGraphs:
        graphs = self.graphs.get(state)
        if graphs is None or graphs.signature != state.signature:
            if graphs is not None:
                log.info("branch %d: input shapes changed, recapturing", state.branch)
            if any(state.mask):
                raise ForesightError("internal: a capture must start on a step that computes "
                                     "every block")
            graphs = self.graphs[state] = self._capture(state, args)
        return graphs

    # -- one evaluation --------------------------------------------------------------------
    def run(self, state: BranchState, args) -> tuple:
        graphs = self._graphs(state, args)
        ptrs = tuple(map(torch.Tensor.data_ptr, self._params(args)))
        if ptrs != graphs.param_ptrs:
            index, was, now = next((self.param_slots[k], a, b) for k, (a, b) in
                                   enumerate(zip(graphs.param_ptrs, ptrs)) if a != b)
            raise ForesightError(
                f"graph input {index} is a parameter whose storage moved since capture "
                f"(captured at {was:#x}, now {now:#x}); update weights in place "
                f"(param.data.copy_) or compile again")
        static = graphs.static_inputs
        for i in graphs.copied:
            static[i].copy_(args[i])
        if graphs.probe is not None:
            graphs.probe()
        serves, computes, newest = graphs.serves, graphs.computes, state.history.newest
        blocks = self.step_blocks
        for k, compute in self._schedule(state.mask):
            replay = computes[k] if compute else serves[k]
            if replay is None:
                continue
            if isinstance(replay, tuple):  # one graph per rotation of the history slots
                replay = replay[newest[blocks[k]]]
            replay()
            graphs.replayed += 1
        env = graphs.env
        return tuple(env[v].clone() if kind == "slot" and isinstance(env[v], torch.Tensor)
                     else env[v] if kind == "slot" else v for kind, v in self.output_spec)
