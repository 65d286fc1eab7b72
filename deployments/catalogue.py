"""What the engine replicas serve: each model's name, version, backend and IOSpec.

Asked of one replica (they all hold every model) and kept until the set of live replicas
changes: after a redeploy with other models or another backend, the next request validates
against the new specs, not the ones first seen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from engines.errors import RetriesExhausted, UnknownModel
from engines.spec import IOSpec

from .batcher import BatchPolicy


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    backend: str
    spec: IOSpec
    batching: BatchPolicy = BatchPolicy(batch_size=1)
    concurrency: int = 1  # executions one replica runs at once for this model

    @property
    def platform(self) -> str:
        """The protocol's platform name (Triton's, where it has one)."""
        return {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}.get(
            self.backend, f"{self.backend}_plan"
        )


class ModelCatalogue:
    """``describe`` asks one replica for its ``describe()`` report; ``live`` gives the ids of
    the live replicas (None while unknown)."""

    def __init__(
        self,
        describe: Callable[[], Awaitable[dict[str, Any]]],
        live: Callable[[], frozenset[str] | None],
    ) -> None:
        self._describe = describe
        self._live = live
        self._models: dict[str, ModelInfo] | None = None
        self._seen: frozenset[str] | None = None

    async def models(self, timeout_s: float = 60.0) -> dict[str, ModelInfo]:
        live = self._live()
        if self._models is None or (live is not None and live != self._seen):
            try:
                described = await asyncio.wait_for(self._describe(), timeout_s)
            except TimeoutError:
                raise RetriesExhausted(
                    f"no engine replica answered within {timeout_s:g} s; none is up yet?"
                ) from None
            self._models = {
                name: ModelInfo(name, m["version"], m["backend"], m["spec"],
                                BatchPolicy.for_model(m["batching"], m["spec"]),
                                int(m["concurrency"]))
                for name, m in described["models"].items()
            }
            self._seen = live
        return self._models

    async def model(self, name: str, version: str | None = None) -> ModelInfo:
        known = await self.models()
        info = known.get(name)
        if info is None:
            raise UnknownModel(f"no model '{name}'; serving: {', '.join(sorted(known))}")
        if version not in (None, "", info.version):
            raise UnknownModel(f"model '{name}' has no version '{version}' (it has {info.version})")
        return info
