"""Production exports: ``export_onnx`` (one ONNX ``If`` per block, the cache as explicit
state) and ``export_tensorrt`` (a TensorRT engine from that ONNX model). The engines that
run them are in ``foresight_compile.runtime.engines``."""
from foresight_compile.export.onnx import ExportedModel, export_onnx
from foresight_compile.export.tensorrt import export_tensorrt

__all__ = ["export_onnx", "export_tensorrt", "ExportedModel"]
