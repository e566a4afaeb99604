"""Engines of exported graph-form models: the manifest contract, the runtime-independent
driver, onnxruntime and TensorRT."""
