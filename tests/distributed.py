"""Run a function on N gloo ranks (CPU processes) from a test, without hanging.

``spawn_ranks(fn, world_size, *args)`` starts ``world_size`` processes with
torch.multiprocessing (start method "spawn"), each calling ``fn(rank, world_size, *args)``
after joining a gloo process group, and returns their results in rank order:

* rendezvous through a ``FileStore`` in a fresh temporary directory: no TCP port to pick,
  so parallel test sessions never race for one;
* the process group's timeout (``pg_timeout_s``) turns a collective mismatch (ranks taking
  different branches) into an error instead of gloo's 30-minute wait;
* a hard wall-clock deadline (``timeout_s``) after which every child is killed and the
  test fails with ``TimeoutError``;
* a rank's exception comes back with its traceback (``RankError``).

``fn`` must be a module-level function of an importable module (spawn pickles it by name).
In each child, ``torch.accelerator.device_count()`` returns 1: diffusers divides by it
when it picks a rank's device, and a CPU-only build answers 0.
"""
from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp


class RankError(RuntimeError):
    """A rank raised; the message holds its traceback."""


def distributed_unavailable() -> str | None:
    """Why 2-process gloo tests cannot run here, or None."""
    if not torch.distributed.is_available():
        return "torch.distributed is not available in this build"
    if not torch.distributed.is_gloo_available():
        return "the gloo backend is not available in this build"
    return None


def _entry(rank: int, world_size: int, store_dir: str, pg_timeout_s: float, threads: int,
           fn, args) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(threads)
    torch.accelerator.device_count = lambda: 1  # diffusers: rank % device_count()
    import torch.distributed as dist
    store = dist.FileStore(os.path.join(store_dir, "store"), world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=pg_timeout_s))
    try:
        value = ("ok", fn(rank, world_size, *args))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        value = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    with open(os.path.join(store_dir, f"result{rank}.pkl"), "wb") as f:
        pickle.dump(value, f)
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the peer may be gone already
        pass
    if value[0] == "error":
        os._exit(1)


def spawn_ranks(fn, world_size: int = 2, *args, timeout_s: float = 600,
                pg_timeout_s: float = 60, threads: int = 1) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; their results."""
    with tempfile.TemporaryDirectory(prefix="fc_dist_") as d:
        ctx = mp.start_processes(_entry, args=(world_size, d, pg_timeout_s, threads, fn, args),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks still running after {timeout_s} s: killed")
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            pass  # the result files carry the tracebacks
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            for p in ctx.processes:
                p.join(5)
        results, errors = [], []
        for r in range(world_size):
            path = os.path.join(d, f"result{r}.pkl")
            if not os.path.exists(path):
                errors.append(f"rank {r} exited without a result (exit code "
                              f"{ctx.processes[r].exitcode})")
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                errors.append(f"rank {r} failed: {value}")
            results.append(value)
        if errors:
            raise RankError("\n".join(errors))
        return results
