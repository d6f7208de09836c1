"""The admin side from the command line: a client of the admin API, and `keys add`.

``keys add`` edits the config file in place as text (PyYAML finds where the provider's keys
end; comments and layout stay), checks that the result parses to the old document plus the
new key and passes ``load_settings``, keeps the old file as ``<config>.bak``, and then asks a
running gateway to reload when a URL is given (restoring the file if the gateway refuses).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import yaml

from router.config import ConfigError, Settings, load_settings

ADMIN_KEY_ENV = "ROUTER_ADMIN_KEY"


class AdminError(Exception):
    """The gateway refused or could not be reached; ``str()`` is the message for the operator."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AdminClient:
    """``async with AdminClient(url, key) as admin: await admin.get("/admin/quota")``."""

    def __init__(self, base_url: str, key: str, *, timeout: float = 30) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self._headers = {"Authorization": f"Bearer {key}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AdminClient:
        self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        assert self._session is not None, "use 'async with AdminClient(...)'"
        url = self.base_url + path
        data = orjson.dumps(body) if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else None
        try:
            async with self._session.request(method, url, data=data, headers=headers) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AdminError(f"{method} {url}: {exc or type(exc).__name__}") from None
        try:
            document = orjson.loads(raw)
        except orjson.JSONDecodeError:
            document = None
        if status >= 400 or not isinstance(document, dict):
            message = raw.decode(errors="replace")[:500]
            if isinstance(document, dict) and isinstance(document.get("error"), dict):
                message = str(document["error"].get("message"))
            raise AdminError(f"{method} {url}: {status}: {message}", status)
        return document

    async def get(self, path: str) -> dict[str, Any]:
        return await self._call("GET", path)

    async def post(self, path: str, body: Any = None) -> dict[str, Any]:
        return await self._call("POST", path, body)

    async def key_action(
        self, action: str, provider: str, key: str, reason: str | None = None
    ) -> dict[str, Any]:
        path = f"/admin/keys/{quote(provider, safe='')}/{quote(key, safe='')}/{action}"
        return await self.post(path, {"reason": reason} if reason else None)


# -- editing the config file for `keys add` ------------------------------------------------------

_MISSING_VAR = re.compile(r"environment variable ([A-Za-z_][A-Za-z0-9_]*) is not set")
PLACEHOLDER = "placeholder-not-set-in-this-shell"


class ConfigEditError(Exception):
    """The config file could not be edited safely; ``str()`` says why and what to do."""


def _scalar(value: str | int) -> str:
    """A YAML scalar: plain when it reads back as itself, else a JSON (double-quoted) string."""
    text = str(value)
    if re.fullmatch(r"[A-Za-z0-9_/][A-Za-z0-9_./-]*", text) and yaml.safe_load(text) == value:
        return text
    return json.dumps(value)


def _last_mark(node: yaml.Node) -> yaml.Mark:
    """Where the last thing written for ``node`` ends."""
    if isinstance(node, yaml.ScalarNode) or getattr(node, "flow_style", False):
        return node.end_mark
    if isinstance(node, yaml.MappingNode) and node.value:
        return _last_mark(node.value[-1][1])
    if isinstance(node, yaml.SequenceNode) and node.value:
        return _last_mark(node.value[-1])
    return node.end_mark


def _value(node: yaml.MappingNode, key: str) -> yaml.Node | None:
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode) and k.value == key:
            found: yaml.Node = v
            return found
    return None


def _keys_node(root: yaml.Node | None, provider: str) -> yaml.SequenceNode:
    providers = _value(root, "providers") if isinstance(root, yaml.MappingNode) else None
    if not isinstance(providers, yaml.SequenceNode):
        raise ConfigEditError("the config has no 'providers:' list")
    for item in providers.value:
        name = _value(item, "name") if isinstance(item, yaml.MappingNode) else None
        if isinstance(name, yaml.ScalarNode) and name.value == provider:
            keys = _value(item, "keys")
            if not isinstance(keys, yaml.SequenceNode) or keys.flow_style or not keys.value:
                raise ConfigEditError(
                    f"provider {provider!r}: 'keys:' is not a block list ('- ...' lines)"
                )
            return keys
    raise ConfigEditError(f"no provider named {provider!r} in the config")


