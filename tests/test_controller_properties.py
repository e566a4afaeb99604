"""The controller against an executable model of its contract, on random call sequences.

Each sequence (a seeded generator, reproducible from its number) mixes what callers do:
shapes, dtypes and batch sizes that change between and within generations; 1-3 CFG calls
per step, named and unnamed; 1 to 60 steps; timesteps that decrease, repeat and jump up;
calls inside ``generation()`` (with and without ``num_steps``) and outside any request;
``reset()`` at random points; several threads at once, each with its own sequence; now and
then a non-finite input. Every call is checked by ``contract.Contract`` (the reference):
0 stale reuses (no value served from another generation, branch, request, shape or dtype),
no continued generation where the contract requires a new one, and no crash (safety); and
no generation start the contract neither requires nor permits, and every call that the
``static`` configs' schedule serves served (liveness: a controller that restarts at every
call, or never serves, fails; the negative controls below prove it).

The default suite runs 50 sequences (a fixed count; every config several times); the benchmark job's
``-m slow`` case runs 2,000 and prints the closing figure.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading

import pytest
import torch

import foresight_compile
from contract import Contract, np_rng
from foresight_compile import Options
from foresight_compile.program import ForesightProgram
from foresight_compile.runtime.context import current_context
from toy import ExactDiT

# Policies under test: the default (budget: forecast order 1), static with copies and with
# order-2 forecasts, and foresight (per-block decisions).
CONFIGS = {
    "budget": {"tolerance": 2.0},
    "static0": {"policy": "static", "warmup": 1, "recompute_every": 3, "order": 0},
    "static2": {"policy": "static", "warmup": 2, "recompute_every": 4, "order": 2},
    "foresight": {"policy": "foresight", "warmup": 2, "recompute_every": 3, "threshold": 4.0},
}
DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _certain_schedule(options: dict):
    """The steps a config serves for certain (every block), or None when the policy decides
    from measured values. ``static`` (FORA-like): every step from the warmup on but every
    ``recompute_every``-th, stated here from the policy's definition, not from its code."""
    if options.get("policy") != "static":
        return None
    warmup, every = options["warmup"], options["recompute_every"]
    return lambda step: step >= warmup and (step - warmup) % every != 0
NAMES = ("cond", "uncond", "extra")
_LOCAL = threading.local()


def _recording_backend(options: dict):
    """The foresight backend (eager lowering), recording in the calling thread what the
    controller decided for each call: the step index, the mask, and which compile (program)
    ran it."""
    def backend(gm, example_inputs, **_):
        program = ForesightProgram(gm, example_inputs, Options.from_dict(options))
        controller, executor = program.controller, program.executor

        def run(*args):
            state = controller.begin(args)
            _LOCAL.seen = (state.step, list(state.mask), program)
            outputs = executor.run(state, args)
            controller.end(state)
            return outputs
        return run
    return backend


