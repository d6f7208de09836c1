"""Store URLs: which ones open a store (router.quota.factory), how a Redis one reads, how one is
shown.

No imports from the rest of the router: the config, the factory, the stores and the report
all use these, so there is one list of schemes, one reader of Redis URLs and one masker.

Redis URLs name the topology:

- ``redis://``, ``rediss://``, ``unix://``: one server, read by redis-py itself
  (``redis.asyncio.ConnectionPool.from_url``).
- ``redis+cluster://[user[:password]@]host[:port][,host[:port]...][/][?...]`` and
  ``rediss+cluster://``: a Redis Cluster, found through any of the seed nodes listed (the
  port defaults to 6379). The userinfo is the data nodes' ACL user and password.
- ``redis+sentinel://[user[:password]@]host[:port][,host[:port]...]/service[/db][?...]`` and
  ``rediss+sentinel://``: the master of a Sentinel ``service``, asked of the sentinels listed
  (the port defaults to 26379). The userinfo is the DATA nodes' (master and replicas) user and
  password, as in every other Redis URL; the sentinels' own are ``?sentinel_username=`` and
  ``?sentinel_password=`` (without them the sentinels are asked without AUTH).

``rediss+`` is TLS to every node (sentinels included), verified against the system CAs or
``?ssl_ca_certs=``. Query parameters of the cluster and sentinel forms: see ``CLUSTER_PARAMS``
and ``SENTINEL_PARAMS``; any other is refused (by ``store_url_problem``, so check-config says
so) rather than passed on to fail on the first request.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, unquote, unquote_plus, urlsplit

SERVER_SCHEMES = ("redis", "rediss", "unix")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
REDIS_SCHEMES = (*SERVER_SCHEMES, *CLUSTER_SCHEMES, *SENTINEL_SCHEMES)
STORE_SCHEMES = (*REDIS_SCHEMES, "sqlite", "memory")
STORE_URL_FORMS = (
    "redis://, rediss://, unix://, redis+cluster://host:port[,host:port...], "
    "redis+sentinel://host:port[,host:port...]/service[/db] (rediss+ for TLS), "
    "sqlite:///relative.db, sqlite:////abs/path.db, memory://"
)
CLUSTER_PORT = 6379
SENTINEL_PORT = 26379
MASK = "***"
# A query parameter that carries a credential: password=, ssl_password=, sentinel_password=,
# token=, ... and their misspellings (a mistyped ?sentinel_pasword= holds a password too).
_SECRET_PARAM = re.compile(r"pass|pasw|pwd|token|secret", re.IGNORECASE)

Topology = Literal["cluster", "sentinel"]
Option = str | bool | int
# Query parameters of redis+cluster:// (and rediss+cluster://), with how each value reads.
_TEXT, _FLAG, _CERT_REQS = "text", "flag", "cert_reqs"
CLUSTER_PARAMS: Mapping[str, str] = {
    "username": _TEXT,  # the data nodes' user and password, as in the userinfo
    "password": _TEXT,
    "client_name": _TEXT,
    "ssl_ca_certs": _TEXT,  # rediss+ only, as every ssl_*
    "ssl_certfile": _TEXT,
    "ssl_keyfile": _TEXT,
    "ssl_cert_reqs": _CERT_REQS,
    "ssl_check_hostname": _FLAG,
}
SENTINEL_PARAMS: Mapping[str, str] = {
    **CLUSTER_PARAMS,
    "db": "db",
    "sentinel_username": _TEXT,  # the sentinels' own user and password
    "sentinel_password": _TEXT,
}
_FLAGS = {"1": True, "yes": True, "true": True, "0": False, "no": False, "false": False}
_PARAM_NAME = re.compile(r"[a-z]{2,12}(_[a-z]{2,12}){1,3}")
_HOST = re.compile(r"\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+)")


@dataclass(frozen=True)
class RedisUrl:
    """A redis+cluster:// or redis+sentinel:// URL, read (``parse_redis_url``)."""

    topology: Topology
    tls: bool
    hosts: tuple[tuple[str, int], ...]  # the seed nodes, or the sentinels
    username: str | None = None  # the data nodes'
    password: str | None = None
    service: str | None = None  # Sentinel: the master's service name
    db: int = 0
    options: Mapping[str, Option] = field(default_factory=dict)  # the query, read


