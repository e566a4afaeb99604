"""Dynamic shapes: the block program compiles once with symbolic sizes and serves every size.

diffusers' own ``test_compile_on_different_shapes`` (``torch.compile(model, fullgraph=True,
dynamic=True)``, several input sizes under ``error_on_recompile``), with
``backend="foresight"``, on every family of ``families.py`` that has a block stack: the
blocks are cached (a block program is built), no size recompiles (Dynamo's frame nor our
segments), and the output equals eager's with reuse off. With reuse on, a new size starts
a new generation (caches never cross sizes) and the Inductor segments make exactly the
decisions and outputs of the eager lowering.
"""
import pytest
import torch

import foresight_compile
from conftest import rel_err
from foresight_compile.models.families import FAMILIES
from foresight_compile.program import programs_of
from sizes import SHAPES, sized_inputs
from toy import ToyBlock, ToyDiT

# Mochi graph-breaks inside every block (torch.nonzero in its attention processor) and
# falls back: see test_reliability.py (stats says why, explain names the op and the remedy).
FALLS_BACK = {"mochi": "torch.nonzero"}
# The model's own code specialises a size, so any backend recompiles at a new size (checked
# with backend="eager", Dynamo alone): nothing of ours to fix; each says where.
SPECIALIZES = {
    "cogvideox": "CogVideoX patch embedding: positional embeddings for the configured sample "
                 "size (the width becomes static)",
    "latte": "PatchEmbed: `if self.height != height or self.width != width` (embeddings.py)",
    "pixart": "PatchEmbed: `if self.height != height or self.width != width` (embeddings.py)",
    "cosmos3_denoiser": "the export wrapper keeps the token shapes as a module attribute "
                        "(`self.shapes`), a guarded constant",
}
# Run in the default suite; the others are @slow (each compiles a model, ~30-60 s here).
QUICK = ("qwenimage", "cosmos")


def _compile_on_different_shapes(name: str) -> list[int]:
    """The diffusers pattern; returns the distinct segment compiles after each size."""
    fam = FAMILIES[name]()
    fast = torch.compile(fam.model, backend="foresight", fullgraph=True, dynamic=True,
                         options={"policy": "none", "strict": True})
    compiles = []
    with torch.no_grad(), torch.fx.experimental._config.patch(use_duck_shape=False):
        for k in range(3):
            with torch._dynamo.config.patch(error_on_recompile=True):
                out = fam.prediction(fast(**sized_inputs(fam, k)))
            expected = fam.prediction(fam.model(**sized_inputs(fam, k)))
            assert out.shape == expected.shape
            assert rel_err(out, expected) <= 1e-5, (name, k)
            compiles.append(sum(p.compiler.compiles for p in programs_of(fam.model)))
    s = foresight_compile.stats(fast)
    assert s.accelerated and len(s.blocks) >= 2 and s.steps == 3
    return compiles


def _params(names):
    return [pytest.param(n, marks=() if n in QUICK else pytest.mark.slow) for n in names]


@pytest.mark.parametrize("name", _params(sorted(set(SHAPES) - set(FALLS_BACK) - set(SPECIALIZES))))
def test_compile_on_different_shapes_compiles_once(name):
    compiles = _compile_on_different_shapes(name)
    assert compiles[0] > 0 and compiles == [compiles[0]] * 3, compiles


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SPECIALIZES))
def test_models_that_specialise_a_size_recompile_without_us_too(name):
    fam = FAMILIES[name]()
    plain = torch.compile(fam.model, backend="eager", fullgraph=True, dynamic=True)
    with torch.no_grad(), torch.fx.experimental._config.patch(use_duck_shape=False):
        plain(**sized_inputs(fam, 0))
        with pytest.raises(torch._dynamo.exc.RecompileError):
            with torch._dynamo.config.patch(error_on_recompile=True):
                for k in (1, 2):
                    plain(**sized_inputs(fam, k))


def _loop(fast, sizes, steps=8):
    outs = []
    with torch.no_grad():
        for shape in sizes:
            x = torch.randn(shape, generator=torch.Generator().manual_seed(len(outs)))
            for t in torch.linspace(1000.0, 1.0, steps):
                x = x - 0.05 * fast(hidden_states=x, timestep=t.expand(shape[0]))[0]
            outs.append(x)
    return outs


