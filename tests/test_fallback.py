"""Never worse than Inductor: a failure while compiling, or first running, one of our
segments falls back to plain Inductor for that graph, with one ``ForesightFallbackWarning``
naming the cause; ``strict=True`` raises the cause; ``stats()`` says not accelerated and why.

The failure is injected at the one place segments are compiled (``SegmentCompiler.compile``):
an ``InductorError`` like the one Krea2 raised under ``dynamic=True`` (issue 22). Static
shapes compile at the first call (the program falls back inside the call); dynamic shapes
compile in the backend (the backend falls back). The fallback itself compiles with plain
``compile_fx``, never through the patched method, as plain ``torch.compile`` does.
"""
import re
import warnings

import pytest
import torch
from torch._inductor.exc import InductorError

import foresight_compile
from foresight_compile import ForesightFallbackWarning
from foresight_compile.lowering.segments import SegmentCompiler
from foresight_compile.program import programs_of
from toy import ToyDiT

CAUSE = "For s1 + s50, expected [s1] to have been codegen-ed"
STATIC = {"policy": "static", "warmup": 1, "recompute_every": 3}


def _codegen_error() -> InductorError:
    return InductorError(AssertionError(CAUSE), None)


def _fails_to_compile(self, gm, args):
    raise _codegen_error()


def _fails_at_first_run(self, gm, args):
    def run(*a):
        raise _codegen_error()
    return run


FAILURES = {"compile": _fails_to_compile, "first run": _fails_at_first_run}


def _inputs(k: int, tokens: int = 4):
    g = torch.Generator().manual_seed(k)
    return torch.randn(1, tokens, 8, generator=g), torch.tensor([1000.0 - 100 * k])


def _steps(fast, sizes):
    with torch.no_grad():
        return [fast(hidden_states=x, timestep=t)[0]
                for x, t in (_inputs(k, tokens) for k, tokens in enumerate(sizes))]


def _plain_inductor(model, sizes, dynamic=None):
    torch._dynamo.reset()
    out = _steps(torch.compile(model, backend="inductor", dynamic=dynamic), sizes)
    torch._dynamo.reset()
    return out


