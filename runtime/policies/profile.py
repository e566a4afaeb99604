"""ProfilingDiT's block profile (arXiv 2504.03140) as data: which blocks are foreground.

Made by ``foresight_compile.profile_blocks`` (one calibration generation), read by the
``profiling`` policy, saved and loaded as JSON. ``check`` refuses a profile made for another
block list or resolution.
"""
from __future__ import annotations

import dataclasses
import json

from foresight_compile.errors import ForesightValueError

FORMAT = 1


@dataclasses.dataclass
class BlockProfile:
    model: str
    block_paths: list[str]
    input_shape: list[int]
    r_attn: list[float]
    foreground: list[bool]
    tau: float
    attention_quantile: float
    foreground_quantile: float
    query_samples: int
    seed: int
    format: int = FORMAT

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=1)

    @classmethod
    def load(cls, path: str) -> "BlockProfile":
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise ForesightValueError(f"profile {path!r} cannot be read: {e}") from None
        if data.get("format") != FORMAT:
            raise ForesightValueError(f"profile {path!r} has format {data.get('format')!r}; "
                                      f"this version reads {FORMAT}")
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = fields - set(data) - {"format"}
        if missing:
            raise ForesightValueError(f"profile {path!r} lacks {sorted(missing)}")
        return cls(**{k: v for k, v in data.items() if k in fields})

    def check(self, block_paths: list[str], input_shape: tuple[int, ...] | None = None) -> None:
        """Raise when this profile was made for another model, block list or resolution."""
        if list(block_paths) != list(self.block_paths):
            raise ForesightValueError(
                f"profile made for {len(self.block_paths)} blocks {self.block_paths[:3]}... of "
                f"{self.model}, but this model has {len(block_paths)} blocks {list(block_paths)[:3]}"
                "...: profile the model you run (foresight_compile.profile_blocks)")
        if input_shape is not None and list(input_shape) != list(self.input_shape):
            raise ForesightValueError(
                f"profile made at input shape {self.input_shape}, but the model runs at "
                f"{list(input_shape)}: attention patterns depend on resolution; profile again")
