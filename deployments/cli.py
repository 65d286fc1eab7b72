"""The ``trtserve`` command: models, build, serve, infer, bench, chaos.

Ray is imported only inside the commands that need it, so ``trtserve models`` and
``trtserve build`` start fast and work where Ray is not running.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import fields, replace
from email.message import Message
from pathlib import Path
from urllib.parse import quote

import numpy as np

from engines import models
from engines.backend import BACKENDS
from engines.models import DEFAULT_CACHE_DIR

from .ingress import DEFAULT_INGRESS, INGRESSES, ingress_env
from .protocol import (
    HEADER_LENGTH,
    TIMEOUT_HEADER,
    TRAIL_HEADER,
    encode_infer_request,
    parse_header_length,
    to_numpy_dtype,
)
from .ray_config import join_or_start, system_config

# router.py's header names, repeated here: importing router.py would import Ray into `infer`.


def cmd_models(args: argparse.Namespace) -> int:
    for name in models.BUILTIN:
        print(name)
    return 0


def cmd_bench_swap(args: argparse.Namespace) -> int:
    from .bench_swap import measure_swap

    source = models.resolve(args.model, args.cache_dir)
    print(f"measuring context replacement for {source.name} ({args.trials} trials)")
    result = measure_swap(source, args.backend, trials=args.trials)
    print(result.table())
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from engines.build import build_plan, default_backend
    from engines.errors import EngineLoadFailure

    source = models.resolve(args.model, args.cache_dir)
    try:
        # Prints TensorRT's build phases, then "cache hit: PATH" or "built PATH ... in N s".
        build_plan(source, args.backend or default_backend(), args.max_batch, args.cache_dir,
                   progress=print)
    except EngineLoadFailure as exc:
        print(f"trtserve: {exc}", file=sys.stderr)
        return 1
    return 0


def _app_args(args: argparse.Namespace) -> dict[str, object]:
    chosen: dict[str, object] = {
        "models": args.model or list(models.BUILTIN),
        "replicas": args.replicas,
        "gpus_per_replica": args.gpus_per_replica,
        "backend": args.backend,
        "cache_dir": str(args.cache_dir),
    }
    for name in ("max_batch", "cpus_per_replica", "max_body_bytes"):
        if getattr(args, name) is not None:
            chosen[name] = getattr(args, name)
    return chosen


def _check_model_names(specs: list[str], cache_dir: Path) -> None:
    """Fail before starting anything when two models would share a name."""
    seen: dict[str, str] = {}
    for spec in specs:
        name = models.resolve(spec, cache_dir).name
        if name in seen:
            raise ValueError(f"two models are named '{name}': {seen[name]} and {spec}")
        seen[name] = spec


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    import ray
    from pydantic import ValidationError
    from ray import serve

    from .app import APP_NAME, build_app
    from .config import AppArgs

    try:
        app_args = AppArgs.model_validate(_app_args(args))
        _check_model_names([m if isinstance(m, str) else m.model for m in app_args.models],
                           args.cache_dir)
    except (ValidationError, ValueError) as exc:
        print(f"trtserve: {exc}", file=sys.stderr)
        return 2
    started_ray = False
    try:
        ray.init(address="auto", logging_level=logging.WARNING)
        print("trtserve: joined the Ray cluster running on this machine; it keeps the HTTP "
              "ingress it was started with")
        if args.ingress is not None:
            print(f"trtserve: --ingress {args.ingress} is ignored: it applies only to a cluster "
                  "this command starts", file=sys.stderr)
    except ConnectionError:
        # A new head node: other processes join it with ray.init(address="auto").
        ingress = args.ingress or DEFAULT_INGRESS
        with ingress_env(ingress):
            ray.init(address="local", _system_config=system_config(),
                     logging_level=logging.WARNING)
        started_ray = True
        print(f"trtserve: started a Ray cluster with the {ingress} ingress (join it with "
              "ray.init(address='auto'))")
    stop = threading.Event()
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        print(f"trtserve: deploying {', '.join(str(m) for m in app_args.models)} on "
              f"{app_args.replicas} replica(s)...", flush=True)
        serve.run(build_app(app_args), name=APP_NAME, route_prefix="/", blocking=False)
        # Only now: Ray installs SIGTERM handlers of its own while starting, and those end the
        # process without shutting Serve down.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print(f"trtserve: ready at http://{args.host}:{args.port}/v2 "
              f"(app '{APP_NAME}'); Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            pass
        print("trtserve: shutting down", flush=True)
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown(wait_for_processes=True)
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve models on Ray Serve in the foreground until Ctrl-C or SIGTERM"
    )
    p.add_argument("--model", action="append", metavar="MODEL",
                   help="built-in name or .onnx path; repeat for several "
                        "(default: every built-in model)")
    p.add_argument("--replicas", type=int, default=2, help="EngineReplica replicas (default: 2)")
    p.add_argument("--gpus-per-replica", default="auto",
                   help="'auto' (1 where the cluster has GPUs, else 0), or a number such as "
                        "0.5 to share a GPU (default: auto)")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--max-batch", type=int, default=None,
                   help="batch limit of every model (default: unbounded on ONNX Runtime, "
                        "64 for TensorRT plans)")
    p.add_argument("--cpus-per-replica", type=float, default=None,
                   help="CPUs Ray reserves per engine replica (default: 0.5)")
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="HTTP bodies over this size get 413 (default: 64 MiB)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    p.add_argument("--ingress", choices=INGRESSES,
                   help="Serve's HTTP ingress where this command starts Ray: its bundled "
                        "HAProxy (then the Router replicas' own HTTP servers listen on every "
                        f"interface) or its Python proxy (default: {DEFAULT_INGRESS}; "
                        f"RAY_SERVE_ENABLE_HA_PROXY is not read)")
    p.set_defaults(func=cmd_serve)


class ServerError(Exception):
    """A non-2xx answer, with the protocol's error message."""

    def __init__(self, status: int, message: str, trail: str | None) -> None:
        super().__init__(f"{status} {message}")
        self.trail = trail


