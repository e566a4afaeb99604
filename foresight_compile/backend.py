"""The ``foresight`` torch.compile backend.

Registered in the ``torch_dynamo_backends`` entry-point group, so
``torch.compile(model, backend="foresight", options={...})`` works without importing this
package. Dynamo calls ``foresight_backend(gm, example_inputs, options=...)`` once per
graph. When the graph holds no cacheable block stack, the graph is compiled by plain
Inductor with one warning saying why (``strict=True`` raises instead).
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Mapping, Sequence

import torch.fx as fx

from foresight_compile.errors import BlockDiscoveryError, ForesightValueError
from foresight_compile.options import Options

log = logging.getLogger(__name__)


class ForesightFallbackWarning(UserWarning):
    """The model runs unaccelerated (plain Inductor): no cacheable block stack."""


def _surfaced(error: Exception) -> Exception:
    """The same error, raised through Dynamo unwrapped.

    Dynamo wraps backend exceptions in ``BackendCompilerFailed`` except those deriving from
    its ``ShortenTraceback``; deriving from it lets a caller's ``except ValueError`` catch a
    bad option as the ``ValueError`` it is.
    """
    from torch._dynamo.exc import ShortenTraceback

    cls = type(error)

    class Surfaced(cls, ShortenTraceback):  # type: ignore[misc, valid-type]
        def __init__(self, message: str) -> None:
            ShortenTraceback.__init__(self, message, first_useful_frame=None)

    Surfaced.__name__ = Surfaced.__qualname__ = cls.__name__
    Surfaced.__module__ = cls.__module__
    return Surfaced(str(error))


def foresight_backend(gm: fx.GraphModule, example_inputs: Sequence[Any],
                      options: Mapping[str, Any] | None = None):
    from foresight_compile.program import ForesightProgram

    try:
        opts = Options.from_dict(options)
    except ForesightValueError as e:
        raise _surfaced(e) from None
    try:
        return ForesightProgram(gm, example_inputs, opts)
    except ForesightValueError as e:  # e.g. a profile made for another model
        raise _surfaced(e) from None
    except BlockDiscoveryError as e:
        if opts.strict:
            raise _surfaced(e) from None
        warnings.warn(f"foresight: {e}. The model runs without block reuse (plain "
                      f"{'Inductor' if opts.lowering == 'inductor' else 'eager'}).",
                      ForesightFallbackWarning, stacklevel=2)
    if opts.lowering == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx
    return compile_fx(gm, list(example_inputs))
