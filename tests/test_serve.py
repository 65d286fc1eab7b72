"""The app on a real local Ray cluster: GPU pinning, local and cross-replica retries, and
the errors a caller sees when retries cannot help. Faults are injected at the backend
boundary of real ONNX Runtime replicas."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
import requests
import yaml
from ray import serve
from ray.serve._private.constants import SERVE_NAMESPACE
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema

from deployments.app import APP_NAME
from engines import models
from engines.errors import InvalidInput, ReplicaFailure

from .serving import (
    FaultAt,
    X,
    deploy,
    describe_all,
    inject,
    load,
    load_until,
    local_serve,
    replica_died_under,
    replica_ids,
    requests_seen,
    wait_until,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def http_port() -> Iterator[int]:
    # Logical GPUs: Ray schedules num_gpus on a CPU machine as it would on real ones.
    with local_serve(num_gpus=2) as port:
        yield port


def _assert_all_answered(results: list) -> list[list[dict]]:
    trails = []
    for inputs, result in results:
        assert not isinstance(result, BaseException), repr(result)
        outputs, trail = result
        np.testing.assert_allclose(
            outputs["probs"], models.tiny_reference(inputs["x"])["probs"], rtol=1e-5, atol=1e-6
        )
        trails.append(trail)
    return trails


def test_each_replica_gets_its_own_gpu_or_a_share(http_port: int, cache_dir: Path) -> None:
    deploy(cache_dir, gpus_per_replica=1)
    gpus = [tuple(r["device"]["ray_gpu_ids"]) for r in describe_all()]
    assert len(gpus) == 2 and all(len(g) == 1 for g in gpus)
    assert gpus[0] != gpus[1]
    deploy(cache_dir, gpus_per_replica=0.5)
    shared = [tuple(r["device"]["ray_gpu_ids"]) for r in describe_all()]
    assert len(shared) == 2 and shared[0] == shared[1]


def test_the_router_runs_on_its_replicas_own_event_loop(http_port: int, cache_dir: Path) -> None:
    deploy(cache_dir, router_replicas=2)

    def serve_loop_settings(_: object) -> tuple[bool, bool]:
        from ray.serve._private import constants

        return (constants.RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD,
                constants.RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP)

    routers = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
               if a["namespace"] == SERVE_NAMESPACE and f"{APP_NAME}#Router#" in a["name"]]
    assert len(routers) == 2, routers
    for name in routers:
        router = ray.get_actor(name, namespace=SERVE_NAMESPACE)
        # Neither user code nor the engine handle's router on a thread of its own.
        assert ray.get(router.__ray_call__.remote(serve_loop_settings)) == (False, False)


def test_a_context_fault_is_retried_in_the_same_replica(http_port: int, cache_dir: Path) -> None:
    router = deploy(cache_dir)
    victim = sorted(replica_ids())[0]
    # Two failures in total, within local_retries=2: no request can need another replica.
    inject({"kind": "context", "count": 2}, target=victim)
    trails = _assert_all_answered(load(router, total=200, in_flight=8))
    retried = [t for t in trails if any(a["outcome"] == "ContextFailure" for a in t)]
    assert retried, "the injected context faults never fired"
    # Faults count executions: a batch that met one shares its entry among its requests.
    failed_runs = {(a["replica"], a["generation"]) for t in retried for a in t
                   if a["outcome"] == "ContextFailure"}
    assert len(failed_runs) == 2, failed_runs
    for trail in retried:
        assert {a["replica"] for a in trail} == {victim}
        assert trail[-1]["outcome"] == "ok"
        generations = [a["generation"] for a in trail]
        assert len(set(generations)) == len(generations), trail


def test_a_device_fault_under_load_loses_no_request(http_port: int, cache_dir: Path) -> None:
    router = deploy(cache_dir)
    victim, survivor = sorted(replica_ids())
    fault = FaultAt(50, {"kind": "device"}, victim)
    trails = _assert_all_answered(load(router, 500, 8, on_progress=fault))
    assert fault.injected
    failed = [t for t in trails if any(a["outcome"] != "ok" for a in t)]
    assert failed, "no request ever reached the broken replica"
    for trail in failed:
        assert trail[0]["replica"] == victim and trail[0]["outcome"] == "DeviceFailure"
        assert trail[-1] == {**trail[-1], "outcome": "ok", "replica": survivor}
    assert wait_until(lambda: victim not in replica_ids() and len(replica_ids()) == 2, 60)


def test_a_replica_crashing_mid_load_loses_no_request(http_port: int, cache_dir: Path) -> None:
    router = deploy(cache_dir)
    victim = sorted(replica_ids())[0]
    fault = FaultAt(50, {"kind": "crash"}, victim)
    results = load_until(router, load(router, 300, 8, on_progress=fault),
                         replica_died_under, 8)
    _assert_all_answered(results)
    assert fault.injected
    assert replica_died_under(results)
    assert wait_until(lambda: victim not in replica_ids() and len(replica_ids()) == 2, 60)
    # A call aimed at the dead replica fails, naming it, instead of waiting out its timeout.
    with pytest.raises(ReplicaFailure, match=f"replica {victim} is gone"):
        inject({"kind": "context"}, target=victim)


def _post_tiny(port: int, timeout_s: float) -> requests.Response:
    body = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}]}
    return requests.post(
        f"http://127.0.0.1:{port}/v2/models/tiny/infer",
        json=body,
        headers={"trtserve-timeout": str(timeout_s)},
        timeout=30,
    )


def test_a_request_whose_only_replica_keeps_failing_is_a_503(
    http_port: int, cache_dir: Path
) -> None:
    deploy(cache_dir, replicas=1, faults=[{"kind": "context", "count": 1000}])
    reply = _post_tiny(http_port, 3)
    assert reply.status_code == 503, reply.text
    assert "no healthy replica left" in reply.json()["error"]
    trail = json.loads(reply.headers["trtserve-attempts"])
    assert [a["outcome"] for a in trail] == ["ContextFailure"] * 3


def test_a_tiny_deadline_is_a_504(http_port: int, cache_dir: Path) -> None:
    deploy(cache_dir, replicas=1, faults=[{"kind": "hang", "seconds": 3}])
    reply = _post_tiny(http_port, 0.5)
    assert reply.status_code == 504, reply.text
    assert "deadline passed" in reply.json()["error"]
    assert "trtserve-attempts" in reply.headers


def test_bad_input_is_refused_at_the_router(http_port: int, cache_dir: Path) -> None:
    router = deploy(cache_dir)
    router.infer.remote("tiny", X).result()
    seen = requests_seen()
    with pytest.raises(InvalidInput, match="'x': expected dtype float32, got float64"):
        router.infer.remote("tiny", {"x": X["x"].astype(np.float64)}).result()
    with pytest.raises(InvalidInput, match="unknown input tensor"):
        router.infer.remote("tiny", {"y": X["x"]}).result()
    assert requests_seen() == seen


def test_retry_and_faults_change_live_through_a_config_deploy(
    http_port: int, cache_dir: Path
) -> None:
    config = yaml.safe_load((Path(__file__).parent.parent / "serve.yaml").read_text())
    app = config["applications"][0]
    app["args"].update(models=["tiny"], cpus_per_replica=0, router_cpus=0,
                       cache_dir=str(cache_dir))
    del config["http_options"]  # this module's Serve already listens on its own port
    # deploy_apps is what `serve deploy` reaches through the dashboard.
    client = _get_global_client()
    if "trtserve" in serve.status().applications:
        serve.delete("trtserve")
    client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)
    before = replica_ids()
    live = copy.deepcopy(config)
    live["applications"][0]["deployments"] = [
        {"name": "EngineReplica",
         "user_config": {"local_retries": 2, "faults": [{"kind": "context", "count": 1}]}},
        {"name": "Router", "user_config": {"retry": {"max_attempts": 2}}},
    ]
    client.deploy_apps(ServeDeploySchema.model_validate(live), _blocking=True)
    assert wait_until(
        lambda: all(r["faults_pending"] for r in describe_all()), timeout_s=30
    ), describe_all()
    assert replica_ids() == before  # reconfigured in place, not replaced
    router = serve.get_app_handle("trtserve")
    _, trail = router.infer_with_trail.remote("tiny", X).result()
    assert [a["outcome"] for a in trail] == ["ContextFailure", "ok"]


def _first_four(path: Path, row_values: int) -> Path:
    """A model whose row of inputs is large and whose answer is four numbers."""
    from onnx import TensorProto, helper, numpy_helper, save

    bounds = [numpy_helper.from_array(np.array([v], np.int64), name)
              for name, v in (("starts", 0), ("ends", 4), ("axes", 1))]
    graph = helper.make_graph(
        [helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["head"])], "first_four",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", row_values])],
        [helper.make_tensor_value_info("head", TensorProto.FLOAT, ["N", 4])], bounds)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    save(model, path)
    return path


def test_a_handle_call_by_value_carries_inputs_over_grpcs_default_limit(
    http_port: int, cache_dir: Path, tmp_path: Path
) -> None:
    # Serve's gRPC transport (`_by_reference=False`) refuses a call over 4 MiB by default,
    # where one by reference has no limit: the Router's gRPC server takes gRPC's own 2 GiB.
    row = 1_200_000
    model = _first_four(tmp_path / "first_four.onnx", row)
    router = deploy(cache_dir, models=[str(model)]).options(_by_reference=False)
    x = np.random.default_rng(0).standard_normal((1, row)).astype(np.float32)
    assert x.nbytes > 4 * 1024 * 1024
    outputs = router.infer.remote("first_four", {"x": x}).result()
    np.testing.assert_array_equal(outputs["head"], x[:, :4])
    with pytest.raises(InvalidInput, match="'x': expected dtype float32, got float64"):
        router.infer.remote("first_four", {"x": x.astype(np.float64)}).result()