def _ours(model, sizes, options, dynamic=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = torch.compile(model, backend="foresight", dynamic=dynamic, options=options)
        out = _steps(fast, sizes)
    return fast, out, [w for w in caught if issubclass(w.category, ForesightFallbackWarning)]


def _assert_fell_back(fast, model, out, expected, warned, stage):
    assert all(torch.equal(a, b) for a, b in zip(out, expected))
    assert len(warned) == 1, [str(w.message) for w in warned]
    message = str(warned[0].message)
    assert stage in message and f"InductorError: AssertionError: {CAUSE}" in message
    assert "plain Inductor" in message
    s = foresight_compile.stats(fast)
    assert not s.accelerated and CAUSE in s.reason and stage in s.reason
    assert programs_of(model) == []
    foresight_compile.reset(fast)  # nothing to reset: no error


@pytest.mark.parametrize("failure", FAILURES)
def test_a_segment_failing_at_the_first_call_falls_back_to_plain_inductor(monkeypatch, failure):
    """Static shapes: segments compile (and first run) inside the first call; the call
    returns plain Inductor's output, and so does every later one."""
    torch.manual_seed(0)
    model = ToyDiT(layers=2).eval()
    sizes = (4, 4, 4)
    expected = _plain_inductor(model, sizes)
    monkeypatch.setattr(SegmentCompiler, "compile", FAILURES[failure])
    fast, out, warned = _ours(model, sizes, STATIC)
    stage = "compiling a segment" if failure == "compile" else "the first run of a compiled segment"
    _assert_fell_back(fast, model, out, expected, warned, stage)


def test_a_segment_failing_to_compile_in_the_backend_falls_back_to_plain_inductor(monkeypatch):
    """Dynamic shapes: segments compile symbolically inside the backend call (Krea2's
    case); the backend returns plain Inductor's code for the graph, which serves every
    size without a recompile."""
    torch.manual_seed(0)
    model = ToyDiT(layers=2).eval()
    sizes = (4, 6, 9)
    expected = _plain_inductor(model, sizes, dynamic=True)
    monkeypatch.setattr(SegmentCompiler, "compile", _fails_to_compile)
    with torch._dynamo.config.patch(error_on_recompile=True):
        fast, out, warned = _ours(model, sizes, {"policy": "none"}, dynamic=True)
    _assert_fell_back(fast, model, out, expected, warned, "compiling a segment")


def test_symbolic_code_failing_at_its_first_run_falls_back_at_every_size(monkeypatch):
    """Dynamic shapes, code compiled in the backend that fails when first run: the first
    call falls back; plain Inductor then compiles per size at call time (no shape
    environment is left to compile symbolically in), each output plain Inductor's."""
    torch.manual_seed(0)
    model = ToyDiT(layers=2).eval()
    sizes = (4, 6, 9)
    expected = _plain_inductor(model, sizes, dynamic=True)
    monkeypatch.setattr(SegmentCompiler, "compile", _fails_at_first_run)
    with torch._dynamo.config.patch(error_on_recompile=True):
        fast, out, warned = _ours(model, sizes, {"policy": "none"}, dynamic=True)
    assert all((a - b).abs().max().item() <= 1e-6 for a, b in zip(out, expected))
    _assert_fell_back(fast, model, out, out, warned, "the block program's first call")


@pytest.mark.parametrize("failure, dynamic", [("compile", None), ("first run", None),
                                              ("compile", True)])
def test_strict_raises_the_cause_instead_of_falling_back(monkeypatch, failure, dynamic):
    model = ToyDiT(layers=2).eval()
    monkeypatch.setattr(SegmentCompiler, "compile", FAILURES[failure])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = torch.compile(model, backend="foresight", dynamic=dynamic,
                             options={**STATIC, "strict": True})
        with pytest.raises(InductorError, match=re.escape(CAUSE)):
            _steps(fast, (4,))
    assert not [w for w in caught if issubclass(w.category, ForesightFallbackWarning)]
    torch._dynamo.reset()


def test_an_error_after_a_first_call_that_ran_is_the_models_and_propagates():
    """Only our segments' compiles and first runs fall back: an error of a segment whose
    code already ran (the model's own code, its inputs) is raised as it is, and the program
    stays accelerated."""
    torch.manual_seed(0)
    model = ToyDiT(layers=2).eval()
    fast, _, warned = _ours(model, (4,), {**STATIC, "lowering": "eager"})
    assert not warned
    (program,) = programs_of(model)
    prologue = program.executor.plan.steps[0].segment

    def bad_input(*args):
        raise ValueError("the model's own error")
    prologue.fn = bad_input
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="the model's own error"):
            _steps(fast, (4,))
    assert not [w for w in caught if issubclass(w.category, ForesightFallbackWarning)]
    assert foresight_compile.stats(fast).accelerated and programs_of(model) == [program]
    torch._dynamo.reset()


def test_a_failure_plain_inductor_shares_is_raised_not_hidden(monkeypatch):
    """When plain Inductor fails on the call too, the failure is not ours to hide: its
    error propagates, nothing warns, and the program is not switched."""
    import foresight_compile.program as program_module

    model = ToyDiT(layers=2).eval()
    monkeypatch.setattr(SegmentCompiler, "compile", _fails_to_compile)

    def plain_fails_too(gm, symbolic=False):
        def run(*args):
            raise ValueError("plain Inductor fails here too")
        return run
    monkeypatch.setattr(program_module, "plain_inductor", plain_fails_too)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = torch.compile(model, backend="foresight", options=STATIC)
        with pytest.raises(ValueError, match="fails here too"):
            _steps(fast, (4,))
    assert not [w for w in caught if issubclass(w.category, ForesightFallbackWarning)]
    assert len(programs_of(model)) == 1
