"""CUDA-graph lowering of the host-branch form: ``options={"lowering": "cudagraphs"}``.

Every segment of the partitioned graph (prologue, each block's compute branch, the glue
between blocks, epilogue) is compiled by Inductor (blocks of one stack share code) and
captured as one CUDA graph per CFG branch, over static buffers:

* the graph inputs that are not parameters are copied into static input buffers each call;
* a segment reads the static outputs of the segments before it (addresses fixed at capture);
* a block's compute graph runs the block, writes ``[mse, finite]`` of its outputs against
  the cache into ``metrics[l]`` and copies the outputs into the block's cache buffers:
  **the cache buffers are the static outputs of the compute graph**, so serving the cache
  is replaying nothing (plus a copy where the value escapes or is mutated downstream).

Per call: ``controller.begin`` reads the host mask (copied from the device one step ahead,
queued behind the previous step's last graph), the executor replays the graphs that
``step_schedule`` lists, and ``controller.end`` queues the next mask's host copy behind
the last replayed graph. All graphs of one branch share one memory pool and are captured
and replayed in plan order (skipping some is safe: every value read across graphs or steps
lives outside the pool or is written by a graph replayed earlier in the same call).

Capture needs CUDA; ``capture=EagerCapture`` runs the same executor anywhere with plain
calls standing in for graphs (replay re-runs and copies into the captured outputs), so
the buffer plan and the schedule are tested on CPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Callable, Iterator, Sequence

import torch

from foresight_compile.errors import ForesightError
from foresight_compile.lowering import SegmentCompiler
from foresight_compile.passes.partition import Segmented
from foresight_compile.runtime.controller import BranchState, ReuseController
from foresight_compile.runtime.plan import PlanStep, build_plan
from foresight_compile.runtime.policies.base import MSE

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


def step_schedule(step_blocks: Sequence[int], mask: Sequence[bool]) -> tuple[tuple[int, bool], ...]:
    """What one call does, in plan order: ``(plan step, replay)`` for every step.

    ``step_blocks[k]`` is the block of plan step ``k`` (-1 for prologue, glue, epilogue).
    A non-block step is always replayed; a block step is replayed unless ``mask`` reuses
    its block, in which case it is served (its cache buffers already are its outputs)."""
    return tuple((k, block < 0 or not mask[block]) for k, block in enumerate(step_blocks))


class CudaCapture:
    """Real CUDA graphs: warm-up on a side stream, one shared pool per CFG branch."""

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
    """The captured graphs and static buffers of one CFG branch."""

    signature: tuple | None
    static_inputs: list  # per graph input: the static buffer (or the parameter itself)
    copied: tuple[int, ...]  # graph inputs copied into their static buffer each call
    replays: tuple[Callable[[], None], ...]  # per plan step
    serves: tuple[Callable[[], None] | None, ...]  # per plan step: copies for a served block
    caches: list  # per block: its cache buffers (tuple), None when the policy keeps none
    env: list  # slot -> static tensor
    replayed: int = 0  # graph replays so far (for stats and tests)


class CudaGraphExecutor:
    """Host-branch executor whose segments replay as CUDA graphs (see the module docstring).

    Assumes static shapes per CFG branch (a shape change recaptures that branch, logged)
    and that parameters keep their storage (checked each call; a moved parameter raises).
    Guarantees: the same decisions and values as ``SegmentExecutor``; cache buffers and
    every static buffer keep their addresses from capture on; no graph is replayed after
    ``controller.end`` queues the next mask, so that mask sees every metric of the step."""

    def __init__(self, segmented: Segmented, controller: ReuseController,
                 compiler: SegmentCompiler, example_inputs: Sequence[Any],
                 capture: Callable[[torch.device], Any] = CudaCapture) -> None:
        self.controller = controller
        self.compiler = compiler
        self.capture_factory = capture
        self.uses_cache = controller.policy.needs_cache
        plan = build_plan(segmented, compiler, self.uses_cache)
        self.num_args = plan.num_args
        self.param_slots = frozenset(i for i, v in enumerate(example_inputs)
                                     if isinstance(v, torch.nn.Parameter))
        self.steps = plan.steps
        self.step_blocks = tuple(s.block for s in plan.steps)
        self.output_spec = plan.output_spec
        self.num_slots = plan.num_slots
        self.num_blocks = len(segmented.block_submods)
        self.block_computes = [0] * self.num_blocks
        self.branches: list[BranchGraphs | None] = []

    # -- capture ---------------------------------------------------------------------------
    def _capture(self, state: BranchState, args: Sequence[Any]) -> BranchGraphs:
        capture = self.capture_factory(state.device)
        static = [a if (i in self.param_slots or not isinstance(a, torch.Tensor)) else a.clone()
                  for i, a in enumerate(args)]
        copied = tuple(i for i, a in enumerate(args)
                       if i not in self.param_slots and isinstance(a, torch.Tensor))
        env: list = [None] * self.num_slots
        env[: self.num_args] = static
        caches: list = [None] * self.num_blocks
        # 1. Warm-up: every segment runs once with real values outside capture, so Inductor
        #    compiles now and the cache buffers get their shapes.
        with capture.warmup():
            for step in self.steps:
                ins = tuple(env[i] for i in step.inputs)
                outs = step.segment(*ins)
                if step.tracked is not None:
                    caches[step.block] = tuple(torch.empty_like(o, memory_format=torch.contiguous_format)
                                               for o in outs)
                    torch._foreach_copy_(list(caches[step.block]), list(outs))
                    step.tracked(*ins, *caches[step.block])
                for slot, value in zip(step.outputs, outs):
                    if slot >= 0:
                        env[slot] = value
        # 2. Capture in plan order; each step reads the static outputs captured before it.
        rows = state.policy_state.rows
        replays, serves = [], []
        env[self.num_args:] = [None] * (self.num_slots - self.num_args)
        for step in self.steps:
            ins = tuple(env[i] for i in step.inputs)
            publish: tuple = ()
            if step.tracked is not None and any(step.clone):
                # Served values that escape or are mutated downstream are read from their
                # own buffers, refreshed from the cache on compute and serve alike.
                publish = tuple(torch.empty_like(c) if clone else None
                                for c, clone in zip(caches[step.block], step.clone))
            replay, outs = capture.capture(self._graph_fn(step, ins, caches, rows, publish))
            replays.append(replay)
            serves.append(self._serve_fn(caches[step.block], publish) if publish else None)
            for k, (slot, value) in enumerate(zip(step.outputs, outs)):
                if slot >= 0:
                    env[slot] = publish[k] if publish and publish[k] is not None else value
        log.info("captured %d CUDA graphs for CFG branch %d", len(replays), state.branch)
        return BranchGraphs(state.signature, static, copied, tuple(replays), tuple(serves),
                            caches, env)

    def _graph_fn(self, step: PlanStep, ins: tuple, caches: list, rows, publish: tuple):
        if step.tracked is None:
            return lambda: step.segment(*ins)
        cache, row = caches[step.block], rows[step.block]
        targets = list(cache)

        def compute():
            result = step.tracked(*ins, *cache)
            row.copy_(result[-1])
            torch._foreach_copy_(targets, list(result[:-1]))
            for p, c in zip(publish, cache):
                if p is not None:
                    p.copy_(c)
            return cache
        return compute

    @staticmethod
    def _serve_fn(cache: tuple, publish: tuple) -> Callable[[], None]:
        pairs = [(p, c) for p, c in zip(publish, cache) if p is not None]

        def serve() -> None:
            for p, c in pairs:
                p.copy_(c)
        return serve

    def _graphs(self, state: BranchState, args: Sequence[Any]) -> BranchGraphs:
        while len(self.branches) <= state.branch:
            self.branches.append(None)
        graphs = self.branches[state.branch]
        if graphs is None or graphs.signature != state.signature:
            if graphs is not None:
                log.info("CFG branch %d: input shapes changed, recapturing", state.branch)
            if any(state.mask):
                raise ForesightError("internal: a capture must start on a step that computes "
                                     "every block")
            graphs = self.branches[state.branch] = self._capture(state, args)
        return graphs

    # -- one evaluation --------------------------------------------------------------------
    def __call__(self, *args):
        state = self.controller.begin(args)
        graphs = self._graphs(state, args)
        static = graphs.static_inputs
        for i in self.param_slots:
            if args[i] is not static[i] and args[i].data_ptr() != static[i].data_ptr():
                raise ForesightError(
                    f"graph input {i} is a parameter whose storage moved since capture "
                    f"(captured at {static[i].data_ptr():#x}, now {args[i].data_ptr():#x}); "
                    f"update weights in place (param.data.copy_) or compile again")
        for i in graphs.copied:
            static[i].copy_(args[i])
        mask = state.mask
        fresh = state.buffers.tensors[0] is None  # first call or invalidated: no cache held
        for k, replay in step_schedule(self.step_blocks, mask):
            if replay:
                graphs.replays[k]()
                graphs.replayed += 1
            elif graphs.serves[k] is not None:
                graphs.serves[k]()
        if self.uses_cache:
            if fresh:
                # The graphs measured against a cache of no use to this generation; as in
                # SegmentExecutor, a block's first compute records only finiteness.
                state.policy_state.metrics[:, MSE].zero_()
            state.buffers.tensors[:] = graphs.caches
        for l, reused in enumerate(mask):
            self.block_computes[l] += not reused
        self.controller.end(state)
        env = graphs.env
        return tuple(env[v].clone() if kind == "slot" and isinstance(env[v], torch.Tensor)
                     else env[v] if kind == "slot" else v for kind, v in self.output_spec)
