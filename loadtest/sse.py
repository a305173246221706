"""Server-sent events from OpenAI-compatible streaming endpoints, decoded into typed chunks.

Two layers, both free of I/O so recorded streams can be replayed in tests:
- `SSEDecoder` turns network reads (bytes, split anywhere) into complete event payloads, per the
  SSE framing rules (https://html.spec.whatwg.org/multipage/server-sent-events.html): lines end
  in LF, CRLF or CR; `data:` fields of one event are joined by LF; a blank line ends an event;
  lines starting with `:` are comments (keep-alive pings).
- `parse_payload` turns one payload of `/v1/completions` or `/v1/chat/completions` into a
  `StreamChunk`: the text it carries, the token ids (when the request set vLLM's
  `return_token_ids`), the finish reason, the usage (when `stream_options.include_usage`), or
  the error vLLM sends in-stream (`{"error": {"message": ..., "code": ...}}`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum

DONE = "[DONE]"


class Api(str, Enum):
    """The two OpenAI-compatible generation endpoints the load test drives."""

    COMPLETIONS = "completions"
    CHAT = "chat"

    @property
    def path(self) -> str:
        return "/v1/completions" if self is Api.COMPLETIONS else "/v1/chat/completions"


class SSEDecoder:
    """Incremental SSE framing: `feed` bytes as they arrive, get back each finished event's data."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._pending_cr = False

    def feed(self, raw: bytes) -> list[str]:
        if self._pending_cr and raw.startswith(b"\n"):
            raw = raw[1:]  # the LF of a CRLF split across two reads
        self._pending_cr = False
        self._buffer += raw
        payloads: list[str] = []
        while True:
            line, ending = self._next_line()
            if ending is None:
                return payloads
            payload = self._take_line(line)
            if payload is not None:
                payloads.append(payload)

    def close(self) -> list[str]:
        """End of stream: an event not closed by a blank line is dropped, as the spec says."""
        self._buffer = b""
        self._data = []
        return []

    def _next_line(self) -> tuple[bytes, bytes | None]:
        cut = [i for i in (self._buffer.find(b"\n"), self._buffer.find(b"\r")) if i >= 0]
        if not cut:
            return b"", None
        end = min(cut)
        ending = self._buffer[end : end + 1]
        line = self._buffer[:end]
        rest = self._buffer[end + 1 :]
        if ending == b"\r":
            if rest.startswith(b"\n"):
                rest = rest[1:]
            elif not rest:
                self._pending_cr = True
        self._buffer = rest
        return line, ending

    def _take_line(self, raw_line: bytes) -> str | None:
        line = raw_line.decode("utf-8", errors="replace")
        if not line:
            if not self._data:
                return None
            payload = "\n".join(self._data)
            self._data = []
            return payload
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value.removeprefix(" "))
        return None  # event:, id:, retry: carry nothing the measures need


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class StreamChunk:
    """One decoded payload. `carries_output` is what the inter-token measures count."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None
    done: bool = False

    @property
    def carries_output(self) -> bool:
        return bool(self.text) or bool(self.token_ids)


class StreamProtocolError(ValueError):
    """A payload that is neither JSON of the expected shape nor the `[DONE]` sentinel."""


def parse_payload(payload: str, api: Api) -> StreamChunk:
    if payload.strip() == DONE:
        return StreamChunk(done=True)
    try:
        body = json.loads(payload)
    except json.JSONDecodeError as err:
        raise StreamProtocolError(f"event data is not JSON: {payload[:200]!r}") from err
    if not isinstance(body, dict):
        raise StreamProtocolError(f"event data is not a JSON object: {payload[:200]!r}")
    if body.get("error") is not None:
        return StreamChunk(error=_error_message(body["error"]))
    usage = _usage(body.get("usage"))
    text_parts: list[str] = []
    token_ids: list[int] = []
    finish_reason: str | None = None
    for choice in body.get("choices") or []:
        if api is Api.COMPLETIONS:
            text_parts.append(choice.get("text") or "")
        else:
            delta = choice.get("delta") or {}
            # Reasoning models stream thinking separately; it is output all the same.
            text_parts.append(delta.get("reasoning_content") or delta.get("reasoning") or "")
            text_parts.append(delta.get("content") or "")
        token_ids.extend(int(t) for t in choice.get("token_ids") or [])
        finish_reason = choice.get("finish_reason") or finish_reason
    return StreamChunk(
        text="".join(text_parts), token_ids=tuple(token_ids), finish_reason=finish_reason,
        usage=usage,
    )


def _error_message(error: object) -> str:
    if isinstance(error, dict):
        message = str(error.get("message") or "error without message")
        code = error.get("code")
        return f"{message} (code {code})" if code is not None else message
    return str(error)


def _usage(usage: object) -> Usage | None:
    if not isinstance(usage, dict) or usage.get("completion_tokens") is None:
        return None
    return Usage(
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage["completion_tokens"]),
    )
