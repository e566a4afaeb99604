"""The policy interface and the per-branch device state it reads and writes."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

# Each block's metric row starts on its own 64-byte boundary: the compiled update segments
# write their row in place, and compiled code may assume aligned inputs (Triton does).
ROW_STRIDE = 16
# Raw columns, written by a block's compiled update (sums, so ranks of a sequence-parallel
# group can add theirs up): squared change against the newest cached value, element count,
# 1.0 when an element is not finite, squared error of the forecast the cache would have
# served, squared norm of the block's cached quantity.
SQ, COUNT, BAD, FSQ, NSQ = range(5)
RAW = 5
# Derived columns, computed by the controller from the raw ones after each step; ``metrics``
# is the ``(mse, finite)`` view of them.
_MSE_COLUMN, _FINITE_COLUMN, _FERR_COLUMN = 8, 9, 10
# Under sequence parallelism: the raw columns summed over the ranks of the group (written by
# the controller's ``reduce`` each step, read by ``derive`` in place of the local ones).
_SUMS_COLUMN = 11
MSE, FINITE = 0, 1  # column indexes of ``PolicyState.metrics``


@dataclasses.dataclass
class PolicyState:
    """Device tensors of one branch, allocated once and then only written in place.

    ``rows[l]`` (float32 [5]) is written by block ``l``'s compiled update each time it
    computes (see the raw columns above). After each step the controller derives, per
    block, ``mse`` (the mean squared change against the cache, float32), ``finite`` (1.0
    when every output element was finite) and ``ferr`` (the relative L2 error of the
    forecast: ``sqrt(FSQ / NSQ)``); ``metrics`` is ``[mse, finite]``. ``thresholds`` and
    ``aux`` (16 floats) belong to the policy; ``probe`` (``aux[0:2]``) is where the
    executor's latent probe writes its two sums for a policy that ``needs_latent_change``.

    Under sequence parallelism, ``rows`` stay this rank's own sums and ``sums`` (float32
    [L, 5]) receives the group's totals each step (``ReuseController``'s ``reduce``); the
    derived columns are then derived from ``sums``."""

    storage: torch.Tensor  # float32 [L, ROW_STRIDE]
    thresholds: torch.Tensor  # float32 [L]
    aux: torch.Tensor  # float32 [ROW_STRIDE]: a policy's own device state
    flags: torch.Tensor  # bool [ROW_STRIDE]: a policy's own device flags
    # A policy's own preallocated scratch tensors (``ReusePolicy.new_state``): per branch,
    # so that concurrent requests never write each other's (``decide`` runs outside any lock).
    scratch: tuple[torch.Tensor, ...] = ()
    raw: torch.Tensor = dataclasses.field(init=False)  # [L, RAW] (view)
    sums: torch.Tensor = dataclasses.field(init=False)  # [L, RAW] (view): the group's totals
    probe: torch.Tensor = dataclasses.field(init=False)  # [2] (view of aux)
    metrics: torch.Tensor = dataclasses.field(init=False)  # [L, 2] (view): mse, finite
    rows: tuple[torch.Tensor, ...] = dataclasses.field(init=False)
    mse: torch.Tensor = dataclasses.field(init=False)
    finite: torch.Tensor = dataclasses.field(init=False)
    ferr: torch.Tensor = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.raw = self.storage[:, :RAW]
        self.sums = self.storage[:, _SUMS_COLUMN:_SUMS_COLUMN + RAW]
        self.probe = self.aux[0:2]
        self.metrics = self.storage[:, _MSE_COLUMN:_FINITE_COLUMN + 1]
        self.rows = tuple(self.storage[l, :RAW] for l in range(self.storage.shape[0]))
        self.mse = self.storage[:, _MSE_COLUMN]
        self.finite = self.storage[:, _FINITE_COLUMN]
        self.ferr = self.storage[:, _FERR_COLUMN]

    @classmethod
    def allocate(cls, num_blocks: int, device: torch.device) -> "PolicyState":
        state = cls(storage=torch.zeros(num_blocks, ROW_STRIDE, dtype=torch.float32, device=device),
                    thresholds=torch.zeros(num_blocks, dtype=torch.float32, device=device),
                    aux=torch.zeros(ROW_STRIDE, dtype=torch.float32, device=device),
                    flags=torch.zeros(ROW_STRIDE, dtype=torch.bool, device=device))
        state.reset()
        return state

    def reset(self) -> None:
        self.storage.zero_()
        # Blocks that never computed: counts and norms of 1, so derived values stay finite.
        self.storage[:, COUNT].fill_(1.0)
        self.storage[:, NSQ].fill_(1.0)
        self.thresholds.fill_(-1.0)
        self.aux.zero_()
        self.flags.zero_()

    def derive(self, source: torch.Tensor | None = None) -> None:
        """Derived columns from the raw ones, or from ``source`` ([L, RAW]: ``sums``), in
        place, no allocation."""
        raw = self.storage if source is None else source
        torch.div(raw[:, SQ], raw[:, COUNT], out=self.mse)
        torch.mul(raw[:, BAD], -1.0, out=self.finite)
        self.finite.add_(1.0)
        torch.div(raw[:, FSQ], raw[:, NSQ], out=self.ferr)
        self.ferr.sqrt_()


class ReusePolicy:
    """Base class. Subclasses set ``needs_cache``/``needs_metric`` and override the hooks.

    Every device hook writes into preallocated tensors (``out=``, in-place ops): the
    controller calls them on every step and a step allocates nothing."""

    name: ClassVar[str] = "?"
    default_warmup: ClassVar[int] = 8  # when the options leave warmup unset
    needs_cache: ClassVar[bool] = True  # False: never reuses, so no buffers are kept
    needs_metric: ClassVar[bool] = False  # True: stats report the change metric and thresholds
    needs_latent_change: ClassVar[bool] = False  # True: the executor measures the input's change
    # True: every step computes every block or serves every block (never a mix), so only the
    # region exit needs a cache (cache_history.py); False: blocks decide one by one.
    step_level: ClassVar[bool] = False

    def __init__(self, options) -> None:
        self.options = options

    def new_state(self, num_blocks: int, device: torch.device) -> PolicyState:
        """The device state of one branch (allocated once, when the branch is created). A
        policy that needs scratch tensors in its hooks allocates them here, in
        ``PolicyState.scratch``: a policy object is shared by every request and branch of a
        compiled graph, so nothing it writes per step may live on the policy itself."""
        return PolicyState.allocate(num_blocks, device)

    def computes_all(self, step: int, warmup: int | None, total: int | None = None,
                     run: int = 0) -> bool:
        """Host decision before ``step`` of a generation of ``total`` steps (None: unknown),
        ``run`` steps after the last step that computed every block: True when every block
        must compute."""
        raise NotImplementedError

    def decide(self, state: PolicyState, out: torch.Tensor) -> None:
        """Device decision for a step that is not ``computes_all``: write bool [L] into
        ``out``, True = reuse."""
        raise NotImplementedError

    def caches_residual(self, block: int) -> bool:
        """True: block's cache holds ``out - in`` and reuse serves ``in + residual``."""
        return self.options.reuse == "residual"

    def observe(self, step: int, warmup: int | None, state: PolicyState, history=None,
                total: int | None = None) -> None:
        """After ``step`` ran (its metrics are derived in ``state``): update device state in
        place. ``history`` (the branch's ``CacheHistory``) says which blocks computed and
        when."""
