"""Concurrent requests on one compiled model: each sees exactly the state it would alone.

Two threads share one ``torch.compile(transformer, backend="foresight")`` (Inductor, the
default policy with reuse on) and each runs its own 30-step generation with its own prompt,
CFG as two unnamed calls per step; with and without ``generation()``. Each output equals
the same request run alone (<= 1e-6), with the same reuse mask. Memory stays bounded over
200 requests. Foresight's ``decision="prefix"`` (scratch tensors between two device ops,
outside the controller's lock): two requests' decisions forced to interleave there still
give each its own masks and outputs.
"""
from __future__ import annotations

import contextlib
import threading

import diffusers
import pytest
import torch

import foresight_compile
from foresight_compile import models
from foresight_compile.program import programs_of
from toy import ToyDiT

STEPS = 30
OPTIONS = {"tolerance": 4.0, "strict": True}  # reuse on: the default policy, generous budget


def _prompt(seed: int) -> torch.Tensor:
    return torch.randn(1, 12, 16, generator=torch.Generator().manual_seed(seed))


def _generate(fast, dit, prompt: torch.Tensor, seed: int, context: bool):
    """A 30-step flow-matching loop with CFG as two unnamed calls (cond, then uncond)."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(STEPS)
    x = torch.randn(dit.latent_shape, generator=torch.Generator().manual_seed(seed))
    null = torch.zeros_like(prompt)
    with torch.no_grad(), (foresight_compile.generation(num_steps=STEPS) if context
                           else contextlib.nullcontext()):
        for t in scheduler.timesteps:
            ts = t.expand(1).to(torch.float32)
            cond = fast(hidden_states=x, timestep=ts, encoder_hidden_states=prompt,
                        return_dict=False)[0]
            uncond = fast(hidden_states=x, timestep=ts, encoder_hidden_states=null,
                          return_dict=False)[0]
            x = scheduler.step(uncond + 4.0 * (cond - uncond), t, x).prev_sample
    return x


def _masks_by_generation(fast, since: int) -> dict[int, list]:
    """Rows recorded after row ``since``, grouped by (request, generation), in call order."""
    s = foresight_compile.stats(fast)
    out: dict = {}
    for i in range(since, s.steps):
        out.setdefault((s.request[i], s.generation[i]), []).append((s.branch[i], s.mask[i]))
    return out


@pytest.fixture(scope="module")
def compiled():
    torch._dynamo.reset()
    dit = models.wan(layers=2)
    fast = torch.compile(dit.model, backend="foresight", options=OPTIONS)
    _generate(fast, dit, _prompt(0), 0, context=True)  # compile outside the measurement
    yield dit, fast
    torch._dynamo.reset()


@pytest.mark.shared_dynamo
@pytest.mark.parametrize("context", [True, False], ids=["generation", "no-context"])
def test_two_concurrent_requests_each_equal_the_same_request_alone(compiled, context):
    dit, fast = compiled
    requests = [(_prompt(1), 11), (_prompt(2), 22)]
    alone, alone_masks = [], []
    for prompt, seed in requests:
        # Alone: in a thread of its own (without a context a thread's state is its own,
        # and remembers its previous generation's length).
        before = foresight_compile.stats(fast).steps
        result = []
        solo = threading.Thread(target=lambda: result.append(
            _generate(fast, dit, prompt, seed, context)))
        solo.start()
        solo.join()
        alone.append(result[0])
        (masks,) = _masks_by_generation(fast, before).values()
        alone_masks.append(masks)
    assert any(any(m) for _, m in alone_masks[0])  # reuse is on

    before = foresight_compile.stats(fast).steps
    results: list = [None, None]
    barrier = threading.Barrier(2)

    def worker(i):
        barrier.wait()
        results[i] = _generate(fast, dit, *requests[i], context)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, expected in zip(results, alone):
        assert (got - expected).abs().max().item() <= 1e-6
    concurrent = list(_masks_by_generation(fast, before).values())
    assert len(concurrent) == 2
    assert sorted(map(str, concurrent)) == sorted(map(str, alone_masks))


def test_memory_stays_bounded_over_200_requests():
    torch.manual_seed(0)
    model = ToyDiT(layers=3).eval()
    fast = torch.compile(model, backend="foresight",
                         options={"policy": "static", "warmup": 1, "recompute_every": 2,
                                  "lowering": "eager", "strict": True})
    x = torch.randn(1, 4, 8)
    sizes = []

    def serve(n):
        for i in range(n):
            with foresight_compile.generation(num_steps=3), torch.no_grad():
                for t in (900.0, 600.0, 300.0):
                    fast(hidden_states=x + i, timestep=torch.tensor([t]))
            controller = programs_of(model)[0].controller
            sizes.append(controller.cache_bytes)

    threads = [threading.Thread(target=serve, args=(100,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    controller = programs_of(model)[0].controller
    assert foresight_compile.stats(fast).steps == 600
    # Only the pool of released states remains (and nothing of the 200 requests).
    assert len(controller.live_states()) == 0
    per_state = max(sizes) // 2
    assert controller.cache_bytes <= 4 * per_state and max(sizes) <= 6 * per_state


PREFIX_STEPS = 8
PREFIX_OPTIONS = {"policy": "foresight", "decision": "prefix", "warmup": 2,
                  "recompute_every": 100, "threshold": 1.0, "lowering": "eager", "strict": True}


def _prefix_request(fast, kind: str):
    """One request of ``PREFIX_STEPS`` steps, one call per step. ``still``: the same input
    every step, so every block's change is 0, its threshold 0, and every block is reused
    after warmup. ``growing``: an input whose change grows every step, so no block is ever
    under its threshold and every block computes. A named branch: steps are told apart by
    the request, not by the (constant) timestep."""
    x0 = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(5))
    outs = []
    with foresight_compile.generation(num_steps=PREFIX_STEPS), foresight_compile.branch("cond"), \
            torch.no_grad():
        for s in range(PREFIX_STEPS):
            x = x0 if kind == "still" else x0 * (1 + s) ** 2
            outs.append(fast(hidden_states=x, timestep=torch.tensor([500.0]))[0])
    return torch.stack(outs)


def test_prefix_decisions_of_two_concurrent_requests_do_not_mix(monkeypatch):
    """``decision="prefix"`` needs scratch tensors between ``under.copy_(mask)`` and
    ``mv``; ``decide`` runs outside the controller's lock. Both requests' decisions are
    forced to interleave there (a barrier in ``torch.mv``: both copies happen before either
    product): each request's masks and outputs must still be those it has alone."""
    torch.manual_seed(0)
    model = ToyDiT(layers=3).eval()
    fast = torch.compile(model, backend="foresight", options=PREFIX_OPTIONS)
    kinds = ("still", "growing")
    alone, alone_masks = {}, {}
    for kind in kinds:
        before = foresight_compile.stats(fast).steps
        alone[kind] = _prefix_request(fast, kind)
        (masks,) = _masks_by_generation(fast, before).values()
        alone_masks[kind] = masks
    # The two requests decide differently: one reuses every block, the other none.
    assert any(all(m) for _, m in alone_masks["still"])
    assert not any(any(m) for _, m in alone_masks["growing"])

    barrier = threading.Barrier(2, timeout=30)
    mv = torch.mv

    def paired_mv(*args, **kwargs):
        barrier.wait()  # both requests' scratch copies are done before either product
        return mv(*args, **kwargs)

    before = foresight_compile.stats(fast).steps
    results: dict = {}
    errors: list = []

    def worker(kind):
        try:
            results[kind] = _prefix_request(fast, kind)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)
            barrier.abort()

    monkeypatch.setattr(torch, "mv", paired_mv)
    threads = [threading.Thread(target=worker, args=(k,)) for k in kinds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.setattr(torch, "mv", mv)
    assert not errors, errors
    concurrent = list(_masks_by_generation(fast, before).values())
    assert sorted(map(str, concurrent)) == sorted(map(str, alone_masks.values()))
    for kind in kinds:
        assert (results[kind] - alone[kind]).abs().max().item() <= 1e-6, kind