def key_entry(
    name: str,
    *,
    secret_env: str | None = None,
    secret_file: str | None = None,
    daily_limit: int | None = None,
    model_daily_limit: int | None = None,
) -> dict[str, str | int]:
    """The new key as the config file will hold it (the secret by reference only)."""
    entry: dict[str, str | int] = {"name": name}
    if secret_env is not None:
        entry["secret"] = f"${{{secret_env}}}"
    if secret_file is not None:
        entry["secret_file"] = secret_file
    if daily_limit is not None:
        entry["daily_limit"] = daily_limit
    if model_daily_limit is not None:
        entry["model_daily_limit"] = model_daily_limit
    return entry


def with_key_added(text: str, provider: str, entry: dict[str, str | int]) -> str:
    """``text`` with ``entry`` appended to the provider's keys; comments and layout kept.

    The item is inserted as text after the last key, in the style of that key (a flow
    mapping on one line, or a block mapping); the result is parsed again and must equal the
    old document plus exactly this key, else ConfigEditError.
    """
    try:
        before = yaml.safe_load(text)
        keys = _keys_node(yaml.compose(text), provider)
    except yaml.YAMLError as exc:
        raise ConfigEditError(f"not valid YAML: {exc}") from None
    dash = " " * keys.start_mark.column
    if getattr(keys.value[-1], "flow_style", False):
        fields = ", ".join(f"{k}: {_scalar(v)}" for k, v in entry.items())
        item = f"{dash}- {{{fields}}}\n"
    else:
        lines = [f"{k}: {_scalar(v)}" for k, v in entry.items()]
        item = f"{dash}- {lines[0]}\n" + "".join(f"{dash}  {line}\n" for line in lines[1:])
    at = _last_mark(keys.value[-1]).index
    if not (at > 0 and text[at - 1] == "\n"):
        newline = text.find("\n", at)
        at = len(text) if newline < 0 else newline + 1
    head = text[:at] if text[:at].endswith("\n") else text[:at] + "\n"
    edited = head + item + text[at:]
    expected = before
    for p in expected["providers"]:
        if p.get("name") == provider:
            p["keys"].append(entry)
    try:
        after = yaml.safe_load(edited)
    except yaml.YAMLError:
        after = None
    if after != expected:
        raise ConfigEditError("the edit did not give the expected document")
    return edited


def validate_edited(path: Path, env: Mapping[str, str]) -> tuple[Settings, list[str]]:
    """load_settings with this shell's environment; variables it lacks get a placeholder.

    Returns the settings and the names of the variables that were missing here (the gateway
    must have them in its own environment).
    """
    env = dict(env)
    missing: list[str] = []
    while True:
        try:
            return load_settings(path, env), missing
        except ConfigError as exc:
            found = _MISSING_VAR.search(str(exc))
            if found is None or found.group(1) in env:
                raise
            missing.append(found.group(1))
            env[found.group(1)] = PLACEHOLDER


def add_key(
    config: Path, provider: str, entry: dict[str, str | int], env: Mapping[str, str]
) -> tuple[Path, list[str]]:
    """Append a key to a config file in place; the old file is kept as ``<config>.bak``.

    The new text is validated before anything is replaced. Returns the backup's path and the
    variables missing from this shell (see ``validate_edited``).
    """
    try:
        text = config.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigEditError(f"{config}: cannot read: {exc.strerror}") from None
    edited = with_key_added(text, provider, entry)
    staged = config.with_name(f".{config.name}.new")
    staged.write_text(edited, encoding="utf-8")
    try:
        _settings, missing = validate_edited(staged, env)
    except ConfigError as exc:
        staged.unlink()
        raise ConfigEditError(str(exc).replace(str(staged), str(config))) from None
    backup = config.with_name(config.name + ".bak")
    shutil.copy2(config, backup)
    shutil.copymode(config, staged)
    os.replace(staged, config)
    return backup, missing


def snippet(provider: str, entry: dict[str, str | int]) -> str:
    """What to add by hand when the file cannot be edited safely."""
    fields = ", ".join(f"{k}: {_scalar(v)}" for k, v in entry.items())
    return f"under providers[name={provider}].keys add:\n  - {{{fields}}}"