class Models:
    """One compiled ExactDiT per policy config, shared by every sequence."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.entries = {}
        for name, opts in CONFIGS.items():
            model = ExactDiT(dim=8, layers=3).eval()
            options = {**opts, "lowering": "eager", "strict": True}
            # Every dtype and batch-size class is its own Dynamo compile: room for them all.
            fast = torch.compile(model, backend=_recording_backend(options),
                                 recompile_limit=64, isolate_recompiles=True)
            self.entries[name] = (model, fast, Options(**options).forecast_order + 1,
                                  _certain_schedule(opts))


@dataclasses.dataclass
class Segment:
    request: bool
    num_steps: int | None
    names: tuple[str, ...] | None
    cfg: int
    # per step: (timestep, shape, dtype, non-finite input)
    steps: list
    reset_before: bool = False


@dataclasses.dataclass
class Tally:
    sequences: int = 0
    calls: int = 0
    stale: int = 0
    crashes: int = 0
    required_starts: int = 0
    permitted_starts: int = 0  # starts the contract permits, not requires (length guess)
    unexpected_starts: int = 0  # starts the contract neither requires nor permits
    served: int = 0  # calls that served at least one block
    required_serves: int = 0  # calls the certain schedule serves
    missed_serves: int = 0  # ... that computed some block
    problems: list = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.sequences} sequences, {self.calls} calls, stale reuses {self.stale}, "
                f"crashes {self.crashes}; generation starts required {self.required_starts}, "
                f"permitted {self.permitted_starts}, unexpected {self.unexpected_starts}; "
                f"calls served {self.served}, required to serve {self.required_serves}, "
                f"missed {self.missed_serves}")

    def failures(self) -> list[str]:
        """What fails the suite: safety (crashes, stale reuses, a required start skipped)
        and liveness (an unexpected start, a certain serve missed, nothing served)."""
        found = []
        if self.crashes:
            found.append(f"{self.crashes} crashes")
        if self.stale:
            found.append(f"{self.stale} calls with stale reuse or a skipped required start")
        if self.unexpected_starts:
            found.append(f"{self.unexpected_starts} generation starts neither required nor "
                         "permitted")
        if self.missed_serves:
            found.append(f"{self.missed_serves} of {self.required_serves} calls that must serve "
                         "computed")
        if self.calls and not self.served:
            found.append("nothing was ever served")
        return found


def _script(rng, allow_reset: bool, max_calls: int) -> list[Segment]:
    segments, calls = [], 0
    while calls < max_calls:
        n = int(rng.integers(20, 61)) if rng.random() < 0.25 else int(rng.integers(1, 13))
        cfg = int(rng.integers(1, 4))
        named = rng.random() < 0.4
        request = rng.random() < 0.5
        num_steps = (int(rng.integers(1, n + 3)) if rng.random() < 0.7 else None) if request else None
        shape = (int(rng.choice([1, 2, 3])), int(rng.choice([2, 3, 5])), 8)
        dtype = DTYPES[0] if rng.random() < 0.6 else DTYPES[int(rng.integers(0, 3))]
        t = float(rng.integers(500, 1001))
        steps = []
        for _ in range(n):
            steps.append((t, shape, dtype, rng.random() < 0.02))
            r = rng.random()
            t = t if r < 0.08 else t + float(rng.integers(1, 200)) if r < 0.16 else \
                t - float(rng.integers(1, 40))
            if rng.random() < 0.05:
                shape = (int(rng.choice([1, 2, 3])), int(rng.choice([2, 3, 5])), 8)
            if rng.random() < 0.05:
                dtype = DTYPES[int(rng.integers(0, 3))]
        segments.append(Segment(request, num_steps, NAMES[:cfg] if named else None, cfg, steps,
                                reset_before=allow_reset and rng.random() < 0.15))
        calls += n * cfg
    return segments


def _run_script(fast, model, contract: Contract, script, seed: int, tally: Tally,
                lock: threading.Lock) -> None:
    g = torch.Generator().manual_seed(seed)
    for seg in script:
        if seg.reset_before:
            foresight_compile.reset(fast)
            contract.reset()
        context = (foresight_compile.generation(num_steps=seg.num_steps) if seg.request
                   else contextlib.nullcontext())
        with context:
            caller = current_context().request if seg.request else threading.current_thread()
            for t, shape, dtype, bad in seg.steps:
                for c in range(seg.cfg):
                    name = seg.names[c] if seg.names else None
                    x = torch.randn(shape, generator=g).to(dtype)
                    if bad:
                        x[0, 0, 0] = float("inf")
                    _LOCAL.seen = None
                    try:
                        with (foresight_compile.branch(name) if name else contextlib.nullcontext()):
                            with torch.no_grad():
                                out = fast(hidden_states=x, timestep=torch.full((shape[0],), t))[0]
                    except Exception as e:  # a crash: counted, and this script stops
                        with lock:
                            tally.crashes += 1
                            tally.problems.append(f"seed {seed}: crash {type(e).__name__}: {e}")
                        return
                    if _LOCAL.seen is None:  # Dynamo ran the frame without our program
                        with lock:
                            tally.crashes += 1
                            tally.problems.append(f"seed {seed}: call ran without the program")
                        return
                    step, mask, program = _LOCAL.seen
                    verdict = contract.call(caller, seg.request, seg.num_steps, name, x, t,
                                            step, mask, out, program)
                    with lock:
                        tally.calls += 1
                        tally.required_starts += verdict.mandatory
                        tally.permitted_starts += (verdict.restarted and verdict.permitted
                                                   and not verdict.mandatory)
                        tally.unexpected_starts += verdict.unexpected_start
                        tally.served += verdict.served_any
                        tally.required_serves += verdict.must_serve
                        tally.missed_serves += verdict.missed_serve
                        if verdict.problems:
                            tally.stale += 1
                            tally.problems.append(f"seed {seed} t={t} {name}: {verdict.problems}")
                        if verdict.unexpected_start:
                            tally.problems.append(f"seed {seed} t={t} {name}: unexpected start")
                        if verdict.missed_serve:
                            tally.problems.append(f"seed {seed} t={t} {name}: step {step} "
                                                  f"must serve, mask {mask}")


def run_sequences(models: Models, count: int, first_seed: int = 0) -> Tally:
    tally, lock = Tally(), threading.Lock()
    for seed in range(first_seed, first_seed + count):
        rng = np_rng(seed)
        name = list(CONFIGS)[seed % len(CONFIGS)]
        model, fast, slots, serves = models.entries[name]
        foresight_compile.reset(fast)
        threads = 1 if rng.random() < 0.75 else int(rng.integers(2, 4))
        contract = Contract(model, slots, serves)
        scripts = [_script(rng, threads == 1, 120 // threads) for _ in range(threads)]
        if threads == 1:
            _run_script(fast, model, contract, scripts[0], seed, tally, lock)
        else:
            # One contract, each thread its own callers (its thread, its requests).
            workers = [threading.Thread(target=_run_script,
                                        args=(fast, model, contract, s, seed * 10 + i,
                                              tally, lock))
                       for i, s in enumerate(scripts)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        tally.sequences += 1
    return tally


@pytest.fixture(scope="module")
def models():
    torch._dynamo.reset()
    yield Models()
    torch._dynamo.reset()


def _report(capsys, label: str, tally: Tally) -> None:
    with capsys.disabled():
        print(f"\nproperty suite ({label}): {tally}")
        for p in tally.problems[:10]:
            print("  ", p)


@pytest.mark.shared_dynamo
def test_random_call_sequences_never_serve_a_stale_value(models, capsys):
    tally = run_sequences(models, 50)  # a fixed count: no clock decides this test
    _report(capsys, "default", tally)
    assert tally.sequences == 50 and tally.calls > 0 and tally.required_serves > 0
    assert tally.failures() == [], tally.problems[:5]


# Negative controls: broken controllers the suite must fail, on a few sequences (seeds 1-4:
# each config once, the two static ones among them).
CONTROL_SEEDS = dict(count=4, first_seed=1)


@pytest.mark.shared_dynamo
def test_a_controller_that_restarts_at_every_call_fails_the_suite(models, monkeypatch):
    from foresight_compile.runtime.controller import ReuseController

    # A new input signature at every call: every call starts a new generation.
    monkeypatch.setattr(ReuseController, "_signature", lambda self, args: (object(),))
    tally = run_sequences(models, **CONTROL_SEEDS)
    assert tally.crashes == 0 and tally.stale == 0, tally.problems[:5]  # safe, but not live
    assert tally.unexpected_starts > 0
    assert any("neither required nor permitted" in f for f in tally.failures())


@pytest.mark.shared_dynamo
def test_a_controller_that_never_serves_fails_the_suite(models, monkeypatch):
    from foresight_compile.runtime.controller import ReuseController

    begin = ReuseController.begin

    def never_serves(self, args):
        state = begin(self, args)
        state.mask = [False] * self.num_blocks
        return state

    monkeypatch.setattr(ReuseController, "begin", never_serves)
    tally = run_sequences(models, **CONTROL_SEEDS)
    assert tally.crashes == 0 and tally.stale == 0, tally.problems[:5]
    assert tally.served == 0 and tally.missed_serves == tally.required_serves > 0
    assert tally.unexpected_starts == 0
    assert any("must serve computed" in f for f in tally.failures())
    assert "nothing was ever served" in tally.failures()


@pytest.mark.slow
@pytest.mark.shared_dynamo
def test_two_thousand_random_call_sequences_never_serve_a_stale_value(models, capsys):
    tally = run_sequences(models, 2000, first_seed=10_000)
    _report(capsys, "benchmark", tally)
    assert tally.sequences == 2000
    assert tally.failures() == [], tally.problems[:5]
