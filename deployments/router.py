"""Router: the ingress (HTTP and handle calls) and the cross-replica half of the retries.

A request is validated here against the model's IOSpec (a bad one is a 400 before any
replica sees it), then tried on one replica after another within one deadline. Each attempt
picks its replica with ``choose_replica`` (so even an attempt that times out knows whom to
blame), sends with ``dispatch`` and awaits the answer inside the selection block. What to do
after a failure is decided by ``policy.RequestRetries``; this module only translates Ray's
errors into the taxonomy and acts.
"""

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter
from starlette.exceptions import HTTPException

from engines.errors import (
    DeadlineExceeded,
    InvalidInput,
    PayloadTooLarge,
    ReplicaFailure,
    RetriesExhausted,
    TrtServeError,
    UnknownModel,
)
from engines.runner import Attempt
from engines.spec import IOSpec

from . import protocol
from .policy import Ejections, RequestRetries, RetryBudget, RetryPolicy

log = logging.getLogger("ray.serve")



@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    backend: str
    spec: IOSpec


def _platform(backend: str) -> str:
    return {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}.get(
        backend, f"{backend}_plan"
    )


def as_taxonomy(exc: BaseException, replica: str | None, started: float) -> TrtServeError:
    """Ray's view of a failed attempt, in the taxonomy; the replica is named when known."""
    cause = exc.cause if isinstance(exc, RayTaskError) else exc
    if isinstance(cause, TrtServeError):
        err = cause
        if err.replica_id is None:
            err.replica_id = replica
        return err
    if isinstance(exc, RayActorError | ReplicaUnavailableError):
        what = f"replica {replica} died or became unavailable: {type(exc).__name__}"
    else:
        what = f"replica {replica} failed: {type(exc).__name__}: {exc}"
    return ReplicaFailure(what, replica_id=replica)


def _router_attempt(model: str, err: TrtServeError, started: float) -> dict[str, Any]:
    ms = round((time.perf_counter() - started) * 1000.0, 3)
    return Attempt(model, type(err).__name__, ms, err.replica_id, None, err.message).to_dict()