@pytest.mark.parametrize("policy", ["budget", "static"])
def test_reuse_under_dynamic_shapes_matches_the_eager_lowering_at_every_size(policy):
    """Update, serve and probe graphs compiled symbolically: one compile per distinct
    segment for every size, the same decisions and values as the eager lowering, and a
    new size starts a new generation."""
    sizes = [(1, 4, 8), (1, 6, 8), (1, 9, 8), (1, 4, 8)]
    opts = {"policy": policy, "strict": True}
    if policy == "static":
        opts.update(warmup=2, recompute_every=3, order=1)
    else:
        opts.update(tolerance=10.0)
    torch.manual_seed(0)
    model = ToyDiT(layers=3).eval()
    results = {}
    for lowering in ("inductor", "eager"):
        torch._dynamo.reset()
        fast = torch.compile(model, backend="foresight", dynamic=True,
                             options={**opts, "lowering": lowering})
        with torch._dynamo.config.patch(error_on_recompile=True):
            outs = _loop(fast, sizes[:1])
            after_first = [p.compiler.compiles for p in programs_of(model)]
            outs += _loop(fast, sizes[1:])
        s = foresight_compile.stats(fast)
        if lowering == "inductor":
            assert [p.compiler.compiles for p in programs_of(model)] == after_first
        results[lowering] = outs, s.mask, s.step, s.generation
    (outs, mask, step, gens), (ref, ref_mask, ref_step, ref_gens) = results["inductor"], results["eager"]
    assert mask == ref_mask and step == ref_step and gens == ref_gens
    assert any(map(any, mask))  # some blocks were served
    assert step == list(range(8)) * len(sizes) and len(set(gens)) == len(sizes)
    for a, b in zip(outs, ref):
        assert rel_err(a, b) <= 1e-5


class _TextDiT(torch.nn.Module):
    """Krea2's pattern: the text tokens (masked) joined to the image tokens before the
    blocks, so the blocks see ``text + image`` tokens; the mask and the text share a size
    the shape environment unifies (one symbol replaced by the other)."""

    def __init__(self, dim: int = 8, layers: int = 2) -> None:
        super().__init__()
        self.t_embed = torch.nn.Linear(1, dim)
        self.blocks = torch.nn.ModuleList(ToyBlock(dim) for _ in range(layers))
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, hidden_states, encoder_hidden_states, timestep, encoder_attention_mask):
        temb = self.t_embed(timestep[:, None].float() / 1000)[:, None, :]
        text = encoder_hidden_states * encoder_attention_mask[..., None]
        x = torch.cat([text, hidden_states], dim=1)
        for block in self.blocks:
            x = block(x, temb)
        return (self.out(x[:, encoder_hidden_states.shape[1]:]),)


def test_a_size_symbol_replaced_by_another_is_bound_in_every_segment():
    """Issue 22 (Krea2, ``dynamic=True``): a block's input of size ``s1 + s50`` whose
    ``s1`` reached the segment only as a placeholder of a replaced symbol (``s39 -> s1``)
    failed Inductor's codegen ("expected [s1] to have been codegen-ed"). The segment now
    gets the replacing symbol: compiled once, every size served, eager's output."""
    torch.manual_seed(0)
    model = _TextDiT().eval()
    fast = torch.compile(model, backend="foresight", dynamic=True, fullgraph=True,
                         options={"policy": "none", "strict": True})
    with torch.no_grad(), torch.fx.experimental._config.patch(use_duck_shape=False):
        for n in (4, 6, 9):
            kwargs = dict(hidden_states=torch.randn(1, n, 8),
                          encoder_hidden_states=torch.randn(1, 3, 8),
                          timestep=torch.tensor([500.0]), encoder_attention_mask=torch.ones(1, 3))
            with torch._dynamo.config.patch(error_on_recompile=True):
                out = fast(**kwargs)[0]
            assert rel_err(out, model(**kwargs)[0]) <= 1e-5
    s = foresight_compile.stats(fast)
    assert s.accelerated and len(s.blocks) == 2 and s.steps == 3


KREA2_CONFIG = {  # diffusers' tests/models/transformers/test_models_transformer_krea2.py
    "in_channels": 16, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 32, "timestep_embed_dim": 8,
    "text_hidden_dim": 16, "num_text_layers": 3, "text_num_attention_heads": 2,
    "text_num_key_value_heads": 1, "text_intermediate_size": 16,
    "num_layerwise_text_blocks": 1, "num_refiner_text_blocks": 1, "axes_dims_rope": (4, 2, 2),
    "rope_theta": 1000.0, "norm_eps": 1e-5}