def split_scheme(url: str) -> tuple[str, str]:
    """``("redis", "host:6379/0")`` for ``"REDIS://host:6379/0"``: schemes are case-insensitive.

    ``("", url)`` when there is no ``://``.
    """
    scheme, sep, rest = url.partition("://")
    return (scheme.lower(), rest) if sep else ("", url)


def store_url_problem(url: str) -> str | None:
    """Why ``url`` cannot open a store, or None. Never quotes the URL: it may hold a password."""
    scheme, rest = split_scheme(url)
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        return f"not a URL; expected one of: {STORE_URL_FORMS}"
    if scheme not in STORE_SCHEMES:
        return f"unsupported scheme {scheme!r}; expected one of: {STORE_URL_FORMS}"
    if scheme == "sqlite" and (not rest.startswith("/") or rest == "/"):
        return "write sqlite:///relative.db or sqlite:////abs/path.db"
    if scheme in SERVER_SCHEMES:
        try:
            urlsplit(url).port  # noqa: B018 - reading it is the check
        except ValueError:  # its text may quote part of a password: not passed on
            return "the host or port cannot be read (percent-encode / ? # @ in a password)"
    if scheme in CLUSTER_SCHEMES or scheme in SENTINEL_SCHEMES:
        try:
            parse_redis_url(url)
        except ValueError as exc:  # its messages never quote the URL
            return str(exc)
    return None


def parse_redis_url(url: str) -> RedisUrl:
    """Read a redis+cluster:// or redis+sentinel:// URL (see the module doc).

    ValueError says what is wrong without quoting the URL (it may hold a password): a host
    list that is empty or unreadable, a port out of range, no service name (Sentinel), a db
    other than 0 (Cluster has only db 0), an unknown query parameter or a value it cannot read.
    """
    scheme, rest = split_scheme(url)
    if scheme in CLUSTER_SCHEMES:
        topology: Topology = "cluster"
    elif scheme in SENTINEL_SCHEMES:
        topology = "sentinel"
    else:
        raise ValueError(f"not a Redis Cluster or Sentinel URL (scheme {scheme!r})")
    if "#" in rest:
        raise ValueError("a '#' in the URL: percent-encode / ? # @ in a password")
    head, _, query = rest.partition("?")
    userinfo, at, where = head.rpartition("@")
    username, password = _userinfo(userinfo) if at else (None, None)
    hostlist, slash, path = where.partition("/")
    hosts = _hosts(hostlist, CLUSTER_PORT if topology == "cluster" else SENTINEL_PORT)
    service, db = _path(topology, path if slash else None)
    options = _options(query, CLUSTER_PARAMS if topology == "cluster" else SENTINEL_PARAMS)
    # As redis-py reads redis://: a query parameter wins over the userinfo or the path.
    db = int(options.pop("db", db))
    username = str(options.pop("username", username) or "") or None
    password = str(options.pop("password", password) or "") or None
    tls = scheme.startswith("rediss")
    if not tls and any(name.startswith("ssl_") for name in options):
        raise ValueError(
            f"ssl_* parameters need TLS: write rediss{scheme.removeprefix('redis')}://"
        )
    return RedisUrl(topology, tls, hosts, username, password, service, db, options)


def _userinfo(userinfo: str) -> tuple[str | None, str | None]:
    user, colon, secret = userinfo.partition(":")
    return unquote(user) or None, (unquote(secret) or None) if colon else None


