"""The ``trtserve`` command: models, build, serve, infer, bench, chaos.

Ray is imported only inside the commands that need it, so ``trtserve models`` and
``trtserve build`` start fast and work where Ray is not running.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from engines import models
from engines.backend import BACKENDS, DEFAULT_CACHE_DIR

Command = Callable[[argparse.Namespace], int]


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
    for name in ("max_batch", "cpus_per_replica"):
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
        print("trtserve: joined the Ray cluster running on this machine")
    except ConnectionError:
        # A new head node: other processes join it with ray.init(address="auto").
        ray.init(logging_level=logging.WARNING)
        started_ray = True
        print("trtserve: started a Ray cluster (join it with ray.init(address='auto'))")
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
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    p.set_defaults(func=cmd_serve)


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
    for add in (_add_models, _add_build, _add_serve, _add_bench):
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
