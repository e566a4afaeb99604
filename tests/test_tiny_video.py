"""The shipped tiny video DiT: its data generator, its loader, and that it follows prompts."""
import json

import pytest
import torch

from foresight_compile import models
from foresight_compile.models import tiny_video as tv

# The first prompts of the acceptance set (examples/sample_tiny_dit.py --evaluate 32 runs
# all 32); the thresholds are the acceptance ones.
CHECK_PROMPTS = 10
CHECK_STEPS = 30
# Static reuse (20 steps, warm-up 6, every 2nd step computed) on the shipped weights, frames
# vs uncached: measured 25.6 dB (SSIM 0.93) on this machine; the bound leaves 5 dB of margin.
STATIC_MIN_PSNR = 20.0


@pytest.fixture(scope="module")
def clips():
    return tv.make_clips(64, torch.Generator().manual_seed(7), two_object_prob=0.5)


def test_generated_clips_pass_their_own_check(clips):
    report = tv.evaluate_samples(clips.frames, clips.prompts)
    assert any(len(p.objects) == 2 for p in clips.prompts)
    assert report.colour_accuracy == 1.0
    assert report.direction_accuracy == 1.0
    assert report.speed_accuracy == 1.0


def test_drawn_object_is_where_its_label_says(clips):
    rgb = (clips.frames + 1) / 2
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    checked = 0
    for b, prompt in enumerate(clips.prompts):
        if len(prompt.objects) != 1:
            continue  # the second object may cover part of the first
        colour = torch.tensor(tv.COLOURS[prompt.objects[0].colour])[:, None, None, None]
        # Pixels at least half covered by the object are nearer its colour than the grey.
        mask = ((rgb[b] - colour).norm(dim=0) < 0.25).float()  # F,H,W
        area = mask.sum((1, 2))
        assert (area > 20).all(), prompt.text
        centroid = torch.stack([(mask * xs).sum((1, 2)) / area, (mask * ys).sum((1, 2)) / area], -1)
        if prompt.objects[0].shape != "triangle":  # a pixel-grid triangle's centroid drifts
            assert (centroid - clips.centres[b, 0]).abs().max() < 0.6, prompt.text
        checked += 1
    assert checked >= 16


def test_objects_move_as_labelled_and_stay_inside(clips):
    for b, prompt in enumerate(clips.prompts):
        for k, obj in enumerate(prompt.objects):
            path = clips.centres[b, k]
            step = torch.tensor(tv.DIRECTIONS[obj.direction]) * tv.SPEEDS[obj.speed]
            assert torch.allclose(path[1:] - path[:-1], step.expand(7, 2), atol=1e-5)
            low = tv.ClipSpec().radius[0]
            assert (path >= low).all() and (path <= 31 - low).all()
        assert torch.isnan(clips.centres[b, len(prompt.objects):]).all()


def test_backgrounds_are_grey_so_chroma_finds_only_objects():
    clips = tv.make_clips(32, torch.Generator().manual_seed(3), two_object_prob=0.0)
    rgb = (clips.frames + 1) / 2
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    centre = clips.centres[:, 0]  # B,F,2
    reach = tv.ClipSpec().radius[1] * tv.ClipSpec().triangle_scale + 1  # beyond any object
    background = ((xs - centre[..., 0, None, None]) ** 2
                  + (ys - centre[..., 1, None, None]) ** 2) > reach ** 2  # B,F,H,W
    chroma = rgb.max(1).values - rgb.min(1).values
    assert chroma[background].max() < 1e-6
    assert (chroma[~background] > tv.CHROMA_THRESHOLD).sum() > 32 * 8 * 20  # objects are coloured


def test_evaluation_fails_clips_with_wrong_labels(clips):
    flip = {"right": "left", "left": "right", "up": "down", "down": "up"}
    names = list(tv.COLOURS)
    wrong_direction = [tv.Prompt(tuple(tv.ObjectSpec(o.shape, o.colour, flip[o.direction], o.speed)
                                       for o in p.objects)) for p in clips.prompts]
    wrong_colour = [tv.Prompt(tuple(tv.ObjectSpec(o.shape, next(c for c in names if c not in
                                                               {x.colour for x in p.objects}),
                                                  o.direction, o.speed) for o in p.objects[:1]))
                    for p in clips.prompts]
    assert tv.evaluate_samples(clips.frames, wrong_direction).direction_accuracy == 0.0
    assert tv.evaluate_samples(clips.frames, wrong_colour).colour_accuracy == 0.0


