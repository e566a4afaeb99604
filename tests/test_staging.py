"""Host-to-device staging (``runtime/staging.py``): a pinned host buffer must never be
rewritten while a copy out of it may still be in flight.

No CPU test can run a CUDA copy, so ``LateCopies`` stands in for the copy engine of a GPU
that lags behind the host: a queued copy reads the host buffer only when the host waits on
its event (the latest moment a real GPU could have run it). Each copy records what it
delivered; every copy must deliver the values written before it was queued."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from foresight_compile.runtime.cache_history import CacheHistory, HistoryLayout
from foresight_compile.runtime.staging import HostToDevice


class LateCopies:
    """A copy engine whose copies run as late as possible: at the wait on their event."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.delivered: list[np.ndarray] = []
        self._pending = []

    def host_like(self, device_tensor: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(device_tensor)

    def event(self):
        return object()

    def copy(self, device_tensor, host, event) -> None:
        self.log.append("copy")
        self._pending.append((device_tensor, host))

    def wait(self, event) -> None:
        self.log.append("wait")
        for device_tensor, host in self._pending:  # the GPU gets to the copies now
            device_tensor.copy_(host)
            self.delivered.append(device_tensor.numpy().copy())
        self._pending.clear()


def test_each_copy_delivers_what_was_written_before_it_was_queued():
    copies = LateCopies()
    staging = HostToDevice(torch.zeros(3), copies)
    written = [np.full(3, float(step)) for step in range(5)]
    for values in written:
        staging.write(values)
    staging.begin()  # the last copy completes
    staging.begin()  # nothing queued since: no second wait
    assert [d.tolist() for d in copies.delivered] == [w.tolist() for w in written]
    # one copy per step, each step waiting for the previous copy before writing
    assert copies.log == ["copy"] + ["wait", "copy"] * 4 + ["wait"]


def test_forecast_weights_reach_the_device_step_by_step_when_the_device_lags():
    """The weights table of a branch (the regression: ``prepare`` wrote the host table before
    waiting for the previous copy out of it, so a late copy carried the next step's weights)."""
    copies = LateCopies()
    history = CacheHistory(HistoryLayout.every_block(1, slots=2), torch.device("cpu"), copies)
    expected = []
    for step, computed in enumerate([True, True, False, False, True, False]):
        history.prepare(step)
        expected.append(history._lagrange(float(step))[0].astype(np.float32).tolist())
        history.record(step, [not computed])
    history.table.begin()
    assert [d[0, :2].tolist() for d in copies.delivered] == expected
    assert expected[3] != expected[2]  # the weights change from step to step


def test_on_the_cpu_the_device_tensor_is_written_directly():
    target = torch.zeros(4)
    staging = HostToDevice(target)
    assert staging.write([1.0, 2.0, 3.0, 4.0]) is target
    assert target.tolist() == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory, events)")
def test_cuda_staging_delivers_every_write():
    target = torch.zeros(8, device="cuda")
    staging = HostToDevice(target)
    for step in range(50):
        staging.write(np.full(8, float(step)))
        assert float(target.sum()) == 8.0 * step
