"""What a model takes and gives: tensor names, dtypes, shapes with dynamic dims, batch limits.

``IOSpec.validate`` is the single place where a request's tensors are checked, so the router
(before any replica sees a request) and the replica (before any context runs) agree on what a
bad input is, and the message always names the tensor, what was expected and what came.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .errors import InvalidInput

DYNAMIC = -1


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join("?" if d == DYNAMIC else str(d) for d in shape) + "]"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor. ``shape`` uses -1 for a dynamic dimension.

    ``min_shape``/``max_shape`` bound the dynamic dims where the backend has a profile
    (TensorRT); ONNX Runtime leaves them None (unbounded, except for the batch limit).
    """

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    min_shape: tuple[int, ...] | None = None
    max_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def batched(self) -> bool:
        """A dynamic leading dim is the batch dimension, as in every model trtserve builds."""
        return len(self.shape) > 0 and self.shape[0] == DYNAMIC

    def describe(self) -> str:
        return f"{self.name}: {self.dtype.name}{_shape_text(self.shape)}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "dtype": self.dtype.name,
            "shape": list(self.shape),
        }
        if self.min_shape is not None:
            out["min_shape"] = list(self.min_shape)
        if self.max_shape is not None:
            out["max_shape"] = list(self.max_shape)
        return out

    def check(self, value: Any, max_batch: int | None) -> np.ndarray:
        """Return ``value`` as an ndarray of this spec, or raise InvalidInput naming it."""
        if not isinstance(value, np.ndarray):
            raise InvalidInput(
                f"input '{self.name}': expected a numpy array of {self.dtype.name}, "
                f"got {type(value).__name__}"
            )
        if value.dtype != self.dtype:
            raise InvalidInput(
                f"input '{self.name}': expected dtype {self.dtype.name}, got {value.dtype.name}"
            )
        if value.ndim != len(self.shape):
            raise InvalidInput(
                f"input '{self.name}': expected shape {_shape_text(self.shape)} "
                f"(rank {len(self.shape)}), got {list(value.shape)} (rank {value.ndim})"
            )
        for axis, (want, got) in enumerate(zip(self.shape, value.shape, strict=True)):
            if want != DYNAMIC and want != got:
                raise InvalidInput(
                    f"input '{self.name}': expected shape {_shape_text(self.shape)}, got "
                    f"{list(value.shape)} (dimension {axis} must be {want})"
                )
            if got == 0:
                raise InvalidInput(
                    f"input '{self.name}': dimension {axis} is 0; an empty tensor has "
                    f"nothing to infer on"
                )
        if self.min_shape is not None and self.max_shape is not None:
            for axis, (lo, hi, got) in enumerate(
                zip(self.min_shape, self.max_shape, value.shape, strict=True)
            ):
                if not lo <= got <= hi:
                    raise InvalidInput(
                        f"input '{self.name}': dimension {axis} is {got}, outside the engine "
                        f"profile [{lo}, {hi}] (min {list(self.min_shape)}, "
                        f"max {list(self.max_shape)})"
                    )
        if self.batched and max_batch is not None and value.shape[0] > max_batch:
            raise InvalidInput(
                f"input '{self.name}': batch {value.shape[0]} is over this model's "
                f"limit of {max_batch}"
            )
        return value


@dataclass(frozen=True)
class IOSpec:
    """A model's inputs and outputs. ``max_batch`` None means no limit (ONNX Runtime)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch: int | None = None
    _by_name: dict[str, TensorSpec] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "_by_name", {t.name: t for t in self.inputs})

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def with_max_batch(self, max_batch: int | None) -> IOSpec:
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        return replace(self, max_batch=max_batch)

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "max_batch": self.max_batch,
        }

    def validate(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Check every tensor; return them in the model's input order.

        Raises InvalidInput for a missing, unknown or malformed tensor, or for batched inputs
        whose batch sizes disagree.
        """
        if not isinstance(inputs, Mapping):
            raise InvalidInput(
                f"inputs must be a mapping of tensor name to numpy array, "
                f"got {type(inputs).__name__}"
            )
        unknown = sorted(str(k) for k in inputs if k not in self._by_name)
        if unknown:
            raise InvalidInput(
                f"unknown input tensor(s) {unknown}; this model takes "
                + ", ".join(t.describe() for t in self.inputs)
            )
        missing = [t.name for t in self.inputs if t.name not in inputs]
        if missing:
            raise InvalidInput(
                f"missing input tensor(s) {missing}; this model takes "
                + ", ".join(t.describe() for t in self.inputs)
            )
        checked = {t.name: t.check(inputs[t.name], self.max_batch) for t in self.inputs}
        batches = {t.name: checked[t.name].shape[0] for t in self.inputs if t.batched}
        if len(set(batches.values())) > 1:
            raise InvalidInput(f"inputs disagree on the batch size: {batches}")
        return checked


def example_inputs(spec: IOSpec, seed: int | None = None) -> dict[str, np.ndarray]:
    """The smallest valid request: batch 1, every dynamic dim at its minimum (or 1).

    Zeros without ``seed`` (a canary); seeded standard-normal values with one (a benchmark).
    """
    rng = None if seed is None else np.random.default_rng(seed)
    inputs = {}
    for t in spec.inputs:
        shape = tuple(
            (t.min_shape[i] if t.min_shape else 1) if d == DYNAMIC else d
            for i, d in enumerate(t.shape)
        )
        if rng is None:
            inputs[t.name] = np.zeros(shape, dtype=t.dtype)
        else:
            inputs[t.name] = rng.standard_normal(shape).astype(t.dtype)
    return inputs