def test_make_clips_is_seeded():
    a = tv.make_clips(4, torch.Generator().manual_seed(1))
    b = tv.make_clips(4, torch.Generator().manual_seed(1))
    c = tv.make_clips(4, torch.Generator().manual_seed(2))
    assert torch.equal(a.frames, b.frames) and a.prompts == b.prompts
    assert not torch.equal(a.frames, c.frames)


def test_prompt_text_round_trips_and_tokens_mark_the_absent_object():
    text = "red circle moving up slow and blue square moving left fast"
    prompt = tv.Prompt.parse(text)
    assert prompt.text == text and tv.Prompt.parse(prompt.text) == prompt
    single = tv.Prompt.parse("green triangle moving down fast").tokens()
    assert single[4:] == [tv.VOCAB.index(tv.NONE)] * 4
    assert len(set(tv.Prompt.parse(text).tokens())) == 8


def test_unknown_prompt_word_names_the_field_and_accepted_words():
    with pytest.raises(ValueError, match=r"unknown colour 'purple'.*red, green"):
        tv.Prompt.parse("purple circle moving up slow")
    with pytest.raises(ValueError, match="COLOUR SHAPE moving DIRECTION SPEED"):
        tv.Prompt.parse("a red circle")
    with pytest.raises(ValueError, match="different colours"):
        tv.Prompt.parse("red circle moving up slow and red square moving left fast")


