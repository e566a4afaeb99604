"""Hostile input: each case gives correct output or an error naming the problem and the fix
(the table of docs/RELIABILITY.md); every model is accelerated or told why."""
import warnings

import pytest
import torch

import foresight_compile
from foresight_compile.models.families import FAMILIES
from foresight_compile import ForesightFallbackWarning, ForesightValueError, Options
from toy import ToyDiT

STATIC = {"policy": "static", "warmup": 1, "recompute_every": 3, "lowering": "eager",
          "strict": True}


def _run(fast, xs, ts):
    with torch.no_grad():
        return [fast(hidden_states=x, timestep=t)[0] for x, t in zip(xs, ts)]


def test_stats_and_reset_never_raise_on_a_compiled_model_before_its_first_call():
    fast = torch.compile(ToyDiT(layers=2).eval(), backend="foresight", options=STATIC)
    s = foresight_compile.stats(fast)
    assert not s.accelerated and "first call" in s.reason and s.steps == 0
    foresight_compile.reset(fast)  # nothing to reset yet: no error
    with pytest.raises(foresight_compile.NotCompiledError, match="never compiled"):
        foresight_compile.stats(ToyDiT(layers=2))


def test_mochi_reports_not_accelerated_with_the_reason_and_explain_names_the_op():
    fam = FAMILIES["mochi"]()
    e = foresight_compile.explain(fam.model, **fam.example)
    assert not e.accelerated and e.breaks
    assert any(b.operator == "aten.nonzero.default" and "torch.nonzero" in b.where
               and "capture_dynamic_output_shape_ops" in (b.remedy or "") for b in e.breaks)
    assert "nonzero" in str(e)
    fast = torch.compile(fam.model, backend="foresight", options={"lowering": "eager"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ForesightFallbackWarning)
        with torch.no_grad():
            fast(**fam.example)
    s = foresight_compile.stats(fast)
    assert not s.accelerated and "graph break" in s.reason and "nonzero" in s.reason
    assert "not accelerated" in str(s)
    foresight_compile.reset(fast)


def test_mochi_is_accelerated_with_the_remedy_explain_offers():
    fam = FAMILIES["mochi"]()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        assert foresight_compile.explain(fam.model, **fam.example).cached_blocks == [
            "transformer_blocks.0", "transformer_blocks.1"]
        torch._dynamo.reset()
        fast = torch.compile(fam.model, backend="foresight",
                             options={"lowering": "eager", "strict": True})
        with torch.no_grad():
            out = fam.prediction(fast(**fam.example))
    expected = fam.prediction(fam.model(**fam.example))
    assert (out - expected).abs().max().item() <= 1e-5
    assert foresight_compile.stats(fast).accelerated


@pytest.mark.parametrize("options, key", [
    ({"threshold": "0.5"}, "threshold"), ({"warmup": "8"}, "warmup"),
    ({"strict": 1}, "strict"), ({"num_steps": 2.5}, "num_steps"),
    ({"policy": 3}, "policy"), ({"lookahead": True}, "lookahead"),
    ({"profile": 3}, "profile"), ({"max_run": 0}, "max_run"), ({"tolerance": float("nan")}, "tolerance"),
])
def test_options_of_the_wrong_type_name_the_key(options, key):
    with pytest.raises(ForesightValueError, match=key):
        Options.from_dict(options)
    with pytest.raises(ValueError, match="options must be a dict"):
        Options.from_dict("policy=static")


def test_non_finite_latents_give_the_uncompiled_output_and_never_poison_later_steps():
    torch.manual_seed(0)
    model = ToyDiT(layers=3).eval()
    x = torch.randn(1, 4, 8)
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    xs = [x, bad, x + 1, x + 2, x + 3, x + 4, x + 5]  # step 1 computes every block
    ts = [torch.tensor([t]) for t in (1000.0, 900.0, 800.0, 700.0, 600.0, 500.0, 400.0)]
    for order in (0, 1, 2):
        torch._dynamo.reset()
        fast = torch.compile(model, backend="foresight", options={**STATIC, "order": order})
        outs = _run(fast, xs, ts)
        plain = _run(model, xs, ts)
        assert torch.equal(outs[1].isnan(), plain[1].isnan()) and outs[1].isnan().any()
        mask = foresight_compile.stats(fast).mask
        assert mask[2] == [False] * 3  # static says serve; the cache holds nan
        torch.testing.assert_close(outs[2], plain[2])
        assert all(torch.isfinite(o).all() for i, o in enumerate(outs) if i != 1)


def test_timesteps_of_another_dtype_or_shape_run_correctly():
    torch.manual_seed(0)
    model = ToyDiT(layers=2).eval()
    fast = torch.compile(model, backend="foresight", options=STATIC)
    x = torch.randn(2, 4, 8)
    for t in (torch.tensor([900, 900]), torch.tensor(800.0, dtype=torch.float64).expand(2),
              torch.tensor([[700.0], [700.0]]).reshape(2), torch.tensor([600.0, 600.0])):
        with torch.no_grad():
            out = fast(hidden_states=x, timestep=t)[0]
            torch.testing.assert_close(out, model(hidden_states=x, timestep=t)[0])


def test_an_empty_timestep_names_the_problem():
    fast = torch.compile(ToyDiT(layers=2).eval(), backend="foresight", options=STATIC)
    with pytest.raises(ValueError, match="timestep input is empty"):
        with torch.no_grad():
            fast(hidden_states=torch.randn(0, 4, 8), timestep=torch.zeros(0))


class _MutatingBlock(torch.nn.Module):
    """Adds its update into its input in place (``x += h``) and returns it."""

    def __init__(self, dim):
        super().__init__()
        self.a = torch.nn.Linear(dim, dim)
        self.b = torch.nn.Linear(dim, dim)
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, x, temb):
        h = torch.tanh(self.a(self.norm(x)) * (1 + temb))
        x += 0.5 * torch.sigmoid(self.b(h))
        return x


class _AliasingBlock(_MutatingBlock):
    """Returns a view of its input (nothing computed for the carried tensor)."""

    def forward(self, x, temb):
        h = torch.tanh(self.a(self.norm(x)) * (1 + temb))
        return (x.view(x.shape) + 0 * h.sum()).view(x.shape)


@pytest.mark.parametrize("block", [_MutatingBlock, _AliasingBlock])
@pytest.mark.parametrize("policy", ["none", "static"])
def test_blocks_that_mutate_or_alias_their_inputs_give_the_eager_output(block, policy):
    torch.manual_seed(0)
    model = ToyDiT(layers=3).eval()
    model.blocks = torch.nn.ModuleList(block(8) for _ in range(3))
    xs = [torch.randn(1, 4, 8) for _ in range(5)]
    ts = [torch.tensor([t]) for t in (1000.0, 900.0, 800.0, 700.0, 600.0)]
    fast = torch.compile(model, backend="foresight", options={**STATIC, "policy": policy})
    outs = _run(fast, [x.clone() for x in xs], ts)
    mask = foresight_compile.stats(fast).mask
    # A computed step equals eager on the same input (the served ones are the cache's).
    plain = _run(model, [x.clone() for x in xs], ts)
    for i, m in enumerate(mask):
        if not any(m):
            torch.testing.assert_close(outs[i], plain[i], rtol=1e-6, atol=1e-6)
