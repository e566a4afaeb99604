import math

import pytest
import torch

from foresight_compile import ForesightValueError, Options
from toy import ToyDiT, toy_loop


def test_unknown_option_names_the_key_and_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        Options.from_dict({"treshold": 0.5})
    assert "'treshold'" in str(e.value) and "threshold" in str(e.value) and "policy" in str(e.value)


@pytest.mark.parametrize("key,value", [
    ("policy", "fastest"), ("decision", "suffix"), ("lowering", "tensorrt"), ("form", "tree"),
    ("warmup", -1), ("warmup", 1.5), ("warmup", "8"), ("warmup", True), ("threshold", 0),
    ("threshold", math.nan), ("threshold", math.inf), ("threshold", -1.0),
    ("recompute_every", 0), ("recompute_every", 2.0), ("num_steps", 0), ("strict", "yes"),
])
def test_bad_value_names_the_key(key, value):
    with pytest.raises(ForesightValueError) as e:
        Options.from_dict({key: value})
    assert repr(key) in str(e.value) or f"'{key}'" in str(e.value)


def test_foresight_needs_two_warmup_steps():
    with pytest.raises(ValueError, match="'warmup' must be >= 2"):
        Options(policy="foresight", warmup=1)
    assert Options(policy="static", warmup=0).warmup == 0


def test_fractional_warmup_resolves_against_step_count():
    opts = Options(warmup=0.2)
    assert opts.warmup_steps(None) is None
    assert opts.warmup_steps(50) == 10
    assert Options(warmup=0.2, num_steps=30).warmup_steps(30) == 6
    assert Options(warmup=5).warmup_steps(50) == 5


def test_bad_option_through_torch_compile_is_a_value_error():
    fast = torch.compile(ToyDiT(), backend="foresight", options={"policy": "foresite"})
    with pytest.raises(ValueError, match="'policy'.*'foresight'"):
        toy_loop(fast, 2)
