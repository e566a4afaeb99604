"""Exceptions raised by foresight-compile. Messages say what was wrong and how to fix it.

This module is the ground floor: every other module may import it, it imports nothing of
the package (see docs/ARCHITECTURE.md).
"""


class ForesightError(Exception):
    """Base class of every error this package raises on purpose."""


class ForesightValueError(ForesightError, ValueError):
    """A bad option key or value."""


class BlockDiscoveryError(ForesightError):
    """The graph has no block stack that can be put behind cache branches."""


class SegmentCompileError(ForesightError):
    """Compiling, or first running, one of the program's segments failed (an Inductor
    codegen error, a symbolic-shape assertion, a lowering error). The program falls back to
    plain Inductor for that graph (``strict=True`` raises the cause instead)."""


class ForesightFallbackWarning(UserWarning):
    """The model (one graph of it) runs unaccelerated, on plain Inductor: no cacheable block
    stack, or compiling the block program failed; the message says why."""


class NotCompiledError(ForesightError, LookupError):
    """The model given to stats()/reset() was never run through backend="foresight"."""


class ExportError(ForesightError):
    """The model could not be exported (graph break, dynamic shapes, exporter failure)."""


class ManifestMismatchError(ForesightError, ValueError):
    """An exported model or engine does not match its manifest."""


def describe(error: BaseException) -> str:
    """``Type: first line of the message``, the cause as a warning or a reason names it
    (an ``InductorError`` reads ``InductorError: AssertionError: ...``)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def dynamo_control(error: BaseException) -> bool:
    """True for the exceptions Dynamo raises through a backend to steer its own compile
    (restart the analysis, skip the frame): never a failure to fall back from."""
    from torch._dynamo.exc import RestartAnalysis, SkipFrame

    return isinstance(error, (RestartAnalysis, SkipFrame))


def surfaced(error: Exception) -> Exception:
    """The same error, made to pass through Dynamo unwrapped.

    Dynamo wraps backend exceptions in ``BackendCompilerFailed`` except those deriving from
    its ``ShortenTraceback``; deriving from it lets a caller's ``except ValueError`` catch a
    bad option as the ``ValueError`` it is. Surfacing an already surfaced error returns it.
    """
    from torch._dynamo.exc import ShortenTraceback

    if isinstance(error, ShortenTraceback):
        return error
    cls = type(error)

    class Surfaced(cls, ShortenTraceback):  # type: ignore[misc, valid-type]
        def __init__(self, message: str) -> None:
            ShortenTraceback.__init__(self, message, first_useful_frame=None)

    Surfaced.__name__ = Surfaced.__qualname__ = cls.__name__
    Surfaced.__module__ = cls.__module__
    return Surfaced(str(error))
