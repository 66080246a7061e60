"""OpenAI request bodies, read strictly: every wrong field is a 400 that names it, never a silent default.

The parameters llmkit honours are the OpenAI ones a completion needs (model, messages/prompt, max_tokens,
temperature, top_p, stop, stream, stream_options, n=1, user) plus vLLM's `top_k` and `ignore_eos`. Any other
field, including OpenAI ones llmkit does not implement (tools, logprobs, response_format, ...), is refused by name
rather than ignored, so a client never believes it got what it asked for.

Values are read to what the engine can take, as vLLM reads them: a temperature below 1e-5 is greedy (dividing
logits by less overflows), a top_k beyond the vocabulary is the whole vocabulary. Text must be valid Unicode (a
lone surrogate is refused by field), and what a client sent is echoed in errors only in part (`shorten`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmkit.errors import shorten

COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "stream",
    "stream_options",
    "n",
    "user",
    "ignore_eos",
    "presence_penalty",
    "frequency_penalty",
}
CHAT = COMMON | {"messages", "max_completion_tokens"}
COMPLETION = COMMON | {"prompt"}
ROLES = ("system", "user", "assistant")


@dataclass
class Limits:
    max_batch: int = 32  # requests generating at once
    max_queue: int = 256  # requests waiting for a slot beyond those
    max_prompt_tokens: int | None = None  # default: the context less one
    max_tokens: int | None = None  # largest max_tokens a request may ask for (default: the context)
    default_max_tokens: int = 256  # when a request gives none (never beyond the context)
    timeout_s: float = 600.0  # a request still generating after this is cancelled (504)
    max_body_bytes: int = 4 * 2**20  # a larger request body is refused (413) before it is read whole


class BadRequest(Exception):
    """A request the server refuses: an OpenAI-style error with this status, naming the field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        message = shorten(message)
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def body(self) -> dict[str, Any]:
        kinds = {
            401: "authentication_error",
            413: "invalid_request_error",
            429: "rate_limit_error",
            503: "service_unavailable",
        }
        kind = kinds.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return {"error": error}


@dataclass
class Body:
    """A checked request: the prompt (text or messages) and how to generate."""

    chat: bool
    model: str
    prompt: str = ""
    messages: list[dict[str, str]] = field(default_factory=list)
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False


def _number(body: dict[str, Any], key: str, low: float, high: float, default: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"'{key}' must be a number, got {type(value).__name__}", key)
    if not low <= value <= high:
        raise BadRequest(f"'{key}' must be between {low:g} and {high:g}, got {value}", key)
    return float(value)


def _integer(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'{key}' must be an integer, got {type(value).__name__}", key)
    return value


GREEDY_BELOW = 1e-5  # temperatures under this are greedy decoding (vLLM's threshold)


def _unicode(text: str, param: str) -> str:
    """Text the tokenizer and the log can take: JSON admits lone surrogates ("\\ud800"), UTF-8 does not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        where = f"at character {exc.start}"
        raise BadRequest(f"'{param}' holds a lone surrogate {where} (not valid Unicode)", param) from None
    return text


def _text(content: Any, param: str) -> str:
    """A message's content: a string, or OpenAI content parts of type text."""
    if isinstance(content, str):
        return _unicode(content, param)
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"'{param}[{i}]': only text content parts are supported", f"{param}[{i}]")
            texts.append(_unicode(part["text"], f"{param}[{i}].text"))
        return "".join(texts)
    raise BadRequest(f"'{param}' must be a string or a list of text parts", param)


def parse_body(body: Any, chat: bool) -> Body:
    """Check a decoded JSON body for /v1/chat/completions (chat) or /v1/completions."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for key in body:
        if key not in (CHAT if chat else COMPLETION):
            raise BadRequest(f"unsupported parameter '{key}': llmkit serve does not implement it", key)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required: the name /v1/models lists", "model")
    parsed = Body(chat=chat, model=model)
    if chat:
        parsed.messages = _messages(body.get("messages"))
    else:
        parsed.prompt = _prompt(body.get("prompt"))
    parsed.max_tokens = _max_tokens(body)
    _refuse_unimplemented(body)
    parsed.temperature, parsed.top_p, parsed.top_k = _sampling(body)
    parsed.stop = _stops(body.get("stop"))
    parsed.stream, parsed.ignore_eos, parsed.include_usage = _flags(body)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise BadRequest("'user' must be a string", "user")
    return parsed


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content}", "messages")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise BadRequest(f"'messages[{i}].role' must be one of {', '.join(ROLES)}", f"messages[{i}].role")
        unknown = set(message) - {"role", "content", "name"}
        if unknown:
            key = sorted(unknown)[0]
            raise BadRequest(f"unsupported parameter 'messages[{i}].{key}'", f"messages[{i}].{key}")
        checked.append({"role": message["role"], "content": _text(message.get("content"), f"messages[{i}].content")})
    return checked


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # one prompt in a list, as some clients send it
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' must be a string (one prompt per request)", "prompt")
    return _unicode(prompt, "prompt")


def _max_tokens(body: dict[str, Any]) -> int | None:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = _integer(body, key)
    if value is not None and value < 1:
        raise BadRequest(f"'{key}' must be at least 1, got {value}", key)
    return value


def _refuse_unimplemented(body: dict[str, Any]) -> None:
    """OpenAI fields llmkit accepts only at the value that changes nothing."""
    if _integer(body, "n") not in (None, 1):
        raise BadRequest("'n' must be 1: send one request per answer", "n")
    for penalty in ("presence_penalty", "frequency_penalty"):
        if _number(body, penalty, -2, 2, 0.0) != 0:
            raise BadRequest(f"unsupported parameter '{penalty}': only 0 is implemented", penalty)


def _sampling(body: dict[str, Any]) -> tuple[float, float, int]:
    """(temperature, top_p, top_k) as the engine takes them: greedy below 1e-5, top_k 0 for the whole vocabulary."""
    temperature = _number(body, "temperature", 0, 2, 1.0)
    top_p = _number(body, "top_p", 0, 1, 1.0)
    if top_p == 0:
        raise BadRequest("'top_p' must be above 0", "top_p")
    top_k = _integer(body, "top_k")
    if top_k is not None and top_k < -1:
        raise BadRequest("'top_k' must be -1 or 0 (all tokens) or a positive count", "top_k")
    return (0.0 if temperature < GREEDY_BELOW else temperature), top_p, max(top_k or 0, 0)


def _stops(stop: Any) -> list[str]:
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("'stop' must be a string or a list of at most 4 non-empty strings", "stop")
    return [_unicode(stop, "stop") for stop in stops]


def _flags(body: dict[str, Any]) -> tuple[bool, bool, bool]:
    """(stream, ignore_eos, include_usage)."""
    for flag in ("stream", "ignore_eos"):
        if not isinstance(body.get(flag, False), bool):
            raise BadRequest(f"'{flag}' must be true or false", flag)
    stream = bool(body.get("stream"))
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"} or not stream):
        raise BadRequest("'stream_options' takes only include_usage, with stream true", "stream_options")
    return stream, bool(body.get("ignore_eos")), bool((options or {}).get("include_usage"))