def test_save_and_load_round_trip(tmp_path):
    model = tv.build_tiny_video_dit(seed=1)
    tv.save_tiny_video_dit(model, tmp_path, training={"steps": 0})
    loaded = tv.load_tiny_video_dit(tmp_path)
    for a, b in ((model.transformer, loaded.transformer), (model.prompt_encoder, loaded.prompt_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert loaded.scheduler_config == model.scheduler_config
    assert json.loads((tmp_path / tv.META_FILE).read_text())["training"] == {"steps": 0}


def test_loader_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tiny_video.json is missing"):
        tv.load_tiny_video_dit(tmp_path)


def test_loader_rejects_another_vocabulary(tmp_path):
    tv.save_tiny_video_dit(tv.build_tiny_video_dit(), tmp_path)
    meta = json.loads((tmp_path / tv.META_FILE).read_text())
    meta["vocab"] = meta["vocab"][::-1]
    (tmp_path / tv.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="different versions"):
        tv.load_tiny_video_dit(tmp_path)


def test_shipped_weights_load_in_diffusers_layout_under_25_mb():
    files = [p for p in tv.ASSET_DIR.rglob("*") if p.is_file()]
    names = {p.relative_to(tv.ASSET_DIR).as_posix() for p in files}
    assert {"tiny_video.json", "transformer/config.json", "prompt_encoder/config.json",
            "transformer/diffusion_pytorch_model.safetensors",
            "prompt_encoder/diffusion_pytorch_model.safetensors"} <= names
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    transformer, encoder, scheduler_config = models.tiny_video_dit()
    expected = tv.transformer_config()
    assert {k: transformer.config[k] for k in expected} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in expected.items()}
    assert scheduler_config == tv.SCHEDULER_CONFIG
    assert not transformer.training
    meta = json.loads((tv.ASSET_DIR / tv.META_FILE).read_text())
    assert meta["training"]["steps"] > 0  # the shipped weights are trained ones


@pytest.fixture(scope="module")
def shipped_samples():
    transformer, encoder, scheduler_config = tv.load_tiny_video_dit()
    prompts = tv.evaluation_prompts(CHECK_PROMPTS)
    return prompts, tv.sample(transformer, encoder, scheduler_config, prompts, steps=CHECK_STEPS)


def test_shipped_model_draws_the_prompted_colour_moving_the_prompted_way(shipped_samples):
    prompts, frames = shipped_samples
    report = tv.evaluate_samples(frames, prompts)
    assert report.colour_accuracy >= 0.9, report
    assert report.direction_accuracy >= 0.8, report


def test_random_weights_fail_the_same_check(shipped_samples):
    prompts, _ = shipped_samples
    model = tv.build_tiny_video_dit(seed=0)
    frames = tv.sample(model.transformer, model.prompt_encoder, model.scheduler_config, prompts[:4],
                       steps=4)
    report = tv.evaluate_samples(frames, prompts[:4])
    assert report.colour_accuracy < 0.5 and report.direction_accuracy < 0.5, report


def test_coordinate_planes_mark_frame_column_and_row():
    planes = tv.coordinate_planes(torch.zeros(2, 3, 8, 32, 32))
    assert planes.shape == (2, 3, 8, 32, 32)
    frame, column, row = planes[0]
    assert frame[0].eq(-1).all() and frame[-1].eq(1).all()
    assert column[:, :, 0].eq(-1).all() and column[:, :, -1].eq(1).all()
    assert row[:, 0].eq(-1).all() and row[:, -1].eq(1).all()
    assert (column[:, :, 1:] > column[:, :, :-1]).all() and (row[:, 1:] > row[:, :-1]).all()


def test_transformer_returns_the_velocity_the_scheduler_expects():
    """TinyVideoTransformer turns the Wan stack's clean-clip estimate into a velocity: with a
    stack that always answers the true clip, diffusers' Euler loop must land on that clip."""
    from unittest import mock

    from diffusers import WanTransformer3DModel
    target = tv.make_clips(2, torch.Generator().manual_seed(0)).frames
    seen = []

    def stack(self, hidden_states, *args, **kwargs):
        seen.append(hidden_states.shape[1])
        return (target.clone(),)

    model = tv.build_tiny_video_dit()
    with mock.patch.object(WanTransformer3DModel, "forward", stack):
        out = tv.sample(model.transformer, model.prompt_encoder, model.scheduler_config,
                        ["red circle moving up slow"] * 2, steps=5)
    assert seen == [6] * 5  # the clip plus its three coordinate planes
    torch.testing.assert_close(out, target, atol=1e-5, rtol=1e-5)


def test_transformer_answers_in_the_input_dtype():
    model = tv.build_tiny_video_dit()
    transformer, encoder = model.transformer.to(torch.bfloat16), model.prompt_encoder.to(torch.bfloat16)
    x = torch.randn(1, 3, 8, 32, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        v = transformer(hidden_states=x, timestep=torch.tensor([500.0]),
                        encoder_hidden_states=encoder.encode(["red circle moving up slow"]),
                        return_dict=False)[0]
    assert v.dtype == torch.bfloat16 and v.shape == x.shape


def test_sample_noise_does_not_depend_on_the_batch():
    assert torch.equal(tv.initial_noise([5, 6])[1], tv.initial_noise([6])[0])
    with pytest.raises(ValueError, match="one per prompt"):
        tv.sample(None, None, tv.SCHEDULER_CONFIG, ["red circle moving up slow"], seeds=[1, 2])


def test_reuse_on_the_trained_model_keeps_what_it_draws():
    """On trained weights: policy none reproduces plain Inductor; static reuse serves caches
    for a share of the steps, changes the output (so it really reused) but keeps it close
    to the uncached frames and keeps the objects' colours."""
    import foresight_compile
    from conftest import rel_err
    from foresight_compile.bench.metrics import psnr

    dit = models.tiny_video_workload(prompts=4)
    steps = 20
    reference = models.denoise(torch.compile(dit.model, backend="inductor"), dit, steps)
    torch._dynamo.reset()
    none = torch.compile(dit.model, backend="foresight", options={"policy": "none", "strict": True})
    assert rel_err(models.denoise(none, dit, steps), reference) <= 1e-5
    torch._dynamo.reset()
    static = torch.compile(dit.model, backend="foresight", options={
        "policy": "static", "warmup": 6, "recompute_every": 2, "strict": True})
    out = models.denoise(static, dit, steps)
    assert foresight_compile.stats(static).reused_fraction >= 0.3
    assert rel_err(out, reference) > 1e-4
    assert psnr(out, reference) >= STATIC_MIN_PSNR
    drawn, uncached = tv.evaluate_samples(out, dit.prompts), tv.evaluate_samples(reference, dit.prompts)
    assert drawn.colour_accuracy >= uncached.colour_accuracy, (drawn, uncached)
    assert drawn.direction_accuracy >= uncached.direction_accuracy, (drawn, uncached)
