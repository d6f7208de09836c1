"""Fault injection: a FIFO of rules, each applying to the next ``count`` matching requests.

A rule is ``{kind, count=1, token=None, model=None, provider=None}``; ``token`` matches the
secret or the name of the presented token/key, ``model`` the requested model, ``provider``
("modelscope"/"bailian") the app (the control API of each app sets it). ``count: -1`` keeps
the rule until it is cleared. The first pending rule that matches a request fires.

Kinds (``<arg>`` after a colon):
  status_500, status_502, status_503  -- an upstream error answer (JSON body)
  throttle                            -- the burst-throttling 429 of the provider
  bailian_code:<code>                 -- a Bailian error code with its status (facts table)
  retry_after:<seconds>               -- 429 with a Retry-After header
  reset                               -- close the connection without answering
  hang                                -- never answer (until the client gives up)
  slow_first_byte:<ms>                -- wait, then answer normally (not counted)
  mid_stream_cut                      -- a real answer (counted) cut after 2 chunks
  malformed_sse                       -- 200 text/event-stream with garbage lines
  html_200                            -- 200 text/html page
  non_json_error                      -- 502 text/plain
  latency:<ms>                        -- wait, then answer normally (counted)
  big_body:<bytes>                    -- a real JSON answer (counted) padded to about that
                                         size, with its Content-Length
  big_body_chunked:<bytes>            -- the same, sent chunked (no Content-Length)
  no_usage                            -- a real answer (counted) that reports no usage: no
                                         ``usage`` field, no usage chunk in a stream even
                                         when asked (an upstream ignoring stream_options)
  bad_usage                           -- a real answer (counted) whose usage is malformed
                                         (sse.BAD_USAGE: no field holds a token count)
  ragged_sse                          -- a real stream (counted) with CRLF line ends, each
                                         event written in two halves 5 ms apart, and the
                                         last event without the blank line that ends it
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, get_args

from router.simulator.state import Provider

# kind -> the type of its argument ("" = no argument)
FAULT_KINDS: dict[str, str] = {
    "status_500": "",
    "status_502": "",
    "status_503": "",
    "throttle": "",
    "bailian_code": "code",
    "retry_after": "seconds",
    "reset": "",
    "hang": "",
    "slow_first_byte": "ms",
    "mid_stream_cut": "",
    "malformed_sse": "",
    "html_200": "",
    "non_json_error": "",
    "latency": "ms",
    "big_body": "bytes",
    "big_body_chunked": "bytes",
    "no_usage": "",
    "bad_usage": "",
    "ragged_sse": "",
}
# Kinds whose answer is a real, counted answer.
COUNTED_KINDS = frozenset(
    {
        "mid_stream_cut",
        "latency",
        "big_body",
        "big_body_chunked",
        "no_usage",
        "bad_usage",
        "ragged_sse",
    }
)


@dataclass(slots=True)
class FaultRule:
    kind: str
    arg: str | None = None
    count: int = 1
    token: str | None = None
    model: str | None = None
    provider: Provider | None = None

    @property
    def spec(self) -> str:
        return self.kind if self.arg is None else f"{self.kind}:{self.arg}"

    @property
    def number(self) -> float:
        """The numeric argument (seconds or milliseconds)."""
        return float(self.arg) if self.arg is not None else 0.0

    def applies(self, provider: Provider, refs: Iterable[str], model: str | None) -> bool:
        if self.provider is not None and self.provider != provider:
            return False
        if self.token is not None and self.token not in set(refs):
            return False
        return self.model is None or self.model == model

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.spec,
            "count": self.count,
            "token": self.token,
            "model": self.model,
            "provider": self.provider,
        }


def parse_kind(spec: str) -> tuple[str, str | None]:
    """Split and check ``"kind"`` or ``"kind:arg"``."""
    kind, sep, arg = spec.partition(":")
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
    argtype = FAULT_KINDS[kind]
    if not argtype:
        if sep:
            raise ValueError(f"fault kind {kind!r} takes no argument")
        return kind, None
    if not arg:
        raise ValueError(f"fault kind {kind!r} needs an argument: {kind}:<{argtype}>")
    if argtype != "code":
        try:
            value = float(arg)
        except ValueError:
            raise ValueError(f"fault {spec!r}: {argtype} must be a number") from None
        if value < 0:
            raise ValueError(f"fault {spec!r}: {argtype} must not be negative")
    return kind, arg


def _opt_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"fault field {key!r} must be a string")
    return value


def parse_rule(data: Mapping[str, Any] | str, provider: Provider | None = None) -> FaultRule:
    """Build a rule from a kind string or a mapping (as posted to /_sim/faults)."""
    if isinstance(data, str):
        data = {"kind": data}
    unknown = set(data) - {"kind", "count", "token", "model", "provider"}
    if unknown:
        raise ValueError(f"unknown fault fields: {sorted(unknown)}")
    spec = data.get("kind")
    if not isinstance(spec, str):
        raise ValueError("fault needs a string 'kind'")
    kind, arg = parse_kind(spec)
    count = data.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or (count < 1 and count != -1):
        raise ValueError("fault 'count' must be a positive integer or -1 (unlimited)")
    given = _opt_str(data, "provider")
    if given is not None and given not in get_args(Provider):
        raise ValueError(f"unknown provider {given!r}")
    if provider is not None and given is not None and given != provider:
        raise ValueError(f"this app serves {provider!r}, not {given!r}")
    return FaultRule(
        kind=kind,
        arg=arg,
        count=count,
        token=_opt_str(data, "token"),
        model=_opt_str(data, "model"),
        provider=provider or given,  # type: ignore[arg-type]
    )


class Faults:
    """The pending fault rules of a simulator (both apps share one queue)."""

    def __init__(self) -> None:
        self._rules: list[FaultRule] = []

    def add(
        self,
        kind: str | FaultRule | Mapping[str, Any],
        *,
        count: int = 1,
        token: str | None = None,
        model: str | None = None,
        provider: Provider | None = None,
    ) -> FaultRule:
        """Queue a rule: ``faults.add("status_503", count=2, token="alice")``."""
        if isinstance(kind, FaultRule):
            rule = kind
        elif isinstance(kind, str):
            data = {"kind": kind, "count": count, "token": token, "model": model}
            rule = parse_rule(data, provider)
        else:
            rule = parse_rule(kind, provider)
        self._rules.append(rule)
        return rule

    def take(self, provider: Provider, refs: Iterable[str], model: str | None) -> FaultRule | None:
        """The first rule that applies to this request, consuming one of its uses."""
        refs = tuple(refs)
        for i, rule in enumerate(self._rules):
            if rule.applies(provider, refs, model):
                if rule.count > 0:
                    rule.count -= 1
                    if rule.count == 0:
                        del self._rules[i]
                return rule
        return None

    def clear(self, provider: Provider | None = None) -> int:
        """Drop the rules that could apply to ``provider`` (all rules if None)."""
        keep = [
            r for r in self._rules if provider is not None and r.provider not in (None, provider)
        ]
        dropped = len(self._rules) - len(keep)
        self._rules = keep
        return dropped

    def pending(self, provider: Provider | None = None) -> list[FaultRule]:
        return [r for r in self._rules if provider is None or r.provider in (None, provider)]

    def __len__(self) -> int:
        return len(self._rules)
