"""Typed configuration of the app, shared by app.py, the deployments and the CLI.

``AppArgs`` is what serve.yaml's ``args`` and ``trtserve serve``'s flags fill in. Knobs that
may change live (the retry policy and body limits for the Router, faults for the replicas)
travel as Serve ``user_config``, so ``serve deploy`` with new values reconfigures running
replicas instead of replacing them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from engines.backend import BACKENDS
from engines.faults import Fault
from engines.models import BUILTIN, DEFAULT_CACHE_DIR

from .http import DEFAULT_MAX_JSON_BYTES
from .policy import RetryPolicy


class ModelArgs(BaseModel):
    """One served model: a built-in name or an .onnx path, with its own limits. The batching
    knobs left unset take the app's."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_batch: int | None = Field(default=None, ge=1)
    version: str = "1"
    batch_size: int | None = Field(default=None, ge=1)
    max_queue_delay_us: int | None = Field(default=None, ge=0)
    preferred_batch_sizes: list[int] | None = None


class AppArgs(BaseModel):
    """Everything ``build_app`` needs. See README.md, "Configuration", for each knob."""

    model_config = ConfigDict(extra="forbid")

    models: list[str | ModelArgs] = Field(default_factory=lambda: list(BUILTIN))
    backend: str = "auto"
    replicas: int = Field(default=2, ge=1)
    gpus_per_replica: Literal["auto"] | float = "auto"
    cpus_per_replica: float = Field(default=0.5, ge=0)
    router_replicas: Literal["auto"] | int = "auto"
    router_cpus: float = Field(default=0.25, ge=0)
    router_batches_in_flight: Literal["auto"] | int = "auto"
    max_batch: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=32, ge=1)
    max_queue_delay_us: int = Field(default=0, ge=0)
    preferred_batch_sizes: list[int] = Field(default_factory=list)
    ort_threads: int | None = Field(default=None, ge=1)
    ort_allow_spinning: bool = False
    cuda_batch_buckets: bool = True
    replica_huge_pages: bool = False
    pool_size: Literal["auto"] | int = "auto"
    spares: int = Field(default=1, ge=0)
    engine_max_ongoing_requests: int = Field(default=32, ge=1)
    engine_max_queued_requests: int = Field(default=64, ge=1)
    router_max_ongoing_requests: int = Field(default=256, ge=1)
    router_max_queued_requests: int = Field(default=1024, ge=1)
    health_check_period_s: float = Field(default=2.0, gt=0)
    exit_after_device_failure_s: float = Field(default=0.5, ge=0)
    # Serve's own line per call in the Router's and every replica's log: off, because the
    # ingress already logs each HTTP request, metrics count them, and the Router logs one JSON
    # line for each request that retried or failed (docs/metrics.md).
    access_log: bool = False
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_json_body_bytes: int = Field(default=DEFAULT_MAX_JSON_BYTES, ge=1024)
    cache_dir: str = str(DEFAULT_CACHE_DIR)
    retry: dict[str, Any] = Field(default_factory=dict)
    faults: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in BACKENDS:
            raise ValueError(f"unknown backend '{value}'; choose one of {', '.join(BACKENDS)}")
        return value

    @field_validator("router_replicas", "pool_size", "router_batches_in_flight")
    @classmethod
    def _auto_or_count(cls, value: str | int, info: ValidationInfo) -> str | int:
        if value != "auto" and int(value) < 1:
            raise ValueError(f"{info.field_name} must be 'auto' or a number >= 1")
        return value

    @field_validator("gpus_per_replica")
    @classmethod
    def _gpus(cls, value: str | float) -> str | float:
        if value != "auto" and float(value) < 0:
            raise ValueError("gpus_per_replica must be 'auto' or a number >= 0")
        return value

    @field_validator("retry")
    @classmethod
    def _retry(cls, value: dict[str, Any]) -> dict[str, Any]:
        RetryPolicy.from_dict(value)
        return value

    @field_validator("faults")
    @classmethod
    def _faults(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for raw in value:
            Fault.from_dict(raw)
        return value

    def model_list(self) -> list[ModelArgs]:
        """Every model with each knob it left unset filled in from the app's."""
        out = [m if isinstance(m, ModelArgs) else ModelArgs(model=m) for m in self.models]
        if not out:
            raise ValueError("no models to serve")
        inherited = ("max_batch", "batch_size", "max_queue_delay_us", "preferred_batch_sizes")
        return [
            m.model_copy(update={k: getattr(self, k) for k in inherited if getattr(m, k) is None})
            for m in out
        ]

    def engine_config(self) -> dict[str, Any]:
        """The EngineReplica's constructor argument (changing it replaces replicas)."""
        return {
            "models": [m.model_dump() for m in self.model_list()],
            "backend": self.backend,
            "pool_size": self.pool_size,
            "replicas": self.replicas,
            "spares": self.spares,
            "cache_dir": self.cache_dir,
            "exit_after_device_failure_s": self.exit_after_device_failure_s,
            "health_check_period_s": self.health_check_period_s,
            "ort_threads": self.ort_threads,
            "ort_allow_spinning": self.ort_allow_spinning,
            "cuda_batch_buckets": self.cuda_batch_buckets,
        }

    def engine_user_config(self) -> dict[str, Any]:
        """What an EngineReplica takes live: its faults."""
        return {"faults": self.faults}

    def router_user_config(self, routers: int) -> dict[str, Any]:
        """What the Router takes live: the retry policy (local retries included: it sends
        them with every attempt), the body limits, and how many batches it keeps in flight,
        which depends on how many ``routers`` share the replicas."""
        return {
            "retry": self.retry,
            "routers": routers,
            "batches_in_flight": self.router_batches_in_flight,
            "max_body_bytes": self.max_body_bytes,
            "max_json_body_bytes": self.max_json_body_bytes,
        }


def cache_path(raw: str) -> Path:
    return Path(raw).expanduser()
