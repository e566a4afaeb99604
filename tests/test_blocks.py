"""Block discovery and partitioning on real diffusers DiTs (small configs, random weights)."""
import pytest
import torch
import torch.fx as fx

from foresight_compile import models
from foresight_compile.errors import BlockDiscoveryError
from foresight_compile.passes.blocks import find_blocks, module_path, why_not_cacheable
from foresight_compile.passes.inputs import find_timestep_input, input_stems
from foresight_compile.passes.partition import partition_blocks
from toy import ToyDiT


def dynamo_graph(model, **inputs) -> tuple[fx.GraphModule, list]:
    captured = {}

    def backend(gm, example_inputs, **_):
        captured.setdefault("gm", gm)
        captured.setdefault("inputs", list(example_inputs))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend)(**inputs)
    return captured["gm"], captured["inputs"]


def small_graph(name: str, layers: int = 3):
    dit = models.FACTORIES[name](layers=layers)
    return dynamo_graph(dit.model, **dit.inputs(torch.randn(dit.latent_shape), torch.tensor([500])))


def test_module_path_normalises_dynamo_and_export_spellings():
    assert module_path("L['self'].__dict__['_modules']['blocks'].3") == "blocks.3"
    assert module_path("L['self'].blocks[3].attn1") == "blocks.3.attn1"
    assert module_path("blocks.3.ffn.net.0") == "blocks.3.ffn.net.0"


def test_module_path_sees_through_a_hooked_forward():
    # diffusers' ModelHook (context parallelism, its caches) replaces a module's forward
    raw = "L['function_reference'].forward.__self__.__dict__['_modules']['blocks'].3"
    assert module_path(raw) == "blocks.3"
    assert module_path(raw + ".attn1.to_out.0") == "blocks.3.attn1.to_out.0"


def test_blocks_are_found_under_a_hooked_root_with_their_parameters():
    from diffusers.hooks import HookRegistry, ModelHook

    dit = models.FACTORIES["wan"](layers=3)
    plain = find_blocks(small_graph("wan")[0])
    HookRegistry.check_if_exists_or_initialize(dit.model).register_hook(ModelHook(), "noop")
    torch._dynamo.reset()
    gm, inputs = dynamo_graph(dit.model, **dit.inputs(torch.randn(dit.latent_shape),
                                                     torch.tensor([500])))
    assert any("function_reference" in p.name for p in gm.graph.find_nodes(op="placeholder"))
    stack = find_blocks(gm)
    assert [b.path for b in stack.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    for hooked, block in zip(stack.blocks, plain.blocks):  # parameters are not carried values
        assert (len(hooked.params), len(hooked.carried), len(hooked.side)) == (
            len(block.params), len(block.carried), len(block.side))
    assert input_stems(gm)[find_timestep_input(gm, inputs)] == "timestep"


def test_wan_blocks_carry_one_tensor_and_share_side_inputs():
    gm, _ = small_graph("wan")
    stack = find_blocks(gm)
    assert [b.path for b in stack.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    for prev, block in zip(stack.blocks, stack.blocks[1:]):
        assert block.carried == prev.outputs  # the hidden state flows block to block
    side = {n.name for n in stack.blocks[1].side}
    assert any("timestep_proj" in s for s in side) and {"freqs_cos", "freqs_sin"} <= side
    assert all(len(b.outputs) == 1 for b in stack.blocks)
    assert all(p.op == "placeholder" and "blocks_modules_1" in p.name for p in stack.blocks[1].params)


def test_cogvideox_blocks_carry_video_and_text_states():
    gm, _ = small_graph("cogvideox")
    stack = find_blocks(gm)
    assert [len(b.carried) for b in stack.blocks] == [2, 2, 2]
    assert stack.blocks[1].carried == stack.blocks[0].outputs
    assert [len(b.outputs) for b in stack.blocks] == [2, 2, 1]  # last text output is dead


def test_latte_has_two_interleaved_stacks_each_block_separate():
    gm, _ = small_graph("latte", layers=2)
    stack = find_blocks(gm)
    assert [b.path for b in stack.blocks] == [
        "transformer_blocks.0", "temporal_transformer_blocks.0",
        "transformer_blocks.1", "temporal_transformer_blocks.1"]
    assert set(stack.stacks) == {"transformer_blocks", "temporal_transformer_blocks"}
    # reshape glue sits between spatial and temporal blocks: inputs are not the outputs
    assert stack.blocks[1].carried != stack.blocks[0].outputs


def test_unseen_diffusers_dit_flux_dual_and_single_stacks():
    import diffusers
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4)).eval()
    gm, _ = dynamo_graph(model, hidden_states=torch.randn(1, 16, 4),
                         encoder_hidden_states=torch.randn(1, 4, 16),
                         pooled_projections=torch.randn(1, 8), timestep=torch.tensor([0.5]),
                         img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3), return_dict=False)
    stack = find_blocks(gm)
    assert {k: len(v) for k, v in stack.stacks.items()} == {
        "transformer_blocks": 2, "single_transformer_blocks": 2}


