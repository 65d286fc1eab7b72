"""Router: the ingress (HTTP and handle calls) in front of the engine replicas.

A request is decoded (HTTP only; http.Codec says where), validated once against the model's
IOSpec (a bad one is a 400 before any replica sees it), then handed to the attempt loop
(``attempts.AttemptLoop``), which tries one replica after another within one deadline.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations at
# class definition, and a string ``Request`` would become a query parameter.
import asyncio
import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from engines.errors import RetriesExhausted, TrtServeError

from . import protocol
from .attempts import AttemptLoop, Outputs, Trail
from .catalogue import ModelCatalogue
from .http import (
    DEFAULT_MAX_JSON_BYTES,
    Codec,
    error_response,
    fastapi_app,
    read_body,
    timeout_s,
)
from .policy import RetryPolicy
from .replica_set import live_replicas


@serve.deployment(name="Router")
@serve.ingress(fastapi_app)
class Router:
    """The ingress. Handle methods: ``infer`` and ``infer_with_trail``; HTTP under /v2."""

    def __init__(self, engine: DeploymentHandle) -> None:
        self.engine = engine
        self.attempts = AttemptLoop(engine, self._live)
        self.catalogue = ModelCatalogue(self._describe_one, self._live)
        self.max_body_bytes = protocol.DEFAULT_MAX_BYTES
        self.max_json_body_bytes = DEFAULT_MAX_JSON_BYTES
        self.codec = Codec()

    def __del__(self) -> None:
        self.codec.close()
        self.attempts.outbox.close()

    async def _describe_one(self) -> dict[str, Any]:
        """Any live replica's report. A broadcast, because it bypasses the queue limit that
        sheds requests under overload: the specs are needed most then."""
        replies = await self.engine.broadcast("describe").results_async(return_exceptions=True)
        for reply in replies:
            if isinstance(reply, dict):
                return reply
        raise RetriesExhausted("no engine replica answered describe; none is up yet?")

    def _live(self) -> frozenset[str] | None:
        return live_replicas(self.engine.app_name, self.engine.deployment_name)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.attempts.reconfigure(RetryPolicy.from_dict(user_config.get("retry")))
        self.attempts.routers = int(user_config.get("routers", 1))
        self.attempts.batches_in_flight = user_config.get("batches_in_flight", "auto")
        self.max_body_bytes = int(user_config.get("max_body_bytes", self.max_body_bytes))
        self.max_json_body_bytes = int(
            user_config.get("max_json_body_bytes", self.max_json_body_bytes)
        )

    async def infer(
        self, model: str, inputs: dict[str, Any], *, timeout: float | None = None
    ) -> Outputs:
        outputs, _ = await self.infer_with_trail(model, inputs, timeout=timeout)
        return outputs

    async def infer_with_trail(
        self, model: str, inputs: dict[str, Any], *, timeout: float | None = None
    ) -> tuple[Outputs, Trail]:
        info = await self.catalogue.model(model)
        return await self.attempts.run(info, info.spec.validate(inputs), timeout)

    @fastapi_app.post("/v2/models/{model}/infer")
    @fastapi_app.post("/v2/models/{model}/versions/{version}/infer")
    async def http_infer(self, model: str, request: Request, version: str | None = None
                         ) -> Response:
        try:
            info = await self.catalogue.model(model, version)
            body = await read_body(request, self.max_body_bytes, self.max_json_body_bytes)
            with self.attempts.metrics.codec(info.name, info.version, "input"):
                decoded = await self.codec.decode(body, request.headers, info.spec,
                                                  self.max_body_bytes, self.max_json_body_bytes)
            timeout = timeout_s(request.headers.get(protocol.TIMEOUT_HEADER), decoded.timeout_s)
            outputs, trail = await self.attempts.run(info, decoded.inputs, timeout, decoded.id)
            with self.attempts.metrics.codec(info.name, info.version, "output"):
                payload, headers = await self.codec.encode(
                    info.name,
                    info.version,
                    decoded.id,
                    outputs,
                    requested=decoded.outputs,
                    binary_data_output=decoded.binary_data_output,
                )
        except TrtServeError as err:
            return error_response(err, self.attempts.policy.backpressure_wait_s)
        headers[protocol.TRAIL_HEADER] = json.dumps(trail)
        return Response(payload, headers=headers, media_type=headers.pop("Content-Type", None))

    @fastapi_app.get("/v2/health/live")
    async def live(self) -> dict[str, bool]:
        return {"live": True}

    @fastapi_app.get("/v2/health/ready")
    async def ready(self) -> Response:
        ready = await self._ready_models()
        try:
            known = await self.catalogue.models(timeout_s=10.0)
        except TrtServeError:
            known = {}
        ok = bool(known) and all(ready.get(name, False) for name in known)
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def _ready_models(self) -> dict[str, bool]:
        """A model is ready when at least one healthy replica holds it."""
        try:
            replies = await asyncio.wait_for(
                self.engine.broadcast("describe").results_async(return_exceptions=True), 10.0
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
            info = await self.catalogue.model(model, version)
        except TrtServeError as err:
            return error_response(err)
        return JSONResponse(
            protocol.model_metadata(info.name, [info.version], info.platform, info.spec)
        )

    @fastapi_app.get("/v2/models/{model}/ready")
    @fastapi_app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(self, model: str, version: str | None = None) -> Response:
        try:
            info = await self.catalogue.model(model, version)
        except TrtServeError as err:
            return error_response(err)
        ok = (await self._ready_models()).get(info.name, False)
        return JSONResponse({"name": info.name, "ready": ok}, status_code=200 if ok else 503)