def _http(url: str, body: bytes | None, headers: dict[str, str], timeout_s: float
          ) -> tuple[bytes, Message]:
    request = urllib.request.Request(url, data=body, headers=headers,
                                     method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            return reply.read(), reply.headers
    except urllib.error.HTTPError as exc:
        text = exc.read()
        try:
            message = str(json.loads(text)["error"])
        except (ValueError, KeyError, TypeError):
            # Not ours: Serve's HTTP layer (or something in front of it) answered in plain text.
            message = text.decode("utf-8", "replace").strip() or exc.reason
        raise ServerError(exc.code, message, exc.headers.get(TRAIL_HEADER)) from None


def _random_input(name: str, datatype: str, shape: list[int], batch: int,
                  rng: np.random.Generator) -> np.ndarray:
    dims = [batch if d < 0 else d for d in shape]
    dtype = to_numpy_dtype(datatype)
    if dtype.kind == "f":
        return rng.standard_normal(dims).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, min(100, int(np.iinfo(dtype).max)), dims, dtype=dtype)
    if dtype.kind == "b":
        return rng.random(dims) < 0.5
    raise ValueError(f"input '{name}' is {datatype}: give it with --input {name}=FILE.npy")


def _print_trail(raw: str | None) -> None:
    for n, attempt in enumerate(json.loads(raw) if raw else [], 1):
        where = f" on replica {attempt['replica']}" if attempt.get("replica") else ""
        context = (f" (context generation {attempt['generation']})"
                   if attempt.get("generation") is not None else "")
        why = f": {attempt['message']}" if attempt.get("message") else ""
        print(f"attempt {n}: {attempt['outcome']}{where}{context} in {attempt['ms']} ms{why}")


