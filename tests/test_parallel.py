"""Block reuse under diffusers' context parallelism (Ulysses, 2 gloo ranks on the CPU).

Each rank holds half of the tokens; the blocks exchange them through all-to-all inside
attention. The backend must find the block stack through diffusers' parallel hooks, and
every rank must decide the same mask (a block computed on one rank and served on the other
would leave the first waiting in the block's all-to-all): the metric rows are summed over
the group the blocks communicate over, once per step, before the policy reads them.

A 4-rank case (2 data-parallel replicas x Ulysses 2) checks that a replica sums over its
own pair only. The multi-process cases take minutes (spawn, imports, tracing on two processes sharing the
machine) and are marked ``slow``; run them with ``pytest -m slow tests/test_parallel.py``.
Each has a hard deadline and a process-group timeout, so a rank waiting in a collective
fails the test instead of hanging it.
"""
from __future__ import annotations

import pytest
import torch

import foresight_compile
from distributed import distributed_unavailable, spawn_ranks
from foresight_compile import models
from foresight_compile.passes.collectives import group_names, group_sum_graph
from foresight_compile.program import programs_of
from foresight_compile.runtime.policies.base import BAD, COUNT, PolicyState, SQ

STEPS = 30
LAYERS = {"wan": 4, "flux": 2}
# The budget policy's decision quantity (the accumulated estimated error of a run of
# served steps, ``aux[7]``) is compared with the tolerance; two runs that sum the same
# squares in another order may land on opposite sides only when it lies this close.
ROUNDING = 1e-4
_TMP = 7  # runtime/policies/budget.py: the aux column the decision compares

needs_gloo = pytest.mark.skipif(distributed_unavailable() is not None,
                                reason=str(distributed_unavailable()))


# -- one process: the pieces ---------------------------------------------------------------

def _graph_with_collectives() -> torch.fx.GraphModule:
    """A graph naming two groups the way Dynamo records diffusers' Ulysses attention (not
    run: building it needs no process group)."""
    ops = torch.ops._c10d_functional
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    a = graph.call_function(ops.all_to_all_single.default, (x, [2, 2], [2, 2], "7"))
    a = graph.call_function(ops.wait_tensor.default, (a,))
    b = graph.call_function(ops.all_gather_into_tensor, (a, 2, "3"))  # a packet target
    b = graph.call_function(ops.wait_tensor.default, (b,))
    c = graph.call_function(ops.all_reduce.default, (b, "sum"), {"group_name": "7"})
    graph.output((graph.call_function(torch.relu, (c,)),))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


@needs_gloo  # the _c10d_functional ops exist in builds with torch.distributed
def test_group_names_are_read_from_the_collectives_in_order_of_first_use():
    gm = _graph_with_collectives()
    assert group_names(gm.graph.nodes) == ("7", "3")
    assert group_names([]) == ()  # one device
    graph = group_sum_graph(("7", "3"), BAD, probe=True)
    assert [p.name for p in graph.graph.find_nodes(op="placeholder")] == ["raw", "sums", "probe"]


@needs_gloo
def test_a_graph_with_collectives_and_no_stack_points_to_prepare_parallel():
    from foresight_compile.backend import foresight_backend
    from foresight_compile.errors import BlockDiscoveryError

    with pytest.raises(BlockDiscoveryError, match="prepare_parallel"):
        foresight_backend(_graph_with_collectives(), [torch.zeros(4)], {"strict": True})


def test_prepare_parallel_does_nothing_without_parallel_hooks():
    from toy import ToyDiT

    before = set(torch._dynamo.config.ignore_logging_functions)
    assert foresight_compile.prepare_parallel(ToyDiT()) == 0
    assert set(torch._dynamo.config.ignore_logging_functions) == before


