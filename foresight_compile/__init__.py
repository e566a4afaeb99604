"""foresight-compile: a torch.compile backend that reuses DiT block outputs across steps.

    fast = torch.compile(model, backend="foresight", options={"policy": "foresight"})

The backend is registered through the ``torch_dynamo_backends`` entry point, so the line
above needs no import. This module adds the run-time API: ``stats(model)``,
``reset(model)``, ``explain(model, *inputs)`` (before compiling: what will be cached, what
breaks the graph), ``plan_cache(model, *inputs)`` (before running: the cache bytes per
branch, on shape-only inputs too), the call contexts ``generation()`` and ``branch()``, the diffusers
integration ``optimize(pipe)``, ``prepare_parallel(model)`` for diffusers' context
parallelism (``enable_parallelism``), and the production exports: ``export_onnx`` (one ONNX ``If``
per block) and ``export_tensorrt`` (a TensorRT engine from that ONNX model).
"""
from foresight_compile.api import PipelineStats, Stats, branch, generation, reset, stats
from foresight_compile.backend import ForesightFallbackWarning, foresight_backend
from foresight_compile.errors import (BlockDiscoveryError, ForesightError,
                                      ForesightValueError, NotCompiledError)
from foresight_compile.explain import Explanation, explain
from foresight_compile.memory import CachePlan, plan_cache
from foresight_compile.export import export_onnx, export_tensorrt
from foresight_compile.options import Options
from foresight_compile.parallel import prepare_parallel
from foresight_compile.pipelines import calibrated_profile, optimize, restore
from foresight_compile.profiling import BlockProfile, profile_blocks
from foresight_compile.version import __version__

__all__ = ["stats", "reset", "explain", "Explanation", "plan_cache", "CachePlan", "generation", "branch", "optimize",
           "restore", "prepare_parallel",
           "calibrated_profile", "profile_blocks", "BlockProfile", "Stats", "PipelineStats", "Options",
           "foresight_backend", "ForesightError", "ForesightValueError", "BlockDiscoveryError",
           "NotCompiledError", "ForesightFallbackWarning", "export_onnx", "export_tensorrt",
           "__version__"]
