"""Fault injection at the backend boundary, for tests, chaos runs and demos.

A FaultyEngine wraps any Engine; its contexts consult the process's FaultInjector before
each execution. Faults behave as the real failures do, as seen from above the backend:

- ``context``: the next ``count`` executions fail as a rejected enqueue would
  (ContextFailure). A fresh context then succeeds.
- ``device``: sticky. Every later execution in this process fails with DeviceFailure, a new
  context included, as after a CUDA illegal-address error.
- ``cuda``: the real thing. The next execution first runs a kernel that writes outside any
  allocation (``cuda.provoke_illegal_address``), then goes ahead; the backend's own call meets
  the broken context, fails with CUDA error 700, and the backend's error mapping makes it
  DeviceFailure. Nothing here pretends: every later CUDA call in the process fails because the
  GPU state really is lost. It strikes GPU 0 of this process (a Serve replica's own GPU, as
  Ray sets CUDA_VISIBLE_DEVICES), is refused at injection where there is none, and breaks only
  what runs on it: an engine on the CPU goes on answering, as it would after a real fault.
- ``hang``: the next ``count`` executions block for ``seconds`` and then complete, unless the
  context is cancelled meanwhile (as ONNX Runtime's ``RunOptions.terminate`` stops a run):
  then they fail with ContextFailure at once.
- ``crash``: the next execution ends the process at once (``os._exit``), as a segfault would.
- ``execution``: the next ``count`` executions fail with ExecutionError, deterministic and
  not sticky, as a kernel that rejects an input value would (CUDA's invalid value). With a
  ``marker`` it is a poison request: it fails every batch it is in, and only those.

``model`` restricts a fault to one model; None means any model in this process. ``marker``
restricts it to executions whose input carries it: some row of the first input tensor starts
with that value (a query of death, in tests: one bad request among good ones). ``count``
means nothing to the sticky kinds (``device``, ``cuda``): they fire once, and that is final.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from .backend import Context, Engine
from .cuda import no_device_reason, provoke_illegal_address
from .errors import ContextFailure, DeviceFailure, ExecutionError, InvalidInput
from .spec import IOSpec

log = logging.getLogger(__name__)

FaultKind = Literal["context", "device", "cuda", "hang", "crash", "execution"]
KINDS: tuple[str, ...] = ("context", "device", "cuda", "hang", "crash", "execution")


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    count: int = 1
    seconds: float = 0.0
    model: str | None = None
    marker: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidInput(f"unknown fault kind '{self.kind}'; choose one of {KINDS}")
        if self.count < 1:
            raise InvalidInput(f"fault count must be at least 1, got {self.count}")
        if self.kind == "hang" and self.seconds <= 0:
            raise InvalidInput("a hang fault needs seconds > 0")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Fault:
        unknown = set(raw) - {"kind", "count", "seconds", "model", "marker"}
        if unknown:
            raise InvalidInput(f"unknown fault field(s) {sorted(unknown)}")
        try:
            return cls(
                kind=raw["kind"],
                count=int(raw.get("count", 1)),
                seconds=float(raw.get("seconds", 0.0)),
                model=raw.get("model"),
                marker=None if raw.get("marker") is None else float(raw["marker"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"malformed fault {dict(raw)}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FaultInjector:
    """The faults armed in this process. Thread-safe: contexts run on worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: list[list[Any]] = []  # [fault, remaining]
        self._device_failed: str | None = None
        self.fired: dict[str, int] = {k: 0 for k in KINDS}

    def inject(self, fault: Fault) -> None:
        """Arm ``fault``. A ``cuda`` fault is refused (InvalidInput) where this process sees no
        GPU: checked here, in the process it would break, not where the Fault is written."""
        if fault.kind == "cuda":
            reason = no_device_reason(0)
            if reason is not None:
                raise InvalidInput(f"a 'cuda' fault needs a CUDA GPU in this process: {reason}")
        with self._lock:
            self._armed.append([fault, fault.count])
        log.warning("fault armed: %s", fault)

    def clear(self) -> None:
        """Disarm pending faults. A device fault that already fired stays: it is sticky."""
        with self._lock:
            self._armed.clear()

    def pending(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{**f.to_dict(), "remaining": n} for f, n in self._armed]

    def _take(self, model: str, inputs: Mapping[str, np.ndarray]) -> Fault | None:
        with self._lock:
            for entry in self._armed:
                fault, remaining = entry
                if fault.model not in (None, model):
                    continue
                if fault.marker is not None and not _marked(inputs, fault.marker):
                    continue
                if fault.kind == "device":
                    self._armed.remove(entry)
                    self._device_failed = f"injected device fault (model {model})"
                elif fault.kind == "cuda" or remaining <= 1:
                    self._armed.remove(entry)
                else:
                    entry[1] = remaining - 1
                self.fired[fault.kind] += 1
                return fault
        return None

    def check_device(self, model: str) -> None:
        """Raise DeviceFailure if an injected device fault has fired in this process."""
        if self._device_failed is not None:
            raise DeviceFailure(f"{model}: {self._device_failed}; every CUDA call fails")

    def before_execute(
        self,
        model: str,
        generation: int,
        inputs: Mapping[str, np.ndarray],
        cancelled: threading.Event,
    ) -> None:
        """Called at the backend boundary, before the real execution."""
        self.check_device(model)
        fault = self._take(model, inputs)
        if fault is None:
            return
        if fault.kind == "context":
            raise ContextFailure(
                f"{model} (context {generation}): injected fault: enqueue rejected"
            )
        if fault.kind == "device":
            raise DeviceFailure(f"{model}: {self._device_failed}; every CUDA call fails")
        if fault.kind == "execution":
            raise ExecutionError(f"{model} (context {generation}): injected fault: the kernel "
                                 f"rejects an input value (cudaErrorInvalidValue)")
        if fault.kind == "cuda":
            code = provoke_illegal_address(0)
            log.critical("injected cuda fault (model %s): the kernel's synchronization reported "
                         "CUDA error %d; the real execution follows", model, code)
            return
        if fault.kind == "hang":
            if cancelled.wait(fault.seconds):
                raise ContextFailure(f"{model} (context {generation}): hang cancelled")
            return
        log.critical("injected crash: ending process %d", os.getpid())
        os._exit(17)


def _marked(inputs: Mapping[str, np.ndarray], marker: float) -> bool:
    first = next(iter(inputs.values()), None)
    if first is None or first.size == 0:
        return False
    rows = first.reshape(first.shape[0], -1) if first.ndim > 1 else first.reshape(-1, 1)
    return bool(np.any(rows[:, 0] == marker))


class FaultyContext:
    def __init__(self, inner: Context, model: str, injector: FaultInjector) -> None:
        self.inner = inner
        self.generation = inner.generation
        self._model = model
        self._injector = injector
        self._cancelled = threading.Event()

    def execute(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._injector.before_execute(self._model, self.generation, inputs, self._cancelled)
        return self.inner.execute(inputs)

    def cancel(self) -> None:
        self._cancelled.set()
        self.inner.cancel()

    def close(self) -> None:
        self.inner.close()


class FaultyEngine:
    """An Engine whose contexts pass through ``injector`` before each execution."""

    def __init__(self, inner: Engine, injector: FaultInjector) -> None:
        self.inner = inner
        self.injector = injector
        self.name: str = inner.name
        self.backend: str = inner.backend
        self.device: str = inner.device
        self.spec: IOSpec = inner.spec

    def create_context(self, generation: int) -> FaultyContext:
        return FaultyContext(self.inner.create_context(generation), self.name, self.injector)

    def close(self) -> None:
        self.inner.close()