def test_export_graph_paths_are_found():
    model = ToyDiT(layers=3)
    ep = torch.export.export(model, (torch.randn(1, 4, 8), torch.tensor([10.0])))
    stack = find_blocks(ep.module())
    assert [b.path for b in stack.blocks] == ["blocks.0", "blocks.1", "blocks.2"]


def test_mlp_is_not_cacheable_and_says_why():
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    gm, _ = dynamo_graph(mlp, input=torch.randn(2, 4))
    reason = why_not_cacheable(gm)
    assert reason is not None and "no stack of repeated blocks" in reason
    with pytest.raises(BlockDiscoveryError):
        find_blocks(gm)


def test_a_block_called_twice_is_rejected():
    class Shared(ToyDiT):
        def forward(self, hidden_states, timestep):
            temb = self.t_embed(timestep[:, None].float())[:, None, :]
            x = self.blocks[0](hidden_states, temb)
            x = self.blocks[1](x, temb)
            return (self.blocks[0](x, temb),)

    gm, _ = dynamo_graph(Shared(layers=2), hidden_states=torch.randn(1, 4, 8),
                         timestep=torch.tensor([1.0]))
    reason = why_not_cacheable(gm)
    assert reason is not None and "interleaved" in reason


@pytest.mark.parametrize("name", ["wan", "cogvideox", "latte"])
def test_partitioned_graph_computes_the_same_outputs(name):
    gm, inputs = small_graph(name, layers=2)
    before = gm.code
    stack = find_blocks(gm)
    seg = partition_blocks(gm, stack)
    assert len(seg.block_submods) == len(stack.blocks)
    with torch.no_grad():
        torch.testing.assert_close(seg.gm(*inputs)[0], gm(*inputs)[0], rtol=0, atol=0)
    gm.recompile()
    assert gm.code == before  # Dynamo's graph is left as it was handed over


@pytest.mark.parametrize("name", ["wan", "cogvideox", "latte"])
def test_served_caches_are_not_copied_when_nothing_mutates_or_returns_them(name):
    gm, _ = small_graph(name, layers=2)
    seg = partition_blocks(gm, find_blocks(gm))
    assert all(flag is False for flags in seg.needs_clone for flag in flags)


def test_a_block_output_returned_to_the_caller_is_served_as_a_copy():
    class Returns(ToyDiT):
        def forward(self, hidden_states, timestep):
            temb = self.t_embed(timestep[:, None].float())[:, None, :]
            x = hidden_states
            for block in self.blocks:
                x = block(x, temb)
            return (self.out(x), x)

    gm, _ = dynamo_graph(Returns(layers=3), hidden_states=torch.randn(1, 4, 8),
                         timestep=torch.tensor([1.0]))
    seg = partition_blocks(gm, find_blocks(gm))
    assert seg.needs_clone == ((False,), (False,), (True,))
