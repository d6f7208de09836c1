"""Command line: argument parsing, nothing else."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from router.admin_client import ADMIN_KEY_ENV
from router.config import ConfigError, Settings, load_settings
from router.logs import configure_logging
from router.quota.urls import split_scheme

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
    _admin_parsers(sub)
    return parser


def _url_args(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument(
        "--url", required=required, help="a running gateway, e.g. http://127.0.0.1:8080"
    )
    parser.add_argument("--admin-key", help=f"the gateway's admin key (default: ${ADMIN_KEY_ENV})")


def _env_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not an environment variable name")
    return value


def _admin_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = sub.add_parser(
        "status",
        help="quota of every key and model, and usage of every client",
        description="Read the store of --config directly (default), or a gateway's admin API.",
    )
    where = status.add_mutually_exclusive_group()
    where.add_argument("--config", "-c", help=f"config file (default {DEFAULT_CONFIG})")
    where.add_argument("--url", help="a running gateway, e.g. http://127.0.0.1:8080")
    status.add_argument(
        "--admin-key", help=f"the gateway's admin key for --url (default: ${ADMIN_KEY_ENV})"
    )
    status.add_argument("--json", action="store_true", help="one JSON document, for scripts")

    keys = sub.add_parser("keys", help="disable, enable, reset or add an upstream key")
    actions = keys.add_subparsers(dest="action", required=True)
    helps = {
        "disable": "take a key out on every replica until enabled",
        "enable": "put a disabled key back",
        "reset": "clear a key's counters of today (e.g. after buying quota)",
    }
    for action, text in helps.items():
        parser = actions.add_parser(action, help=text, description=f"{text}, via the admin API")
        parser.add_argument("provider")
        parser.add_argument("key", help="the key's name (never its secret)")
        _url_args(parser, required=True)
        if action == "disable":
            parser.add_argument("--reason", help="shown in status and in the admin API")

    add = actions.add_parser(
        "add",
        help="append a key to the config file, then reload the gateway at --url",
        description=(
            "Edits the config file in place (the old one is kept as <config>.bak): the key is "
            "inserted after the provider's last key, comments and layout stay. The result is "
            "validated first. With --url the gateway reloads; if it refuses, the file is "
            "restored. The secret is written by reference only: --secret-env VAR must be in "
            "the gateway's environment (set when it started), --secret-file is read at reload."
        ),
    )
    add.add_argument("provider")
    add.add_argument("key", help="the new key's name")
    secret = add.add_mutually_exclusive_group(required=True)
    secret.add_argument("--secret-env", metavar="VAR", type=_env_name)
    secret.add_argument("--secret-file", metavar="PATH")
    add.add_argument("--daily-limit", type=int)
    add.add_argument("--model-daily-limit", type=int)
    _config_arg(add)
    _url_args(add, required=False)

    reload = sub.add_parser("reload", help="make a running gateway load its config file again")
    _url_args(reload, required=True)


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
    if args.command == "status":
        return _status(args)
    if args.command == "keys":
        return _keys_add(args) if args.action == "add" else _key_action(args)
    if args.command == "reload":
        return _reload(args)
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
    from router.quota.store import StoreError
    from router.serve import serve

    try:
        return serve(settings, Path(path))
    except StoreError as exc:  # e.g. a SQLite file in a directory that does not exist
        print(f"error: {path}: store.url: {exc}", file=sys.stderr)
        return 1


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


def _admin_key(args: argparse.Namespace) -> str | None:
    key: str | None = args.admin_key or os.environ.get(ADMIN_KEY_ENV)
    if not key:
        print(f"error: give --admin-key or set {ADMIN_KEY_ENV}", file=sys.stderr)
    return key


def _status(args: argparse.Namespace) -> int:
    from router.admin_client import AdminError
    from router.quota.store import StoreError
    from router.status import collect_local, collect_remote, render

    try:
        if args.url:
            key = _admin_key(args)
            if key is None:
                return 2
            document = asyncio.run(collect_remote(args.url, key))
        else:
            settings = _load(args.config or DEFAULT_CONFIG)
            if settings is None:
                return 1
            if split_scheme(settings.store.url)[0] == "memory":
                print("warning: a memory:// store lives in the gateway; use --url", file=sys.stderr)
            document = asyncio.run(collect_local(settings))
    except (AdminError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        render(document)
    return 0


def _key_action(args: argparse.Namespace) -> int:
    from router.admin_client import AdminClient, AdminError

    key = _admin_key(args)
    if key is None:
        return 2

    async def act() -> dict[str, Any]:
        async with AdminClient(args.url, key) as admin:
            reason = getattr(args, "reason", None)
            return await admin.key_action(args.action, args.provider, args.key, reason)

    try:
        answer = asyncio.run(act())
    except AdminError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    state = answer["key"]
    detail = f" ({state['reason']})" if state.get("reason") else ""
    print(f"{answer['provider']}/{state['name']}: {answer['status']}, now {state['state']}{detail}")
    return 0


def _reload(args: argparse.Namespace) -> int:
    from router.admin_client import AdminClient, AdminError

    key = _admin_key(args)
    if key is None:
        return 2

    async def reload() -> dict[str, Any]:
        async with AdminClient(args.url, key) as admin:
            return await admin.post("/admin/reload")

    try:
        answer = asyncio.run(reload())
    except AdminError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"reloaded: {answer['providers']} providers, {answer['keys']} keys, "
        f"{answer['clients']} clients"
    )
    return 0


def _keys_add(args: argparse.Namespace) -> int:
    from router.admin_client import ConfigEditError, add_key, key_entry, snippet

    key = None
    if args.url:
        key = _admin_key(args)
        if key is None:
            return 2
    config = Path(args.config)
    entry = key_entry(
        args.key,
        secret_env=args.secret_env,
        secret_file=args.secret_file,
        daily_limit=args.daily_limit,
        model_daily_limit=args.model_daily_limit,
    )
    try:
        backup, missing = add_key(config, args.provider, entry, os.environ)
    except ConfigEditError as exc:
        print(
            f"error: {exc}\nnothing was changed; {snippet(args.provider, entry)}", file=sys.stderr
        )
        return 1
    print(f"{config}: added key {args.key!r} to provider {args.provider!r} (old file: {backup})")
    for name in missing:
        print(f"note: {name} is not set in this shell; the gateway needs it", file=sys.stderr)
    if key is None:
        print("reload the gateway: modelscope-router reload --url URL, or send it SIGHUP")
        return 0
    return _reload_or_restore(args.url, key, config, backup)


def _reload_or_restore(url: str, key: str, config: Path, backup: Path) -> int:
    from router.admin_client import AdminClient, AdminError

    async def reload() -> dict[str, Any]:
        async with AdminClient(url, key) as admin:
            return await admin.post("/admin/reload")

    try:
        answer = asyncio.run(reload())
    except AdminError as exc:
        shutil.copy2(backup, config)
        print(f"error: {exc}\n{config} was restored from {backup}", file=sys.stderr)
        return 1
    print(f"reloaded: {answer['providers']} providers, {answer['keys']} keys")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