@pytest.mark.parametrize("policy", ["foresight", "none"])
def test_the_controller_derives_from_the_groups_totals_once_per_step(policy):
    """A stand-in for the reduce: another rank's rows (a fixed tensor) added to ours."""
    from toy import ToyDiT, toy_loop

    model = ToyDiT(layers=3).eval()
    fast = torch.compile(model, backend="foresight",
                         options={"policy": policy, "warmup": 2, "lowering": "eager",
                                  "strict": True})
    toy_loop(fast, 1)
    (program,) = programs_of(model)
    assert program.controller.reduce is None  # one device: nothing to reduce
    peer = torch.rand(3, 5) + 1.0
    calls = []

    def reduce(ps: PolicyState) -> None:
        calls.append(ps.raw.clone())
        torch.add(ps.raw, peer, out=ps.sums)
    program.controller.reduce = reduce
    toy_loop(fast, 6)
    if policy == "none":
        assert calls == []  # nothing decides: no collective
        return
    assert len(calls) == 6
    (state,) = [s for s in program.controller.live_states() if s.step == 6]
    ps = state.policy_state
    assert torch.equal(ps.raw, calls[-1])  # the reduce never writes this rank's own rows
    expected = (ps.raw[:, SQ] + peer[:, SQ]) / (ps.raw[:, COUNT] + peer[:, COUNT])
    assert torch.allclose(ps.mse, expected)


# -- two processes -------------------------------------------------------------------------

def _enable_ulysses(model: torch.nn.Module, degree: int = 2) -> torch.nn.Module:
    from diffusers import ContextParallelConfig
    model.set_attention_backend("native")  # Ulysses works with it; ring needs the LSE
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))
    foresight_compile.prepare_parallel(model)
    return model


def _recording_decisions(program) -> list[float]:
    """After each step, the budget policy's decision quantity (host copy, test only)."""
    controller, seen = program.controller, []
    end = controller.end

    def recorded(state):
        end(state)
        seen.append(float(state.policy_state.aux[_TMP]))
    controller.end = recorded
    return seen


def _generate(model, fam, options: dict | None, steps: int):
    """One generation (``options`` None: eager); output, masks, decision quantities."""
    if options is None:
        return models.denoise(model, fam, steps), None, None
    torch._dynamo.reset()
    before = {id(p) for p in programs_of(model)}
    fast = torch.compile(model, backend="foresight", options=options)
    with torch._dynamo.config.patch(error_on_recompile=True):
        models.denoise(fast, fam, 1)  # builds the program (a generation of its own)
        (program,) = [p for p in programs_of(model) if id(p) not in before]
        program.controller.reset(clear_stats=True)
        seen = _recording_decisions(program)
        out = models.denoise(fast, fam, steps)
    return out, program.controller.rows().mask, seen


def _reuse_under_ulysses(rank: int, world: int, family: str, steps: int, lowering: str):
    from foresight_compile.models import families
    options = {"num_steps": steps, "lowering": lowering, "strict": True}
    fam = families.get(family, layers=LAYERS[family])
    reference = _generate(fam.model, fam, None, steps)[0]
    single = _generate(fam.model, fam, options, steps)
    parallel = families.get(family, layers=LAYERS[family])  # the same seeded weights
    _enable_ulysses(parallel.model, world)
    exact = _generate(parallel.model, parallel, {**options, "policy": "none"}, steps)[0]
    reused = _generate(parallel.model, parallel, options, steps)
    program = programs_of(parallel.model)[-1]
    return dict(rank=rank, reference=reference, single=single, exact=exact, reused=reused,
                blocks=program.block_paths, reduces=program.controller.reduce is not None)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _check_same_decisions(mask, single_mask, seen, single_seen, tolerance: float) -> None:
    """Masks equal step by step, except at a step whose decision (taken at the end of the
    step before) compared a quantity within float rounding of the tolerance: summing the
    shards' squares adds in another order than one process does."""
    assert len(mask) == len(single_mask) == STEPS
    for step, (a, b) in enumerate(zip(mask, single_mask)):
        if a != b:
            q, p = seen[step - 1], single_seen[step - 1]
            assert max(abs(q - tolerance), abs(p - tolerance)) <= ROUNDING * tolerance, (
                f"step {step}: the parallel run decided {a[0]}, the single process {b[0]}, "
                f"from {q} and {p} against the tolerance {tolerance}: not a rounding tie")
            print(f"step {step}: decisions differ at a rounding tie ({q}, {p}, {tolerance})")


