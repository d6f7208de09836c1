"""The upstream endpoints the gateway proxies, and what each needs. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from router.classify import ProviderType
from router.config import ProviderConfig
from router.errors import BadRequest


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str  # the path below /v1 that clients call
    streams: bool = False  # may answer with SSE
    done_marker: bytes = b"[DONE]"  # a stream that ends without it is broken
    needs: str | None = None  # a field the body must have (besides "model")
    needs_model: bool = True
    anthropic: bool = False  # Anthropic's API: its own base URL, key header and error shape
    forward_headers: tuple[str, ...] = ()  # harmless client headers the upstream needs
    modelscope_only: bool = False
    passthrough: bool = False  # only at providers that list it in ``passthrough``
    reads_usage: bool = False  # token usage is read from its answers (router.usage)
    # A stream whose client did not ask for usage asks the upstream for it (OpenAI's
    # stream_options.include_usage); the relay takes the extra chunk out again.
    asks_stream_usage: bool = False

    def url(self, provider: ProviderConfig) -> str | None:
        """Where this endpoint lives at ``provider``; None when the provider does not serve it."""
        if self.modelscope_only and provider.type is not ProviderType.MODELSCOPE:
            return None
        if self.passthrough and self.name not in provider.passthrough:
            return None
        if self.anthropic:
            base = provider.anthropic_base
            return None if base is None else f"{base}/v1/{self.name}"
        return f"{provider.base_url.rstrip('/')}/{self.name}"

    def check(self, payload: dict[str, Any]) -> None:
        """Refuse a body this endpoint cannot route or the upstream would refuse outright."""
        if self.needs is None:
            return
        value = payload.get(self.needs)
        if self.needs in ("messages",) and (not isinstance(value, list) or not value):
            raise BadRequest(f"'{self.needs}' is required: a non-empty array.", param=self.needs)
        if self.needs == "input" and not isinstance(value, str | list):
            raise BadRequest("'input' is required: a string or an array.", param="input")
        if self.needs == "prompt" and (not isinstance(value, str) or not value):
            raise BadRequest("'prompt' is required: a string.", param="prompt")


CHAT = Endpoint(
    "chat/completions",
    streams=True,
    needs="messages",
    reads_usage=True,
    asks_stream_usage=True,
)
EMBEDDINGS = Endpoint("embeddings", needs="input", reads_usage=True)
IMAGES = Endpoint(
    "images/generations",
    needs="prompt",
    forward_headers=("X-ModelScope-Async-Mode",),
    modelscope_only=True,
)
MESSAGES = Endpoint(
    "messages",
    streams=True,
    done_marker=b"message_stop",
    needs="messages",
    anthropic=True,
    forward_headers=("anthropic-version", "anthropic-beta"),
    reads_usage=True,
)


FIXED_PATHS = frozenset({CHAT.name, EMBEDDINGS.name, IMAGES.name, MESSAGES.name, "models"})


def passthrough(path: str) -> Endpoint:
    """An allow-listed OpenAI endpoint (``providers[].passthrough``): JSON in, JSON out."""
    return Endpoint(path, needs_model=False, passthrough=True)
