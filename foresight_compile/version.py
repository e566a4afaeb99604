"""The package version (one place, importable from anywhere below the public API)."""
__version__ = "0.1.0"
