"""An executable model of the controller's contract (docs/DESIGN.md section 2, README
"What the controller guarantees"), for the property suite (test_controller_properties.py).

``Contract`` is told each call as the caller sees it (who calls: a request or a thread; the
branch name, if any; the timestep; the input signature; resets) and says

* which branch state the call belongs to: per caller (request, else thread); a named call
  by its name; an unnamed one by its position among consecutive calls at one timestep;
* whether the contract *requires* a new generation here: the branch's first call, an input
  signature (shape, dtype) other than at its previous call, a ``reset()`` since, the
  request's ``num_steps`` reached, or, outside a request, a timestep that did not decrease;
  or another compile of the model (Dynamo's, for other inputs; ``frames.py``) than the one
  that ran the branch's previous call: its state for the branch is out of date or new
  (which compile runs a call is Dynamo's choice, e.g. after another thread's recompile: the
  caller reports it).

Given what the controller actually did (the step index and the reuse mask of the call), it
then recomputes the output: every computed block from the model's own eager block, every
served block from *this* branch's values of *this* generation only (the newest value, or
the Lagrange forecast through the newest ``order + 1`` at their steps, as
``runtime/cache_history.py`` documents). A value served from any other generation, branch, request,
shape or dtype cannot reproduce the output: ``ExactDiT``'s blocks are nonlinear and each
call's input is fresh noise. The policy stays free to choose the mask (its choice is
checked only against the contract's invariants: step 0 computes every block; a block is
served only with a value of this generation).

Liveness beside safety: the contract also says

* which generation starts are *permitted* without being required: in a request without
  ``num_steps``, the controller takes the branch's previous generation's length as the
  step count (of the compiled graph that ran it, which the contract cannot see: any earlier
  length of the branch in the request is permitted). Any other start is *unexpected*: it
  costs speed (every block computes again), and a controller that restarted at every call
  would never serve anything;
* which calls must be *served*: where the policy's settings make the schedule certain
  (``serves(step)``, e.g. ``static``'s warmup and refresh interval), a step that the
  schedule serves, in a generation whose inputs were all finite so far, serves every block.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch


@dataclasses.dataclass
class BranchModel:
    signature: tuple | None = None
    last_timestep: float = math.inf
    step: int = 0
    epoch: int = -1
    # The lengths of this branch's earlier generations (in this request): starts there are
    # permitted (the controller's step-count guess, see the module docstring).
    lengths: set = dataclasses.field(default_factory=set)
    finite: bool = True  # every input of this generation so far was finite
    program: object = None  # the compile that ran the branch's previous call
    # Per block: [(step, value)], newest first, at most ``slots``.
    history: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class CallerModel:
    branches: dict = dataclasses.field(default_factory=dict)
    previous_timestep: float | None = None
    order: int = 0
    epoch: int = -1


@dataclasses.dataclass
class Verdict:
    mandatory: bool  # the contract required a new generation here
    restarted: bool  # the controller started one
    problems: list  # safety: what the controller did wrong (stale or wrong output)
    permitted: bool = False  # a start here is allowed (not required)
    must_serve: bool = False  # the policy's certain schedule serves every block here
    served_all: bool = False  # the controller served every block
    served_any: bool = False  # the controller served at least one block

    @property
    def unexpected_start(self) -> bool:
        """A generation start the contract neither requires nor permits."""
        return self.restarted and not (self.mandatory or self.permitted)

    @property
    def missed_serve(self) -> bool:
        """The schedule serves this call and the controller computed some block."""
        return self.must_serve and not self.served_all


def lagrange(steps: list[int], t: int) -> list[float]:
    """Weights of the forecast at ``t`` through values at ``steps`` (newest first)."""
    out = []
    for j, sj in enumerate(steps):
        w = 1.0
        for i, si in enumerate(steps):
            if i != j:
                w *= (t - si) / (sj - si)
        out.append(w)
    return out


class Contract:
    def __init__(self, model: torch.nn.Module, slots: int, serves=None) -> None:
        """``serves(step)``: True where the policy's settings make it certain that a step
        serves every block (None: the policy's choice is never certain)."""
        self.model = model
        self.slots = slots
        self.serves = serves
        self.callers: dict = {}
        self.epoch = 0

    def reset(self) -> None:
        self.epoch += 1

    def _branch(self, caller: object, name: str | None, timestep: float) -> BranchModel:
        c = self.callers.setdefault(caller, CallerModel())
        if c.epoch != self.epoch:
            c.epoch = self.epoch
            c.previous_timestep = None
        if name is not None:
            key = ("name", name)
            c.previous_timestep = None
        else:
            c.order = c.order + 1 if timestep == c.previous_timestep else 0
            c.previous_timestep = timestep
            key = ("order", c.order)
        return c.branches.setdefault(key, BranchModel())

    def call(self, caller: object, in_request: bool, num_steps: int | None, name: str | None,
             x: torch.Tensor, timestep: float, step: int, mask: list[bool],
             output: torch.Tensor, program: object = None) -> Verdict:
        b = self._branch(caller, name, timestep)
        signature = (tuple(x.shape), x.dtype)
        moved, b.program = b.program is not None and program is not b.program, program
        mandatory = (b.signature is None or signature != b.signature or b.epoch != self.epoch
                     or moved
                     or (in_request and num_steps is not None and b.step >= num_steps)
                     or (not in_request and not timestep < b.last_timestep))
        permitted = in_request and num_steps is None and b.step in b.lengths
        problems = []
        restarted = step == 0
        if mandatory and not restarted:
            problems.append(f"continued a generation across a required start (at step {step})")
        if restarted or not b.history:
            b.history = [[] for _ in self.model.blocks]
        if restarted:
            if b.step:
                b.lengths.add(b.step)
            b.step, b.finite = 0, True
        elif step != b.step:
            problems.append(f"step {step}, the contract counts {b.step}")
        b.signature, b.epoch, b.last_timestep = signature, self.epoch, timestep
        if not restarted and mandatory:
            b.history = [[] for _ in self.model.blocks]  # judge the rest on its own
        if b.step == 0 and any(mask):
            problems.append(f"step 0 serves blocks {mask}")
        expected = self._evaluate(b, x, timestep, mask, problems)
        if expected is not None and not _close(output, expected):
            err = ((output.double() - expected.double()).abs().max().item()
                   if output.shape == expected.shape else "shape")
            problems.append(f"output differs from the contract's by {err} (mask {mask}, "
                            f"step {step})")
        must_serve = (self.serves is not None and b.finite and step == b.step
                      and self.serves(b.step))
        b.finite = b.finite and bool(torch.isfinite(x).all())
        b.step += 1
        return Verdict(mandatory, restarted, problems, permitted=permitted,
                       must_serve=must_serve, served_all=all(mask), served_any=any(mask))

    def _evaluate(self, b: BranchModel, x: torch.Tensor, timestep: float, mask: list[bool],
                  problems: list) -> torch.Tensor | None:
        model = self.model
        with torch.no_grad():
            ts = torch.full((x.shape[0],), timestep)
            temb = model.t_embed(ts.reshape(-1, 1).float() / 1000)[:, None, :]
            h = x * 1.0
            for l, block in enumerate(model.blocks):
                history = b.history[l]
                if mask[l]:
                    if not history:
                        problems.append(f"block {l} served with no value of this generation")
                        return None
                    if not torch.isfinite(history[0][1]).all():
                        problems.append(f"block {l} served a non-finite value")
                    h = _forecast(history, b.step)
                else:
                    h = block(h, temb)
                    history.insert(0, (b.step, h.clone()))
                    del history[self.slots:]
            return h * 1.0


def _forecast(history: list, step: int) -> torch.Tensor:
    steps = [s for s, _ in history]
    weights = torch.tensor(lagrange(steps, step), dtype=torch.float64).to(torch.float32)
    if len(history) == 1 and weights[0] == 1.0:
        return history[0][1]
    def term(value, weight):
        return torch.where(weight != 0, value * weight, 0)

    newest = history[0][1]
    out, usable = term(newest, weights[0]), torch.ones_like(newest, dtype=torch.bool)
    for j in range(1, len(history)):
        out = out + term(history[j][1], weights[j])
        usable &= torch.isfinite(history[j][1]) | (weights[j] == 0)
    # A forecast through an older non-finite value serves the newest value there.
    return torch.where(usable, out, newest)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    tol = {torch.bfloat16: 3e-2, torch.float16: 3e-3, torch.float32: 2e-5}.get(a.dtype, 1e-9)
    return bool(torch.allclose(a.double(), b.double(), rtol=tol, atol=tol, equal_nan=True))


def np_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)
