"""The OpenAI chat-completions request format, and every check a request passes before it reaches the model.

Pure Python (pydantic), no Ray and no torch, so the rules are easy to read and to test. A bad request
is answered with an `APIError`: its HTTP status and a JSON body in OpenAI's shape that names the field:

- 400  the body is not UTF-8 / not JSON / not an object; roles in the wrong order; unsupported options;
       more choices (`n`) than a replica decodes together; `n` x `max_tokens` over the per-request budget
- 413  the body, the number of messages, or the characters per message or in total are over the limits
- 422  a field has the wrong type, a missing value, or a value out of range (temperature 0-2, ...)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_N = 8           # choices per request; each one takes a slot of the batch
MAX_STOP = 4        # stop strings per request (as OpenAI)
MAX_STOP_CHARS = 64


class APIError(Exception):
    """A request the service refuses, with the HTTP status and the field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = {401: "authentication_error", 408: "timeout", 413: "request_too_large", 429: "rate_limit_exceeded",
                500: "server_error", 503: "service_unavailable"}
        return {"error": {"message": self.message, "type": kind.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """Input limits (from the `serve` config section)."""
    max_messages: int = 64
    max_chars_per_message: int = 8000
    max_total_chars: int = 32000
    default_max_tokens: int = 512
    max_batch_size: int = 32            # a request's n choices must fit in one batch together
    max_tokens_per_request: int = 8192  # n x max_tokens

    @property
    def max_body_bytes(self) -> int:
        # a JSON body may escape every character (\uXXXX = 6 bytes, or 12 for a surrogate pair)
        return 12 * self.max_total_chars + 64 * 1024


# ------------------------------------------------------------------------------------------ the schema

class _Strict(BaseModel):
    # strict: "0.5" is not a number and 1 is not a bool; unknown fields (user, metadata, ...) are ignored
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    messages: list[Message] = Field(min_length=1)
    model: str | None = Field(None, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0, le=200)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, le=MAX_N)
    # accepted for compatibility only at their neutral value
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    logprobs: bool | None = None
    tools: list | None = None


@dataclass(frozen=True)
class SamplingParams:
    """What the scheduler needs for each choice of one request, defaults resolved."""
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None
    stop: tuple[str, ...]
    n: int


# --------------------------------------------------------------------------------------------- parsing

def parse_chat_request(body: bytes, limits: Limits) -> tuple[ChatCompletionRequest, SamplingParams]:
    """Raw request body -> validated request and sampling parameters, or an `APIError`."""
    if len(body) > limits.max_body_bytes:
        raise APIError(413, f"request body is {len(body)} bytes; the limit is {limits.max_body_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise APIError(400, f"request body is not valid UTF-8 (byte {error.start})", code="invalid_utf8") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        raise APIError(400, f"request body is not valid JSON: {_first_line(error)}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    _check_sizes(data, limits)  # before the schema, so a huge request is refused cheaply and with 413
    try:
        request = ChatCompletionRequest.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = _param_name(first["loc"])
        raise APIError(422, f"{param}: {first['msg']}", param=param, code="invalid_value") from None
    _check_messages(request)
    return request, _sampling_params(request, limits)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _param_name(loc: tuple) -> str:
    """('messages', 2, 'content') -> 'messages[2].content' (pydantic also adds union branch names)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[TextPart]", "list[str]", "TextPart", "function-after", "constrained-str"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def _check_sizes(data: dict, limits: Limits) -> None:
    messages = data.get("messages")
    if not isinstance(messages, list):
        return  # the schema says what is wrong
    if len(messages) > limits.max_messages:
        raise APIError(413, f"messages: {len(messages)} messages; the limit is {limits.max_messages}",
                       param="messages", code="too_many_messages")
    total = 0
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            size = sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        elif isinstance(content, str):
            size = len(content)
        else:
            continue
        if size > limits.max_chars_per_message:
            raise APIError(413, f"messages[{i}].content: {size} characters; the limit is "
                                f"{limits.max_chars_per_message} per message",
                           param=f"messages[{i}].content", code="message_too_long")
        total += size
    if total > limits.max_total_chars:
        raise APIError(413, f"messages: {total} characters in all; the limit is {limits.max_total_chars}",
                       param="messages", code="conversation_too_long")


def _check_messages(request: ChatCompletionRequest) -> None:
    """An optional system message first, then user and assistant taking turns, ending with the user."""
    for i, message in enumerate(request.messages):
        param = f"messages[{i}]"
        try:
            message.text.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"{param}.content contains an unpaired surrogate (not valid Unicode)",
                           param=f"{param}.content", code="invalid_utf8") from None
        if message.role == "system":
            if i != 0:
                raise APIError(400, f"{param}.role: a system message may only be the first message",
                               param=f"{param}.role", code="invalid_role_order")
            continue
        turn = i - (request.messages[0].role == "system")
        expected = "user" if turn % 2 == 0 else "assistant"
        if message.role != expected:
            raise APIError(400, f"{param}.role: expected '{expected}' (after an optional system message, "
                                f"user and assistant messages alternate, starting with user), got '{message.role}'",
                           param=f"{param}.role", code="invalid_role_order")
    if request.messages[-1].role != "user":
        raise APIError(400, f"messages[{len(request.messages) - 1}].role: the last message must be from the user",
                       param=f"messages[{len(request.messages) - 1}].role", code="invalid_role_order")


def _sampling_params(request: ChatCompletionRequest, limits: Limits) -> SamplingParams:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name):
            raise APIError(400, f"{name} is not supported (only 0)", param=name, code="unsupported")
    if request.logprobs:
        raise APIError(400, "logprobs is not supported", param="logprobs", code="unsupported")
    if request.tools:
        raise APIError(400, "tools are not supported (the model calls its calculator by itself)",
                       param="tools", code="unsupported")
    stop = request.stop
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stop) > MAX_STOP:
        raise APIError(422, f"stop: at most {MAX_STOP} stop strings, got {len(stop)}", param="stop",
                       code="invalid_value")
    for s in stop:
        if not s or len(s) > MAX_STOP_CHARS:
            raise APIError(422, f"stop: each stop string must have 1 to {MAX_STOP_CHARS} characters",
                           param="stop", code="invalid_value")
    n = request.n or 1
    if n > limits.max_batch_size:  # its choices could never be decoded together: refuse, not 429 forever
        raise APIError(400, f"n: {n} choices, but a replica decodes at most {limits.max_batch_size} sequences "
                            f"together", param="n", code="too_many_choices")
    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is None:  # not asked for: the default, lowered to fit the per-request budget
        max_tokens = max(1, min(limits.default_max_tokens, limits.max_tokens_per_request // n))
    if n * max_tokens > limits.max_tokens_per_request:
        raise APIError(400, f"max_tokens: n x max_tokens is {n} x {max_tokens} = {n * max_tokens} tokens; the limit "
                            f"per request is {limits.max_tokens_per_request}", param="max_tokens",
                       code="too_many_tokens")
    top_k = request.top_k or None  # 0 means no top-k
    top_p = request.top_p if request.top_p is not None and request.top_p < 1.0 else None
    return SamplingParams(max_tokens=max_tokens, temperature=1.0 if request.temperature is None else request.temperature,
                          top_k=top_k, top_p=top_p, seed=request.seed, stop=tuple(stop), n=n)


def conversation(request: ChatCompletionRequest) -> dict:
    """The request's messages in the tokenizer's conversation format."""
    return {"messages": [{"role": m.role, "content": m.text} for m in request.messages]}


def sse(payload: dict | str) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"