def _krea2_inputs(height: int, width: int, text: int = 4) -> dict:
    """diffusers' ``get_dummy_inputs`` of the Krea2 test (the last text token padded)."""
    g = torch.Generator().manual_seed(0)
    positions = torch.zeros(text + height * width, 3)
    positions[text:, 1] = torch.arange(height).repeat_interleave(width)
    positions[text:, 2] = torch.arange(width).repeat(height)
    mask = torch.ones(1, text, dtype=torch.bool)
    mask[:, -1] = False
    return {"hidden_states": torch.randn(1, height * width, 16, generator=g),
            "encoder_hidden_states": torch.randn(1, text, 3, 16, generator=g),
            "timestep": torch.tensor([0.5]), "position_ids": positions,
            "encoder_attention_mask": mask}


@pytest.mark.slow
def test_krea2_compiles_on_different_shapes_with_its_blocks_cached():
    """diffusers' ``test_compile_on_different_shapes`` for Krea2 (its config, its sizes
    (4, 4), (4, 8), (8, 8)), strict: the blocks are cached, no recompile, eager's output."""
    diffusers = pytest.importorskip("diffusers")
    if not hasattr(diffusers, "Krea2Transformer2DModel"):
        pytest.skip("this diffusers has no Krea2")
    torch.manual_seed(0)
    model = diffusers.Krea2Transformer2DModel(**KREA2_CONFIG).eval()
    fast = torch.compile(model, backend="foresight", fullgraph=True, dynamic=True,
                         options={"strict": True})
    with torch.no_grad(), torch.fx.experimental._config.patch(use_duck_shape=False):
        for height, width in [(4, 4), (4, 8), (8, 8)]:
            with torch._dynamo.config.patch(error_on_recompile=True):
                out = fast(**_krea2_inputs(height, width))[0]
            assert rel_err(out, model(**_krea2_inputs(height, width))[0]) <= 1e-5
    s = foresight_compile.stats(fast)
    assert s.accelerated and len(s.blocks) == 2 and s.steps == 3


@pytest.mark.slow  # two Inductor compiles of the trained HunyuanVideo
@pytest.mark.parametrize("dynamic", [None, False], ids=["automatic-dynamic", "static"])
def test_a_strided_block_input_served_from_a_contiguous_cache_is_read_as_laid_out(dynamic):
    """HunyuanVideo's single-stream blocks read the video tokens as a view into the
    [video; text] sequence (strided); when the block before was served, the same input is
    a contiguous cache buffer. Symbolic code is compiled once for both: compiled for the
    view's strides it read the buffer out of bounds (wrong values, then heap corruption),
    where plain Inductor worked. The automatic-dynamic recompile of a changed timestep
    batch reaches it the way a benchmark or a pipeline switching prompt counts does; static
    code bound at the first (computed) call read the served buffer the same way (NaN)."""
    from foresight_compile import models
    dit = models.tiny_hunyuan_workload(prompts=2)
    x = torch.randn(dit.latent_shape, generator=torch.Generator().manual_seed(0))
    options = {"policy": "static", "warmup": 1, "recompute_every": 3}

    def run(lowering):
        torch._dynamo.reset()
        fast = torch.compile(dit.model, backend="foresight", dynamic=dynamic,
                             options={**options, "lowering": lowering, "strict": True})
        with torch.no_grad():
            fast(**dit.inputs(x, torch.tensor([999.0])))  # batch-1 timestep: static code
            foresight_compile.reset(fast)
            outs = [dit.prediction(fast(**dit.inputs(x, torch.tensor([t]).expand(2))))
                    for t in (990.0, 980.0, 970.0, 960.0)]
        return outs, foresight_compile.stats(fast)

    expected, eager_stats = run("eager")
    got, stats = run("inductor")
    assert [any(r) for r in stats.mask[-4:]] == [any(r) for r in eager_stats.mask[-4:]]
    assert any(any(r) for r in stats.mask[-4:])  # blocks were served
    for e, g in zip(expected, got):
        assert rel_err(g, e) < 1e-4
    torch._dynamo.reset()
