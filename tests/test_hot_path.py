"""What one steady-state step costs the host: allocations, host reads, writes into state.

A ``TorchDispatchMode`` sees every aten op of a step and attributes it to its issuer by the
Python frames above it: code Inductor generated (and the AOT/Inductor runtime wrappers
around it) versus the executor's and controller's own Python. The contract
(``runtime/executor.py``, ``runtime/controller.py``): in steady state, our Python allocates
no tensor, reads the device only for the timestep when it must, and never writes a cache
buffer or a metric row itself (the compiled update does, fused into the block).
"""
from __future__ import annotations

import gc
import os
import sys

import pytest
import torch
from torch._inductor.codecache import cache_dir
from torch.utils._python_dispatch import TorchDispatchMode

import foresight_compile
from foresight_compile import Options, models
from foresight_compile.program import ForesightProgram, programs_of

COMPILED_MARKERS = (cache_dir(), f"{os.sep}torch{os.sep}_inductor{os.sep}",
                    f"{os.sep}torch{os.sep}_functorch{os.sep}")
POLICIES = {
    "foresight": {"policy": "foresight", "warmup": 2, "recompute_every": 3, "threshold": 1e6,
                  "strict": True},
    # Foresight's released-code decision: its scratch tensors are the branch's own,
    # preallocated with the branch (PolicyState.scratch), so a step allocates none.
    "foresight_prefix": {"policy": "foresight", "decision": "prefix", "warmup": 2,
                         "recompute_every": 3, "threshold": 1e6, "strict": True},
    # The default policy: forecasts (order 1, a history of two values per block) and the
    # latent-change probe.
    "budget": {"tolerance": 1e6, "max_run": 3, "strict": True},
}
STEPS = 8  # steps 5 and 6 are audited: one serves every block, the other computes every block


def _storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}


def _flat(values) -> list:
    out = []
    for v in values:
        if isinstance(v, (list, tuple)):
            out += _flat(v)
        else:
            out.append(v)
    return out


class StepAudit(TorchDispatchMode):
    """Records, per op not issued by compiled code (so by the executor's and controller's
    Python, the only other code running inside a model call): whether it allocated (an
    output whose storage no input has), whether it read the device to the host, and which
    storages it wrote."""

    def __init__(self) -> None:
        super().__init__()
        self.allocations: list[str] = []
        self.host_reads: list[str] = []
        self.writes: list[tuple[str, set[int]]] = []
        self.compiled_ops = 0

    @staticmethod
    def _by_compiled_code() -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if any(m in frame.f_code.co_filename for m in COMPILED_MARKERS):
                return True
            frame = frame.f_back
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._by_compiled_code():
            self.compiled_ops += 1
            return out
        name = str(func)
        inputs = _storages(_flat(list(args) + list(kwargs.values())))
        if func is torch.ops.aten._local_scalar_dense.default:
            self.host_reads.append(name)
        outputs = [o for o in _flat([out]) if isinstance(o, torch.Tensor)]
        if any(o.untyped_storage().data_ptr() not in inputs for o in outputs):
            self.allocations.append(name)
        written = []
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = args[i] if i < len(args) else kwargs.get(arg.name)
                written += [t for t in _flat([value]) if isinstance(t, torch.Tensor)]
        if written:
            self.writes.append((name, written))
        return out


_AUDIT: list[StepAudit] = []  # the audit of the call in progress, if any


def _audited_backend(options: dict):
    """The foresight backend, entering the current audit inside the compiled region (Dynamo
    runs a frame eagerly when a dispatch mode is active around the compiled model)."""
    def backend(gm, example_inputs, **_):
        program = ForesightProgram(gm, example_inputs, Options.from_dict(options))

        def run(*args):
            if _AUDIT:
                with _AUDIT[0]:
                    return program(*args)
            return program(*args)
        return run
    return backend


def _model(name: str, policy: str = "foresight"):
    dit = models.FACTORIES[name](layers=2)
    return dit, torch.compile(dit.model, backend=_audited_backend(POLICIES[policy]))


def _audited_steps(dit, fast, context: bool):
    """Run a generation of ``STEPS`` steps; audit steps 5 and 6 (steady state: buffers
    exist). Returns the audits, the program and the branch state."""
    import diffusers

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(STEPS)
    x = torch.randn(dit.latent_shape, generator=torch.Generator().manual_seed(0))
    audits = []
    with torch.no_grad():
        with (foresight_compile.generation(num_steps=STEPS) if context else _null()):
            with (foresight_compile.branch("cond") if context else _null()):
                for i, t in enumerate(scheduler.timesteps):
                    inputs = dit.inputs(x, t.expand(x.shape[0]))
                    if i in (5, 6):
                        _AUDIT.append(StepAudit())
                        try:
                            out = fast(**inputs)
                        finally:
                            audits.append(_AUDIT.pop())
                    else:
                        out = fast(**inputs)
                    x = scheduler.step(dit.prediction(out), t, x).prev_sample
                program = programs_of(dit.model)[0]
                (state,) = [s for s in program.controller.live_states() if s.step == STEPS]
    return audits, program, state


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _elements(t: torch.Tensor) -> set[int]:
    """Byte addresses of the elements of a (small) tensor."""
    index = torch.zeros(t.shape, dtype=torch.long)
    for dim, (size, stride) in enumerate(zip(t.shape, t.stride())):
        shape = [1] * t.dim()
        shape[dim] = size
        index = index + (torch.arange(size) * stride).reshape(shape)
    base = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
    return {base + int(i) * t.element_size() for i in index.flatten()}


