"""Store URLs: which ones open a store (router.quota.factory), and how one is shown.

No imports from the rest of the router: the config, the factory, the stores and the report
all use these, so there is one list of schemes and one masker.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus, urlsplit

REDIS_SCHEMES = ("redis", "rediss", "unix")
STORE_SCHEMES = (*REDIS_SCHEMES, "sqlite", "memory")
STORE_URL_FORMS = (
    "redis://, rediss://, unix://, sqlite:///relative.db, sqlite:////abs/path.db, memory://"
)
MASK = "***"
# A query parameter that carries a credential: password=, ssl_password=, token=, ...
_SECRET_PARAM = re.compile(r"password|token|secret", re.IGNORECASE)


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
    if scheme in REDIS_SCHEMES:
        try:
            urlsplit(url).port  # noqa: B018 - reading it is the check
        except ValueError:  # its text may quote part of a password: not passed on
            return "the host or port cannot be read (percent-encode / ? # @ in a password)"
    return None


def mask_url(url: str) -> str:
    """``url`` as it may be shown (check-config, logs, errors): every credential is ``***``.

    Masked: the user and the password of the userinfo (everything before the last ``@``
    ahead of the query, so an unencoded ``/`` or ``#`` in a password is covered too), and
    the value of every query parameter whose name contains password, token or secret in
    any case (redis-py reads ``?password=`` and ``?ssl_password=``).
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