def _path(topology: Topology, path: str | None) -> tuple[str | None, int]:
    """(service, db) from the path: none for Cluster, /service[/db] for Sentinel."""
    segments = [] if path is None else [unquote(s) for s in path.split("/")]
    if segments and segments[-1] == "":
        segments.pop()  # one trailing slash
    if topology == "cluster":
        if segments not in ([], ["0"]):
            raise ValueError("a Redis Cluster URL has no path (Cluster has only db 0)")
        return None, 0
    if not segments or not segments[0]:
        raise ValueError(
            "name the Sentinel service: redis+sentinel://host:port[,host:port...]/service"
        )
    if len(segments) > 2:
        raise ValueError("a Sentinel URL's path is /service or /service/db")
    return segments[0], _db(segments[1]) if len(segments) == 2 else 0


def _hosts(hostlist: str, default_port: int) -> tuple[tuple[str, int], ...]:
    if not hostlist:
        raise ValueError("no host: list one or more host:port, separated by commas")
    hosts: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        item = item.strip()
        match = _HOST.match(item)
        if match is None:
            raise ValueError("a host cannot be read: list host:port, separated by commas")
        host = match.group("v6") or match.group("name")
        after = item[match.end() :]
        if not after:
            port = default_port
        elif after.startswith(":") and after[1:].isdigit() and 0 < int(after[1:]) < 65536:
            port = int(after[1:])
        else:
            raise ValueError(
                "a host or port cannot be read: list host:port (port 1-65535), separated by "
                "commas (percent-encode / ? # @ in a password)"
            )
        hosts.append((host, port))
    return tuple(hosts)


def _db(text: str) -> int:
    if not text.isdigit():
        raise ValueError("the db is a number")
    return int(text)


def _options(query: str, known: Mapping[str, str]) -> dict[str, Option]:
    options: dict[str, Option] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        kind = known.get(name)
        if kind is None:
            # Named only when it reads like a parameter name (words_with_underscores): a
            # mistyped URL may have put a secret where a name goes.
            plain = _PARAM_NAME.fullmatch(name) or name in ("db", "protocol", "timeout", "ssl")
            named = f" {name!r}" if plain else ""
            raise ValueError(
                f"unknown query parameter{named}; known here: {', '.join(sorted(known))}"
            )
        if kind == _FLAG:
            if value.lower() not in _FLAGS:
                raise ValueError(f"{name} is yes or no")
            options[name] = _FLAGS[value.lower()]
        elif kind == _CERT_REQS:
            if value not in ("none", "optional", "required"):
                raise ValueError(f"{name} is none, optional or required")
            options[name] = value
        elif kind == "db":
            options[name] = _db(value)
        else:
            options[name] = value
    return options


def mask_url(url: str) -> str:
    """``url`` as it may be shown (check-config, logs, errors): every credential is ``***``.

    Masked: the user and the password of the userinfo (everything before the last ``@``
    ahead of the query, so an unencoded ``/`` or ``#`` in a password is covered too), and
    the value of every query parameter whose name contains pass, pwd, token or secret in any
    case (redis-py reads ``?password=`` and ``?ssl_password=``; the Sentinel form has
    ``?sentinel_password=``; a misspelt ``?pasword=`` is masked too). The same for every
    scheme, the cluster and sentinel forms too.
    """
    head, qmark, query = url.partition("?")
    scheme, sep, rest = head.partition("://")
    if not sep:
        scheme, rest = "", head
    userinfo, at, hostpath = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        rest = (MASK if user else "") + (f":{MASK}" if colon else "") + at + hostpath
    if qmark:
        query = "&".join(_masked_param(param) for param in query.split("&"))
    return f"{scheme}{sep}{rest}{qmark}{query}"


def _masked_param(param: str) -> str:
    name, eq, _ = param.partition("=")
    return f"{name}={MASK}" if eq and _SECRET_PARAM.search(unquote_plus(name)) else param
