"""policy="none" reproduces plain torch.compile and eager output for every supported family."""
import pytest
import torch

from conftest import rel_err
from foresight_compile import models

STEPS = 10


@pytest.mark.parametrize("name", ["wan", "cogvideox", "latte"])
def test_policy_none_matches_inductor_and_eager_over_a_loop(name):
    dit = models.FACTORIES[name](layers=2)
    eager = models.denoise(dit.model, dit, STEPS)
    inductor = models.denoise(torch.compile(dit.model, backend="inductor"), dit, STEPS)
    torch._dynamo.reset()
    ours = torch.compile(dit.model, backend="foresight", options={"policy": "none", "strict": True})
    out = models.denoise(ours, dit, STEPS)
    assert rel_err(out, inductor) <= 1e-5
    assert rel_err(out, eager) <= 1e-5
    import foresight_compile
    s = foresight_compile.stats(ours)
    assert s.steps == STEPS and s.reused_fraction == 0.0 and s.cache_bytes == 0
    assert s.block_computes == [STEPS] * len(s.blocks)


@pytest.mark.parametrize("name", ["wan", "cogvideox", "latte"])
def test_policy_none_eager_lowering_is_bitwise_eager(name):
    dit = models.FACTORIES[name](layers=2)
    eager = models.denoise(dit.model, dit, 4)
    ours = torch.compile(dit.model, backend="foresight",
                         options={"policy": "none", "lowering": "eager", "strict": True})
    assert torch.equal(models.denoise(ours, dit, 4), eager)
