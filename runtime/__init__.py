"""Runtime: what runs per step. The reuse controller and its per-request state, policies,
cache buffers, executors, and the engines of exported models.

The lowest floor of the package: it imports nothing from ``foresight_compile`` above it but
errors and plain data (``docs/ARCHITECTURE.md``). The engines are imported on first use,
so importing the runtime never imports onnxruntime or tensorrt: ``OrtEngine`` (onnxruntime)
and ``TrtEngine`` (TensorRT)."""

_LAZY = {"OrtEngine": "foresight_compile.runtime.engines.ort",
         "ExportedEngine": "foresight_compile.runtime.engines.exported",
         "TrtEngine": "foresight_compile.runtime.engines.tensorrt"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