def _violations(audits, state, timestep_reads: int) -> list:
    """What our Python did in the audited steps beyond the contract."""
    # The blocks' metric rows (raw columns; the controller derives the others) and the
    # cache buffers are written by compiled code, never by our Python.
    raw = set().union(*(_elements(row) for row in state.policy_state.rows))
    caches = _storages(t for ts in state.buffers.tensors if ts for t in ts)
    metric_storage = state.policy_state.storage.untyped_storage().data_ptr()
    found = []
    for audit in audits:
        found += [("allocates", op) for op in audit.allocations]
        if len(audit.host_reads) != timestep_reads:
            found.append(("host reads", audit.host_reads))
        for op, tensors in audit.writes:
            for t in tensors:
                storage = t.untyped_storage().data_ptr()
                if storage in caches or (storage == metric_storage and _elements(t) & raw):
                    found.append(("writes state", op))
    return found


@pytest.mark.parametrize("name,policy", [(n, p) for p in sorted(POLICIES)
                                         for n in ("wan", "cogvideox")
                                         if p != "foresight_prefix" or n == "wan"])
def test_steady_state_step_allocates_nothing_and_reads_only_what_it_must(name, policy):
    torch._dynamo.reset()
    dit, fast = _model(name, policy)
    for context, timestep_reads in ((True, 0), (False, 1)):
        audits, program, state = _audited_steps(dit, fast, context)
        masks = foresight_compile.stats(fast).mask[-3:-1]  # steps 5 and 6
        assert sorted(map(any, masks)) == [False, True] and all(map(all, filter(any, masks)))
        assert _violations(audits, state, timestep_reads) == [], (name, context)
        assert all(a.compiled_ops > 0 for a in audits)  # the audit does see compiled code run
    torch._dynamo.reset()


def test_the_audit_fails_when_the_cache_write_leaves_the_compiled_update():
    torch._dynamo.reset()
    dit, fast = _model("wan")
    models.denoise(fast, dit, 2)
    program = programs_of(dit.model)[0]

    def outside(step):
        def update(*args):  # the block compiled, metric and cache written from Python
            n = len(step.outputs)
            ins, caches, row = args[:-n - 1], args[-n - 1:-1], args[-1]
            outs = step.segment(*ins)
            sq = (outs[0] - caches[0]).square().sum()
            row.copy_(torch.stack([sq, torch.tensor(1.0), torch.tensor(0.0), sq, torch.tensor(1.0)]))
            torch._foreach_copy_(list(caches), list(outs))
            return outs
        return update

    for step in program.executor.steps:
        if step.update is not None:
            object.__setattr__(step, "update", outside(step))  # frozen dataclass
    audits, _, state = _audited_steps(dit, fast, context=True)
    found = {kind for kind, _ in _violations(audits, state, 0)}
    assert found == {"allocates", "writes state"}
    torch._dynamo.reset()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.slow  # a hundred 30-step generations: the benchmark job of .ci/run
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc (Linux)")
@pytest.mark.filterwarnings("ignore::FutureWarning")  # gc.get_objects() touches deprecated names
def test_memory_is_flat_over_a_hundred_generations():
    torch._dynamo.reset()
    dit = models.wan(layers=2, frames=4, size=8)
    fast = torch.compile(dit.model, backend="foresight",
                         options={"policy": "foresight", "warmup": 4, "threshold": 4.0})
    seen = {}
    for generation in range(1, 101):
        models.denoise(fast, dit, 30)
        if generation in (10, 100):
            seen[generation] = (_rss_bytes(), _live_tensors())
    stats = foresight_compile.stats(fast)
    assert sum(stats.block_computes) > 0 and stats.steps == min(3000, 8192)
    (rss10, tensors10), (rss100, tensors100) = seen[10], seen[100]
    # No growth. (The count may fall: after a long suite in one process, objects of earlier
    # tests are still being released while this one runs; measured 5981 -> 5816 there.)
    assert tensors100 <= tensors10, (tensors10, tensors100)
    assert rss100 - rss10 < 16 * 2**20, (rss10, rss100)  # within allocator noise
    torch._dynamo.reset()
