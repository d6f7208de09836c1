"""Command line: argument parsing, nothing else."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

from router.config import ConfigError, Settings, load_settings
from router.logs import configure_logging

DEFAULT_CONFIG = "config/router.yaml"


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelscope-router",
        description="A quota-aware OpenAI-compatible gateway for pooled ModelScope tokens.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    parser.add_argument(
        "--log-format",
        choices=["auto", "json", "text"],
        default="auto",
        help="auto: plain text in a terminal, JSON lines otherwise",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    _config_arg(serve)

    check = sub.add_parser("check-config", help="validate a config and print the resolved pool")
    _config_arg(check)

    simulate = sub.add_parser("simulate", help="run local stand-ins for ModelScope and Bailian")
    simulate.add_argument("--config", help="simulator YAML (default: a small demo setup)")
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--modelscope-port", type=int, default=9001)
    simulate.add_argument("--bailian-port", type=int, default=9002)

    sub.add_parser("demo", help="simulator + gateway + the openai client, in one go")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, json=_json_flag(args.log_format))
    if args.command == "check-config":
        return _check_config(args.config)
    if args.command == "serve":
        return _serve(args.config)
    if args.command == "simulate":
        return _simulate(args)
    if args.command == "demo":
        from router.demo import run_demo

        return asyncio.run(run_demo())
    return 2  # pragma: no cover - argparse rejects unknown commands


def _json_flag(log_format: str) -> bool | None:
    return None if log_format == "auto" else log_format == "json"


def _load(path: str) -> Settings | None:
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _check_config(path: str) -> int:
    settings = _load(path)
    if settings is None:
        return 1
    from router.report import print_pool

    print_pool(settings, Path(path))
    return 0


def _serve(path: str) -> int:
    settings = _load(path)
    if settings is None:
        return 1
    from router.serve import serve

    serve(settings, Path(path))
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from router.simulator import (
        default_simulator_config,
        load_simulator_config,
        run_simulator,
    )

    config = load_simulator_config(args.config) if args.config else default_simulator_config()
    print(
        f"ModelScope stand-in: http://{args.host}:{args.modelscope_port}/v1\n"
        f"Bailian stand-in:    http://{args.host}:{args.bailian_port}/compatible-mode/v1",
        flush=True,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_simulator(config, args.host, args.modelscope_port, args.bailian_port))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
