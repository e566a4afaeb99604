import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


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