class RouterCore:
    """The attempt loop, over an EngineReplica handle. No FastAPI here."""

    def __init__(self, engine: DeploymentHandle) -> None:
        self.engine = engine
        self.policy = RetryPolicy()
        self.budget = RetryBudget.for_policy(self.policy)
        self.ejections = Ejections()
        self.max_body_bytes = protocol.DEFAULT_MAX_BYTES
        self._models: dict[str, ModelInfo] | None = None
        self.attempts = Counter(
            "trtserve_attempts",
            description="Attempts to run a request on a replica, by model and outcome.",
            tag_keys=("model", "outcome"),
        )
        self.requests = Counter(
            "trtserve_requests",
            description="Requests answered by the router, by model and outcome.",
            tag_keys=("model", "outcome"),
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        policy = RetryPolicy.from_dict(user_config.get("retry"))
        if (policy.budget_ratio, policy.budget_window_s, policy.budget_min_per_s) != (
            self.policy.budget_ratio,
            self.policy.budget_window_s,
            self.policy.budget_min_per_s,
        ):
            self.budget = RetryBudget.for_policy(policy)
        self.policy = policy
        self.max_body_bytes = int(user_config.get("max_body_bytes", self.max_body_bytes))

    async def models(self, timeout_s: float = 60.0) -> dict[str, ModelInfo]:
        """What the replicas serve, asked once of any replica (they all hold every model)."""
        if self._models is None:
            try:
                described = await asyncio.wait_for(self.engine.describe.remote(), timeout_s)
            except TimeoutError:
                raise RetriesExhausted(
                    f"no engine replica answered within {timeout_s:g} s; none is up yet?"
                ) from None
            self._models = {
                name: ModelInfo(name, m["version"], m["backend"], m["spec"])
                for name, m in described["models"].items()
            }
        return self._models

    async def model(self, name: str, version: str | None = None) -> ModelInfo:
        known = await self.models()
        info = known.get(name)
        if info is None:
            raise UnknownModel(f"no model '{name}'; serving: {', '.join(sorted(known))}")
        if version not in (None, "", info.version):
            raise UnknownModel(f"model '{name}' has no version '{version}' (it has {info.version})")
        return info

    async def infer(
        self,
        model: str,
        inputs: dict[str, Any],
        timeout: float | None = None,
        version: str | None = None,
    ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
        """Validate, then try replicas until one answers; raise a taxonomy error otherwise."""
        outcome = "ok"
        try:
            info = await self.model(model, version)
            checked = info.spec.validate(inputs)
            return await self._with_retries(model, checked, timeout)
        except TrtServeError as exc:
            outcome = type(exc).__name__
            raise
        finally:
            self.requests.inc(tags={"model": model, "outcome": outcome})

    async def _with_retries(
        self, model: str, inputs: dict[str, np.ndarray], timeout: float | None
    ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
        policy = self.policy
        deadline_s = policy.deadline_s if timeout is None else float(timeout)
        if not deadline_s > 0:
            raise DeadlineExceeded(f"{model}: the request's timeout ({timeout}) is not > 0")
        retries = RequestRetries(
            policy, self.budget, self.ejections, time.monotonic() + deadline_s, model
        )
        self.budget.record_request()
        while True:
            retries.check_deadline()
            started = time.perf_counter()
            try:
                outputs, trail = await self._attempt(model, inputs, retries)
            except BackPressureError:
                await asyncio.sleep(retries.backpressure_wait_s())
                continue
            except TrtServeError as err:
                if not err.trail:
                    err.trail = [_router_attempt(model, err, started)]
                for entry in err.trail:
                    self.attempts.inc(tags={"model": model, "outcome": entry["outcome"]})
                retries.after_failure(err, err.replica_id)
                continue
            for entry in trail:
                self.attempts.inc(tags={"model": model, "outcome": entry["outcome"]})
            retries.trail.extend(trail)
            return outputs, retries.trail

    async def _attempt(
        self, model: str, inputs: dict[str, np.ndarray], retries: RequestRetries
    ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
        loop = asyncio.get_running_loop()
        replica: str | None = None
        started = time.perf_counter()
        method = self.engine.infer
        try:
            # Choosing may wait (every replica excluded or full): bounded by the deadline.
            async with asyncio.timeout(retries.remaining_s()) as scope:
                async with method.choose_replica(
                    model, exclude=retries.exclude_now(), ejected=retries.ejected_now()
                ) as chosen:
                    replica = chosen.replica_id
                    scope.reschedule(loop.time() + retries.attempt_timeout_s())
                    return await method.dispatch(  # type: ignore[no-any-return]
                        chosen, model, inputs, local_retries=retries.policy.local_retries
                    )
        except TimeoutError:
            if replica is None and retries.excluded:
                raise retries.no_replica() from None
            if replica is None or retries.remaining_s() <= 0:
                # The request ran out of time; the replica (if any) is not to blame.
                raise retries.deadline_exceeded() from None
            raise ReplicaFailure(
                f"attempt on replica {replica} timed out after "
                f"{(time.perf_counter() - started):.3f} s",
                replica_id=replica,
            ) from None
        except (BackPressureError, TrtServeError):
            raise
        except Exception as exc:  # Ray's errors, translated; anything else blames the replica
            raise as_taxonomy(exc, replica, started) from None


def _error_response(err: TrtServeError) -> JSONResponse:
    headers = {protocol.TRAIL_HEADER: json.dumps(err.trail)}
    return JSONResponse(protocol.error_body(err.message), err.http_status, headers=headers)


def _timeout(header: str | None, from_body: float | None) -> float | None:
    """The request's deadline in seconds: the trtserve-timeout header, else the protocol's
    ``timeout`` parameter (microseconds on the wire, already seconds here)."""
    if header is None:
        return from_body
    try:
        value = float(header)
    except ValueError:
        raise InvalidInput(f"{protocol.TIMEOUT_HEADER} must be seconds, got {header!r}") from None
    if not value > 0 or value == float("inf"):
        raise InvalidInput(f"{protocol.TIMEOUT_HEADER} must be > 0 seconds, got {header!r}")
    return value


# serve.ingress serializes the routes when the class below is defined: everything they call
# must be defined above it.
fastapi_app = FastAPI(
    title="trtserve",
    description="Open Inference Protocol v2 (KServe / Triton HTTP) over fault-tolerant Serve",
    # A path the protocol does not define is a 404 in the protocol's shape, not a bodiless
    # 307 to a neighbouring path that a client may or may not follow.
    redirect_slashes=False,
)


# FastAPI answers routing and validation failures itself with {"detail": ...}, which
# tritonclient cannot read: every answer of this app is the protocol's {"error": ...}.
@fastapi_app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        message = (f"no route {request.method} {request.url.path}; the Open Inference "
                   f"Protocol is served under /v2")
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = (f"method {request.method} is not allowed on {request.url.path} "
                   f"(allowed: {allowed})")
    else:
        message = str(exc.detail)
    return JSONResponse(protocol.error_body(message), exc.status_code, headers=exc.headers)


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    # The protocol calls a malformed request 400; FastAPI's 422 would confuse clients.
    problems = "; ".join(
        f"{'.'.join(str(part) for part in e.get('loc', ()))}: {e.get('msg', '')}"
        for e in exc.errors()
    )
    return JSONResponse(protocol.error_body(f"malformed request: {problems}"), 400)


@serve.deployment(name="Router")
@serve.ingress(fastapi_app)
class Router:
    """The ingress. Handle methods: ``infer`` and ``infer_with_trail``; HTTP under /v2."""

    def __init__(self, engine: DeploymentHandle) -> None:
        self.core = RouterCore(engine)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.core.reconfigure(user_config)

    async def infer(
        self, model: str, inputs: dict[str, Any], *, timeout: float | None = None
    ) -> dict[str, np.ndarray]:
        outputs, _ = await self.core.infer(model, inputs, timeout)
        return outputs

    async def infer_with_trail(
        self, model: str, inputs: dict[str, Any], *, timeout: float | None = None
    ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
        return await self.core.infer(model, inputs, timeout)

    @fastapi_app.get("/v2/health/live")
    async def live(self) -> dict[str, bool]:
        return {"live": True}

    @fastapi_app.get("/v2/health/ready")
    async def ready(self) -> Response:
        ready = await self._ready_models()
        try:
            known = await self.core.models(timeout_s=10.0)
        except TrtServeError:
            known = {}
        ok = bool(known) and all(ready.get(name, False) for name in known)
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def _ready_models(self) -> dict[str, bool]:
        """A model is ready when at least one healthy replica holds it."""
        try:
            replies = await asyncio.wait_for(
                self.core.engine.broadcast("describe").results_async(return_exceptions=True),
                10.0,
            )
        except TimeoutError:
            return {}
        ready: dict[str, bool] = {}
        for reply in replies:
            if isinstance(reply, dict) and reply.get("healthy"):
                for name in reply["models"]:
                    ready[name] = True
        return ready

    @fastapi_app.get("/v2")
    async def server(self) -> dict[str, Any]:
        return protocol.server_metadata()

    @fastapi_app.get("/v2/models/{model}")
    @fastapi_app.get("/v2/models/{model}/versions/{version}")
    async def metadata(self, model: str, version: str | None = None) -> Response:
        try:
            info = await self.core.model(model, version)
        except TrtServeError as err:
            return _error_response(err)
        body = protocol.model_metadata(info.name, [info.version], _platform(info.backend),
                                       info.spec)
        return JSONResponse(body)

    @fastapi_app.get("/v2/models/{model}/ready")
    @fastapi_app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(self, model: str, version: str | None = None) -> Response:
        try:
            info = await self.core.model(model, version)
        except TrtServeError as err:
            return _error_response(err)
        ok = (await self._ready_models()).get(info.name, False)
        return JSONResponse({"name": info.name, "ready": ok}, status_code=200 if ok else 503)

    @fastapi_app.post("/v2/models/{model}/infer")
    @fastapi_app.post("/v2/models/{model}/versions/{version}/infer")
    async def http_infer(self, model: str, request: Request, version: str | None = None
                         ) -> Response:
        try:
            info = await self.core.model(model, version)
            body = await self._body(request)
            decoded = protocol.decode_infer_request(
                body,
                protocol.parse_header_length(request.headers.get(protocol.HEADER_LENGTH)),
                info.spec,
                self.core.max_body_bytes,
            )
            timeout = _timeout(request.headers.get(protocol.TIMEOUT_HEADER), decoded.timeout_s)
            outputs, trail = await self.core.infer(model, decoded.inputs, timeout, version)
            payload, headers = protocol.encode_infer_response(
                info.name,
                info.version,
                decoded.id,
                outputs,
                requested=decoded.outputs,
                binary_data_output=decoded.binary_data_output,
            )
        except TrtServeError as err:
            return _error_response(err)
        headers[protocol.TRAIL_HEADER] = json.dumps(trail)
        return Response(payload, headers=headers, media_type=headers.pop("Content-Type", None))

    async def _body(self, request: Request) -> bytes:
        limit = self.core.max_body_bytes
        declared = protocol.parse_header_length(request.headers.get("content-length"))
        if declared is not None and declared > limit:
            raise PayloadTooLarge(
                f"the request body is {declared} bytes, over the limit of {limit}"
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the request body is over the limit of {limit}")
            chunks.append(chunk)
        body = b"".join(chunks)
        return protocol.decode_content_encoding(
            body, request.headers.get("content-encoding"), limit
        )