@needs_gloo
@pytest.mark.slow
@pytest.mark.parametrize("family", ["wan", "flux"])
def test_ulysses_ranks_reuse_like_one_process(family):
    ranks = spawn_ranks(_reuse_under_ulysses, 2, family, STEPS, "eager",
                        timeout_s=900, pg_timeout_s=120)
    tolerance = foresight_compile.Options().tolerance
    for r in ranks:
        # the stack is found through the hooks, and the metrics are summed over the group
        expected = ["blocks.0", "blocks.1", "blocks.2", "blocks.3"] if family == "wan" else [
            "transformer_blocks.0", "transformer_blocks.1",
            "single_transformer_blocks.0", "single_transformer_blocks.1"]
        assert r["blocks"] == expected and r["reduces"]
        # reuse off: the parallel run is the single-process run
        assert _rel(r["exact"], r["reference"]) <= 1e-5
        out, mask, seen = r["reused"]
        single_out, single_mask, single_seen = r["single"]
        assert any(all(m) for m in mask), "the default policy served no step"
        _check_same_decisions(mask, single_mask, seen, single_seen, tolerance)
        if mask == single_mask:
            assert _rel(out, single_out) <= 1e-4
    assert ranks[0]["reused"][1] == ranks[1]["reused"][1]  # one mask on every rank
    assert torch.equal(ranks[0]["reused"][0], ranks[1]["reused"][0])


def _recording_rows(program) -> list[tuple[torch.Tensor, ...]]:
    """After each step: this rank's own metric rows, the group's totals and the thresholds
    (copies)."""
    controller, seen = program.controller, []
    end = controller.end

    def recorded(state):
        end(state)
        ps = state.policy_state
        seen.append((ps.raw.clone(), ps.sums.clone(), ps.thresholds.clone()))
    controller.end = recorded
    return seen


def _different_shards(rank: int, world: int, policy: dict, steps: int):
    """Each rank denoises its own latent (seed = rank), scaled by 1 + rank on the way in:
    the shards differ, so do the local metrics; the decisions must not."""
    from foresight_compile.models import families
    fam = families.get("wan", layers=LAYERS["wan"])
    make_inputs = fam.make_inputs
    fam.make_inputs = lambda x, t: make_inputs(x * (1 + rank), t)
    _enable_ulysses(fam.model, world)
    fast = torch.compile(fam.model, backend="foresight",
                         options={"num_steps": steps, "lowering": "eager", "strict": True,
                                  **policy})
    models.denoise(fast, fam, 1, seed=rank)
    (program,) = programs_of(fam.model)
    program.controller.reset(clear_stats=True)
    rows = _recording_rows(program)
    models.denoise(fast, fam, steps, seed=rank)
    return program.controller.rows().mask, rows


@needs_gloo
@pytest.mark.slow
@pytest.mark.parametrize("policy", [{}, {"policy": "foresight", "warmup": 4, "threshold": 2.0}],
                         ids=["budget", "foresight"])
def test_ranks_with_different_shards_still_decide_alike(policy):
    (mask0, rows0), (mask1, rows1) = spawn_ranks(_different_shards, 2, policy, 16,
                                                 timeout_s=600, pg_timeout_s=60)
    assert mask0 == mask1  # one decision on every rank (else a rank waits in a collective)
    assert any(any(m) for m in mask0), "nothing was reused"
    apart = 0  # steps where the ranks' own metrics would have decided differently
    for (raw0, sums0, thr), (raw1, sums1, _) in zip(rows0, rows1):
        assert not torch.allclose(raw0, raw1, rtol=0.05)  # the local metrics differ
        assert torch.equal(sums0, sums1)  # every rank derives from the same totals
        total = raw0 + raw1
        total[:, BAD].clamp_(max=1.0)
        assert torch.allclose(sums0, total, rtol=1e-6, atol=0)  # numerators, denominators
        local0 = raw0[:, SQ] / raw0[:, COUNT] <= thr
        local1 = raw1[:, SQ] / raw1[:, COUNT] <= thr
        apart += bool((thr > 0).all() and not torch.equal(local0, local1))
    if policy:
        assert apart > 0, "the ranks' local metrics never disagreed: the test shows nothing"


