"""Runtime: reuse controller, policies, cache buffers and executors.

The engines of exported models are imported on first use, so importing the runtime never
imports onnxruntime or tensorrt: ``OrtEngine`` (onnxruntime) and ``TrtEngine`` (TensorRT,
defined in ``foresight_compile.tensorrt``)."""

_LAZY = {"OrtEngine": "foresight_compile.runtime.ort_engine",
         "ExportedEngine": "foresight_compile.runtime.ort_engine",
         "TrtEngine": "foresight_compile.tensorrt"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
