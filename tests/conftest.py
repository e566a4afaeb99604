import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Under pytest-xdist (pyproject's addopts) the workers split the cores this process may run
# on (its affinity, not the host's count): two workers on two cores do not run four threads.
# (sched_getaffinity is Linux-only: elsewhere the host's count.)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (_CORES or 1) // _WORKERS))


def pytest_configure(config):
    config.addinivalue_line("markers", "shared_dynamo: tests share compiled state from a "
                            "module fixture; do not reset Dynamo around each test")


@pytest.fixture(autouse=True)
def fresh_dynamo(request):
    # Dynamo caches compiled code per code object (8 entries): a test that compiles a new
    # model instance must not inherit another test's entries.
    if request.node.get_closest_marker("shared_dynamo"):
        yield
        return
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()