def _data_and_context_parallel(rank: int, world: int, steps: int):
    """4 ranks: 2 data-parallel replicas (their own latents and thresholds) of a model
    parallelized over 2 ranks (Ulysses) each."""
    from foresight_compile.models import families
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("dp", "ring", "ulysses"))
    replica = rank // 2
    fam = families.get("wan", layers=LAYERS["wan"])
    make_inputs = fam.make_inputs
    fam.make_inputs = lambda x, t: make_inputs(x * (1 + rank), t)
    fam.model.set_attention_backend("native")
    fam.model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2, mesh=mesh))
    foresight_compile.prepare_parallel(fam.model)
    fast = torch.compile(fam.model, backend="foresight", options={
        "num_steps": steps, "lowering": "eager", "strict": True, "policy": "foresight",
        "warmup": 4, "threshold": (2.0, 0.5)[replica]})
    models.denoise(fast, fam, 1, seed=rank)
    (program,) = programs_of(fam.model)
    program.controller.reset(clear_stats=True)
    rows = _recording_rows(program)
    models.denoise(fast, fam, steps, seed=rank)
    groups = group_names(n for block in program.stack.blocks for n in block.nodes)
    return program.controller.rows().mask, rows, groups


@needs_gloo
@pytest.mark.slow
def test_data_parallel_replicas_are_not_coupled():
    ranks = spawn_ranks(_data_and_context_parallel, 4, 12, timeout_s=900, pg_timeout_s=120)
    (mask0, rows0, group0), (mask1, rows1, group1), (mask2, _, group2), _ = ranks
    assert group0 == group1 != group2  # each replica sums over its own Ulysses pair
    assert mask0 == mask1 and ranks[2][0] == ranks[3][0]
    assert mask0 != mask2  # the replicas decided on their own (thresholds 2.0 and 0.5)
    for (raw0, sums0, _), (raw1, _, _) in zip(rows0, rows1):
        total = raw0 + raw1  # the pair's rows only: nothing of ranks 2 and 3
        total[:, BAD].clamp_(max=1.0)
        assert torch.allclose(sums0, total, rtol=1e-6, atol=0)


def _no_ritual(rank: int, world: int, steps: int):
    """``enable_parallelism`` then ``torch.compile`` with no ``prepare_parallel`` call: the
    backend prepares the hooks at the first call (which runs without reuse), and later calls
    trace the model whole."""
    import warnings
    from diffusers import ContextParallelConfig
    from foresight_compile.models import families
    fam = families.get("wan", layers=LAYERS["wan"])
    reference = models.denoise(fam.model, fam, steps)
    fam.model.set_attention_backend("native")
    fam.model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    out = {}
    for policy in ("none", "budget"):
        torch._dynamo.reset()
        before = {id(p) for p in programs_of(fam.model)}
        fast = torch.compile(fam.model, backend="foresight",
                             options={"policy": policy, "num_steps": steps, "lowering": "eager"})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            models.denoise(fast, fam, 1)  # the first call ("none": prepared here)
        result = models.denoise(fast, fam, steps)
        (program,) = [p for p in programs_of(fam.model) if id(p) not in before]
        out[policy] = (result, program.controller.rows().mask, program.block_paths,
                       [str(w.message) for w in caught])
    return dict(reference=reference, **out)


@needs_gloo
@pytest.mark.slow
def test_parallel_model_compiled_without_prepare_parallel_reuses_after_its_first_call():
    ranks = spawn_ranks(_no_ritual, 2, 16, timeout_s=900, pg_timeout_s=120)
    for r in ranks:
        exact, _, blocks, caught = r["none"]
        assert blocks == [f"blocks.{i}" for i in range(LAYERS["wan"])]
        assert any("prepare_parallel" in w for w in caught)  # the first call says what it did
        assert _rel(exact, r["reference"]) <= 1e-5
        _, mask, _, _ = r["budget"]
        assert any(all(m) for m in mask), "nothing was reused"
    assert ranks[0]["budget"][1] == ranks[1]["budget"][1]  # one mask on both ranks
    assert torch.equal(ranks[0]["budget"][0], ranks[1]["budget"][0])