def cmd_infer(args: argparse.Namespace) -> int:
    base = f"{args.url.rstrip('/')}/v2/models/{quote(args.model, safe='')}"
    # The server's default deadline is 30 s; wait a little past whichever deadline applies.
    wait_s = (args.timeout or 30.0) + 10.0
    try:
        given: dict[str, np.ndarray] = {}
        for item in args.input or []:
            name, sep, path = item.partition("=")
            if not sep:
                raise ValueError(f"--input takes NAME=FILE.npy, got {item!r}")
            given[name] = np.load(path, allow_pickle=False)
        metadata = json.loads(_http(base, None, {}, wait_s)[0])
        rng = np.random.default_rng(args.seed)
        inputs: dict[str, np.ndarray] = {}
        for t in metadata["inputs"]:
            name = t["name"]
            inputs[name] = (given.pop(name) if name in given
                            else _random_input(name, t["datatype"], t["shape"], args.batch, rng))
        # Tensors the model does not take still go out: the server says what is wrong.
        inputs.update(given)
        body, headers = encode_infer_request(inputs, args.binary)
        if args.timeout is not None:
            headers[TIMEOUT_HEADER] = str(args.timeout)
        payload, reply_headers = _http(f"{base}/infer", body, headers, wait_s)
    except ServerError as exc:
        _print_trail(exc.trail)
        print(f"trtserve: {exc}", file=sys.stderr)
        return 1
    except urllib.error.URLError as exc:
        reason = ("connection refused (is `trtserve serve` running there?)"
                  if isinstance(exc.reason, ConnectionRefusedError) else str(exc.reason))
        print(f"trtserve: cannot reach {args.url}: {reason}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # timeouts, resets, bad --input values or files
        print(f"trtserve: {exc}", file=sys.stderr)
        return 2
    end = parse_header_length(reply_headers.get(HEADER_LENGTH))
    for out in json.loads(payload[:end])["outputs"]:
        dtype = to_numpy_dtype(out["datatype"])
        print(f"output {out['name']}: shape {out['shape']} dtype {dtype.name}")
    _print_trail(reply_headers.get(TRAIL_HEADER))
    return 0


def _add_infer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "infer", help="send one inference request to a running server and print what came back"
    )
    p.add_argument("model", help="the served model's name")
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="the server (default: http://127.0.0.1:8000)")
    p.add_argument("--input", action="append", metavar="NAME=FILE.npy",
                   help="an input tensor from a .npy file; repeat for several (the rest are "
                        "random)")
    p.add_argument("--batch", type=int, default=1,
                   help="size of every dynamic dimension of the random inputs (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    p.add_argument("--binary", action="store_true",
                   help="send inputs and receive outputs as binary tensor data")
    p.add_argument("--timeout", type=float, default=None,
                   help="the request's deadline in seconds (trtserve-timeout header)")
    p.set_defaults(func=cmd_infer)


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the built-in models, one name per line")
    p.set_defaults(func=cmd_models)


