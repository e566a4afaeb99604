"""The graph form (a cond per block, cache as explicit state) and its Inductor workaround."""
import pytest
import torch

import foresight_compile
from conftest import rel_err
from foresight_compile import models
from foresight_compile.lowering.inductor_fixes import exact_cond_operand_strides, needs_cond_stride_fix
from foresight_compile.passes.blocks import find_blocks
from foresight_compile.passes.cache_branch import insert_cache_branches
from foresight_compile.passes.partition import partition_blocks
from test_blocks import small_graph

OPTS = {"policy": "foresight", "warmup": 3, "recompute_every": 2, "threshold": 50.0, "strict": True}


def test_graph_form_has_one_cond_per_block_and_explicit_cache_state():
    gm, inputs = small_graph("cogvideox", layers=3)
    seg = partition_blocks(gm, find_blocks(gm))
    g = insert_cache_branches(seg)
    conds = g.graph.find_nodes(op="call_function", target=torch.ops.higher_order.cond)
    assert len(conds) == 3
    names = [p.name for p in g.graph.find_nodes(op="placeholder")]
    assert "reuse_mask" in names and sum(n.startswith("cache_") for n in names) == 5  # 2+2+1


@pytest.mark.parametrize("name", ["wan", "cogvideox"])
def test_graph_form_under_inductor_matches_segments_decisions_and_values(name):
    dit = models.FACTORIES[name](layers=2)
    seg = torch.compile(dit.model, backend="foresight", options={**OPTS, "lowering": "eager"})
    a = models.denoise(seg, dit, 10)
    sa = foresight_compile.stats(seg)
    torch._dynamo.reset()
    graph = torch.compile(dit.model, backend="foresight", options={**OPTS, "form": "graph"})
    b = models.denoise(graph, dit, 10)
    sb = foresight_compile.stats(graph)
    assert sa.mask[-10:] == sb.mask and sb.reused_fraction > 0
    assert rel_err(b, a) < 1e-4


@pytest.mark.slow  # a canary for the day torch fixes it: the benchmark job runs it
@pytest.mark.skipif(not needs_cond_stride_fix(), reason="stride workaround only for torch 2.13")
def test_wan_graph_form_fails_without_the_cond_stride_workaround():
    from torch._inductor.compile_fx import compile_fx

    gm, inputs = small_graph("wan", layers=2)
    g = insert_cache_branches(partition_blocks(gm, find_blocks(gm)))
    cache = [torch.zeros(1, 512, 24), torch.zeros(1, 512, 24)]
    args = [*inputs, torch.zeros(2, dtype=torch.bool), *cache]
    with torch.no_grad():
        with exact_cond_operand_strides(enabled=False):
            broken = compile_fx(g, args)
        with pytest.raises(AssertionError, match="stride"):
            broken(*args)
        with exact_cond_operand_strides():
            fixed = compile_fx(g, args)
        torch.testing.assert_close(fixed(*args)[0], gm(*inputs)[0], rtol=1e-5, atol=1e-5)
