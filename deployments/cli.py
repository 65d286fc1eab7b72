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


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the built-in models, one name per line")
    p.set_defaults(func=cmd_models)


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
    for add in (_add_models, _add_bench):
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