def _add_build(sub: argparse._SubParsersAction) -> None:
    from engines.build import BACKENDS as BUILD_BACKENDS

    p = sub.add_parser("build", help="build a TensorRT plan into the cache (or reuse it)")
    p.add_argument("model", help="built-in name or .onnx path")
    p.add_argument("--backend", choices=BUILD_BACKENDS, default=None,
                   help="default: tensorrt where it is installed and a GPU is visible, "
                        "else tensorrt-rtx (which builds without a GPU)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="the profile's max batch (default: 64)")
    # Also accepted after the subcommand, as `trtserve build MODEL --cache-dir DIR`;
    # SUPPRESS keeps the top-level value when it is not given here.
    p.add_argument("--cache-dir", type=Path, default=argparse.SUPPRESS,
                   help="where models and plans are cached (default: ~/.cache/trtserve)")
    p.set_defaults(func=cmd_build)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from .bench_serve import BenchSetup, run

    join_or_start(logging_level=logging.WARNING, include_dashboard=False)
    print(f"benchmarking router paths: {args.requests} requests per path and caller count, "
          f"{args.rounds} interleaved rounds")
    setup = BenchSetup(args.model, args.backend, args.replicas, args.gpus_per_replica,
                       str(args.cache_dir))
    print(run(setup, args.callers, args.requests, args.rounds, args.plot))
    return 0


def cmd_bench_fastpath(args: argparse.Namespace) -> int:
    from .bench_fastpath import FULL, FastpathSetup, docs_section, plot, run_fastpath

    # Every flag is named after its FastpathSetup field; a flag not given keeps the preset's.
    given = {f.name: getattr(args, f.name) for f in fields(FastpathSetup)
             if getattr(args, f.name, None) is not None}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    given["cache_dir"] = str(args.cache_dir)
    setup = replace(FULL if args.full else FastpathSetup(), **given)
    result = run_fastpath(setup, progress=lambda line: print(line, flush=True))
    print()
    print(result.report())
    plots = plot(result, args.plot_dir) if args.plot_dir is not None else []
    if args.plot_dir is not None and not plots:
        print("no plots: matplotlib is not installed")
    for path in plots:
        print(f"plot: {path}")
    if args.write_docs is not None:
        command = "trtserve " + shlex.join(sys.argv[1:])
        linked = [os.path.relpath(p, args.write_docs.parent) for p in plots]
        with args.write_docs.open("a") as docs:
            docs.write("\n" + docs_section(result, args.machine, command, linked))
        print(f"appended a section to {args.write_docs}")
    return 0


def _auto_or_int(value: str) -> str | int:
    return value if value == "auto" else int(value)


def _add_bench_fastpath(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "fastpath",
        help="saturation: trtserve (handle, HTTP binary, HTTP JSON) against the engine's "
             "ceiling and plain Serve with @serve.batch, plus recovery inside batches",
        description="Every flag is optional: the defaults are a reduced sweep for a small "
                    "machine (a few minutes on 2 cores); --full is the whole one, and any "
                    "flag given overrides either.",
    )
    p.add_argument("--model", default="tiny", help="built-in name or .onnx path (default: tiny)")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--full", action="store_true",
                   help="the full sweep: concurrency 1 16 64 256, 10 s per point, 4 generator "
                        "processes, 200 requests per recovery fault from at least 5 kills")
    p.add_argument("--concurrency", type=int, nargs="+", help="callers per load point "
                   "(reduced: 1 16)")
    p.add_argument("--seconds", type=float, help="measured per load point (reduced: 3)")
    p.add_argument("--warmup-s", type=float, help="driven and discarded before each point "
                   "(reduced: 1)")
    p.add_argument("--ceiling-batch-sizes", type=int, nargs="+", help="(default: 1 8 32)")
    p.add_argument("--ceiling-threads", type=int, nargs="+", help="(default: 1 4)")
    p.add_argument("--ceiling-seconds", type=float, help="per ceiling configuration "
                   "(reduced: 1)")
    p.add_argument("--batch-size", type=int,
                   help="batching on: trtserve's batch_size and the peer's max_batch_size "
                        "(default: 32)")
    p.add_argument("--max-queue-delay-us", type=int,
                   help="both batchers' wait for a fuller batch (default: 0)")
    p.add_argument("--preferred-batch-sizes", type=int, nargs="+", help="(default: none)")
    p.add_argument("--replicas", type=int, help="engine replicas, and peer replicas "
                   "(default: 2)")
    p.add_argument("--gpus-per-replica", type=float,
                   help="default: the cluster's GPUs shared evenly, at most 1 each")
    p.add_argument("--router-replicas", type=_auto_or_int,
                   help="the app's router_replicas (default: auto, one per core beyond 4, "
                        "at most 16)")
    p.add_argument("--no-cuda-buckets", dest="cuda_batch_buckets", action="store_const",
                   const=False, help="deploy with cuda_batch_buckets off: one session per "
                   "model sees every batch size")
    p.add_argument("--replica-huge-pages", dest="replica_huge_pages",
                   action="store_const", const=True,
                   help="deploy with replica_huge_pages on: the engine replicas' heaps on "
                   "transparent huge pages")
    p.add_argument("--ort-threads", type=int,
                   help="the app's ort_threads: ONNX Runtime intra-op threads per session "
                        "(default: the app's, 1 on the CUDA provider; on the CPU the cores "
                        "divided by replicas x pool_size)")
    p.add_argument("--pool-size", type=int,
                   help="the app's pool_size: contexts per model per replica (default: the "
                        "app's auto, 4 with a GPU and 1 on the CPU)")
    p.add_argument("--router-batches-in-flight", type=_auto_or_int,
                   help="the app's router_batches_in_flight: batches of a model each Router "
                        "keeps in flight (default: auto, one per context of the live replicas "
                        "shared among the Routers)")
    p.add_argument("--replica-sweep", type=int, nargs="+",
                   help="also deploy trtserve with each of these engine replica counts "
                        "(batching as the last --batching setting; each replica gets the "
                        "cluster's GPUs shared evenly, at most 1) and print the scaling ratio "
                        "served(N) / (N / n x served(n)) against the smallest count n")
    p.add_argument("--ingress", choices=INGRESSES,
                   help=f"Serve's HTTP ingress (default: {DEFAULT_INGRESS}, as trtserve serve)")
    p.add_argument("--batching", nargs="+", choices=("off", "on"),
                   help="trtserve's batching settings to run (default: off on)")
    p.add_argument("--modes", nargs="+",
                   choices=("handle", "handle by value", "http binary", "http json"),
                   help="trtserve's paths to drive (default: handle, http binary, http json; "
                        "'handle by value': handle calls over Serve's gRPC)")
    p.add_argument("--no-peer", dest="peer", action="store_const", const=False,
                   help="leave out plain Serve with @serve.batch")
    p.add_argument("--generators", type=int, help="load generator processes (reduced: 2)")
    p.add_argument("--breakdown-concurrency", type=int,
                   help="concurrency of the per-hop breakdown (reduced: 16)")
    p.add_argument("--recovery-concurrency", type=int, help="(reduced: 16)")
    p.add_argument("--recovery-faults", nargs="*", choices=("context", "crash"),
                   help="faults to recover from (default: context crash)")
    p.add_argument("--context-requests", type=int,
                   help="requests that meet a context fault to collect (reduced: 20)")
    p.add_argument("--crash-requests", type=int,
                   help="requests whose replica is killed under them to collect (reduced: 1)")
    p.add_argument("--crash-kills", type=int, help="replica kills, at least (reduced: 1)")
    p.add_argument("--recovery-limit-s", type=float,
                   help="time limit per recovery fault kind (reduced: 60)")
    p.add_argument("--seed", type=int, help="seed of the inputs (default: 0)")
    p.add_argument("--plot-dir", type=Path, default=None,
                   help="write fastpath-throughput.png and fastpath-latency.png here")
    p.add_argument("--write-docs", type=Path, nargs="?", const=Path("docs/benchmarks.md"),
                   default=None, help="append the results as a section to this file "
                                      "(default when given bare: docs/benchmarks.md)")
    p.add_argument("--machine", default="the development machine (2 cores, no GPU)",
                   help="the machine, as --write-docs describes it")
    p.set_defaults(func=cmd_bench_fastpath)


