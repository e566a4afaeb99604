"""HostToDevice: a small device tensor the host rewrites every step without waiting for the
device (forecast weights, an engine's or the graph form's reuse mask).

On the CPU the host writes the device tensor itself, through a numpy view. On CUDA it writes
a pinned host copy and queues a non-blocking copy to the device. A queued copy reads the
pinned buffer when the GPU gets to it, which can be long after the host queued it (the GPU
lags behind the host, more so with ``lookahead=2`` or on steps that skip the mask read), so
the order of one ``write`` is fixed:

1. wait for the copy queued by the previous ``write`` (it is long done in steady state: the
   wait costs nothing, but it is what keeps the next step from overwriting data in flight);
2. fill the pinned buffer;
3. queue the copy and record its event.

Filling first (the order this module replaced) lets a late copy deliver the next step's
values to the step before it. ``tests/test_staging.py`` drives this class with a copy
engine double that completes copies only when waited for, and checks what each copy
delivered.
"""
from __future__ import annotations

import numpy as np
import torch


class CudaCopies:
    """The CUDA side of a ``HostToDevice``: pinned host memory, a non-blocking copy, an event."""

    def host_like(self, device_tensor: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(device_tensor, device="cpu", pin_memory=True)

    def event(self):
        return torch.cuda.Event()

    def wait(self, event) -> None:
        event.synchronize()

    def copy(self, device_tensor: torch.Tensor, host: torch.Tensor, event) -> None:
        device_tensor.copy_(host, non_blocking=True)
        event.record()


class HostToDevice:
    """``view = begin()``, fill ``view`` (numpy, the host copy), ``commit()``: the device
    tensor then holds what was written (see the module docstring for the order on CUDA).

    ``copies``: the copy engine (``CudaCopies`` when ``device_tensor`` is on CUDA, none on
    the CPU; tests pass a double). Allocates nothing per step."""

    def __init__(self, device_tensor: torch.Tensor, copies=None) -> None:
        if copies is None and device_tensor.device.type == "cuda":
            copies = CudaCopies()
        self.device_tensor = device_tensor
        self._copies = copies
        self.host = device_tensor if copies is None else copies.host_like(device_tensor)
        self._view: np.ndarray = self.host.numpy()
        self._event = None if copies is None else copies.event()
        self._queued = False

    def begin(self) -> np.ndarray:
        """The host copy, safe to write: the copy queued by the last ``commit`` is done."""
        if self._queued:
            self._copies.wait(self._event)
            self._queued = False
        return self._view

    def commit(self) -> torch.Tensor:
        """Queue the copy of what was written since ``begin`` (nothing to do on the CPU)."""
        if self._copies is not None:
            self._copies.copy(self.device_tensor, self.host, self._event)
            self._queued = True
        return self.device_tensor

    def write(self, values) -> torch.Tensor:
        """``begin``, assign ``values`` to the whole host copy, ``commit``."""
        self.begin()[...] = values
        return self.commit()
