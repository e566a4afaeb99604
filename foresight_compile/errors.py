"""Exceptions raised by foresight-compile. Messages say what was wrong and how to fix it."""


class ForesightError(Exception):
    """Base class of every error this package raises on purpose."""


class ForesightValueError(ForesightError, ValueError):
    """A bad option key or value."""


class BlockDiscoveryError(ForesightError):
    """The graph has no block stack that can be put behind cache branches."""


class NotCompiledError(ForesightError, LookupError):
    """The model given to stats()/reset() was never run through backend="foresight"."""