def cmd_chaos(args: argparse.Namespace) -> int:
    from .chaos import FAULTS, plot, run

    unknown = sorted(set(args.faults) - set(FAULTS))
    if unknown:
        print(f"trtserve: unknown fault kind(s) {unknown}; choose from {sorted(FAULTS)}",
              file=sys.stderr)
        return 2
    join_or_start(logging_level=logging.WARNING, include_dashboard=False)
    print(f"chaos: {args.model}, {args.seconds:g} s, {args.callers} callers per path, a fault "
          f"every {args.every:g} s from {args.faults}")
    result = run(str(args.cache_dir), args.replicas, args.seconds, args.callers, args.every,
                 args.faults, args.seed, model=args.model)
    print(result.table())
    if args.plot is not None and plot(result, args.plot):
        print(f"plot: {args.plot}")
    return 0


def _add_chaos(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chaos", help="random faults under load: trtserve's Router vs a router with no retries"
    )
    p.add_argument("--model", default="tiny", choices=["tiny", "resnet50"],
                   help="the built-in model served (resnet50's inputs, over 100 KiB, are "
                        "handed to the replicas in shared memory)")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--callers", type=int, default=4, help="concurrent callers per path")
    p.add_argument("--every", type=float, default=6.0, help="seconds between faults")
    p.add_argument("--faults", nargs="+", default=["context", "device", "crash", "hang"])
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", type=Path, default=None, help="write a PNG timeline here")
    p.set_defaults(func=cmd_chaos)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks that print side-by-side ratios")
    kinds = bench.add_subparsers(dest="bench", required=True)
    swap = kinds.add_parser(
        "swap", help="cost of promoting a warm spare context against creating one cold"
    )
    swap.add_argument("--model", default="tiny", help="built-in name or .onnx path")
    swap.add_argument("--backend", default="auto", choices=BACKENDS)
    swap.add_argument("--trials", type=int, default=50)
    swap.set_defaults(func=cmd_bench_swap)
    serve_ = kinds.add_parser(
        "serve",
        help="direct handle vs pass-through router vs trtserve's router, side by side",
    )
    serve_.add_argument("--callers", type=int, nargs="+", default=[1, 16])
    serve_.add_argument("--requests", type=int, default=2000,
                        help="requests per path and caller count (default: 2000)")
    serve_.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds the requests are split into (default: 5)")
    serve_.add_argument("--model", default="tiny", help="built-in name or .onnx path")
    serve_.add_argument("--backend", default="auto", choices=BACKENDS)
    serve_.add_argument("--replicas", type=int, default=2)
    serve_.add_argument("--gpus-per-replica", type=float, default=0.0,
                        help="e.g. 0.5 for two replicas sharing one GPU (default: 0)")
    serve_.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")
    serve_.set_defaults(func=cmd_bench_serve)
    _add_bench_fastpath(kinds)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="trtserve", description="Fault-tolerant TensorRT inference on Ray Serve"
    )
    top.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE_DIR,
        help="where generated models and plans are cached (default: %(default)s)",
    )
    top.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = top.add_subparsers(dest="command", required=True)
    for add in (_add_models, _add_build, _add_serve, _add_infer, _add_bench, _add_chaos):
        add(sub)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except FileNotFoundError as exc:
        print(f"trtserve: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
