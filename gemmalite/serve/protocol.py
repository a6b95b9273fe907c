"""The OpenAI wire format: request bodies in, checked; response and chunk bodies out.

Plain functions on dicts, with no web framework: `parse_chat` and `parse_completion` turn a JSON
body into a `Job` (prompt ids and GenerationOptions) or raise `APIError`, which carries the status
and the OpenAI error body. The response builders take the engine's CompletionChunks.

Field names and shapes follow the OpenAI API; the extensions are vLLM's and llama-server's names
(top_k, min_p, repetition_penalty, repeat_last_n, ignore_eos, cache_prompt, json_schema, grammar).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields, replace

from ..errors import GemmaliteError, InvalidArgumentError, MissingExtraError
from ..options import MAX_LOGPROBS, GenerationOptions
from ..tokenizer import chat_messages_prompt
from ..vision.prompt import MARKER
from .media import ImageSourceError, ImageSources

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
UNSUPPORTED = (  # fields whose use would change the answer; refused rather than ignored
    ("tools", "tool calls are not supported"),
    ("functions", "function calls are not supported"),
    ("logit_bias", "logit_bias is not supported"),
    ("suffix", "suffix (insertion) is not supported"),
)
NUMBERS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
FLOAT32_MAX = 3.4e38


class APIError(Exception):
    """A request that cannot be served: an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Job:
    """A checked request: what to generate, and how to answer."""

    chat: bool  # /v1/chat/completions (else /v1/completions)
    prompt: list[int]
    options: GenerationOptions
    stream: bool
    include_usage: bool  # stream_options.include_usage
    reuse: bool  # cache_prompt: may start from a cached prefix
    images: tuple[bytes, ...] = ()  # the encoded images of image_url parts, in order


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    try:  # JSON may spell a lone surrogate (\\ud800), which is no text a tokenizer can read
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise APIError(400, "the request holds a lone UTF-16 surrogate (such as \\ud800): not valid text") from None
    return body


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


DATA_ONLY = ImageSources()  # what a server allows unless its operator says more


# ---------------------------------------------------------------------- requests
def parse_chat(body: dict, engine, defaults: GenerationOptions, sources: ImageSources = DATA_ONLY) -> Job:
    """A chat request, its image_url parts read from where `sources` allows."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    text, images = _conversation(messages, engine)
    logprobs = _get(body, "logprobs", bool)
    top = _get(body, "top_logprobs", int, lambda v: 0 <= v <= MAX_LOGPROBS, f"an integer in [0, {MAX_LOGPROBS}]")
    if top is not None and not logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    prompt = _check_length(engine, engine.encode(text, images=len(images) if images else None), "messages")
    job = _job(body, engine, defaults, prompt, chat=True, logprobs=(top or 0) if logprobs else None)
    return replace(job, images=tuple(_read_image(sources, url, i) for i, url in enumerate(images)))


def _read_image(sources: ImageSources, url: str, index: int) -> bytes:
    try:
        return sources.read(url)
    except ImageSourceError as e:
        raise APIError(400, f"image {index + 1}: {e}", param="messages") from None


def parse_completion(body: dict, engine, defaults: GenerationOptions) -> Job:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = engine.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        try:
            engine.check_ids(prompt)
        except InvalidArgumentError as e:
            raise APIError(400, str(e), param="prompt") from None
        ids = list(prompt)
    else:
        raise APIError(400, "prompt must be a string or a non-empty list of token ids (one prompt per request)", param="prompt")
    if _get(body, "echo", bool):
        raise APIError(400, "echo is not supported", param="echo")
    if _get(body, "best_of", int) not in (None, 1):
        raise APIError(400, "best_of must be 1", param="best_of")
    logprobs = _get(body, "logprobs", int, lambda v: 0 <= v <= MAX_LOGPROBS, f"an integer in [0, {MAX_LOGPROBS}]")
    return _job(body, engine, defaults, _check_length(engine, ids, "prompt"), chat=False, logprobs=logprobs)


def _conversation(messages: list, engine) -> tuple[str, tuple[str, ...]]:
    """A chat request's messages as Gemma's prompt text, and the URLs of their images, in order."""
    parsed = [_message(m, i) for i, m in enumerate(messages)]
    images = tuple(image for _, _, found in parsed for image in found)
    if images and not engine.vision:
        raise APIError(400, "this model is text-only: it takes no images (a Gemma 3 4B, 12B or 27B does)", param="messages")
    try:
        return chat_messages_prompt([(role, content) for role, content, _ in parsed]), images
    except InvalidArgumentError as e:
        raise APIError(400, str(e), param="messages") from None


def _message(message, index: int) -> tuple[str, str, list[str]]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise APIError(400, f"{where} must be an object with role and content", param=where)
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise APIError(400, f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}", param=f"{where}.role")
    if message.get("tool_calls"):
        raise APIError(400, "tool calls are not supported", param=f"{where}.tool_calls")
    content = message.get("content")
    if content is None and role == "assistant":
        content = ""
    images = []
    if isinstance(content, list):  # parts, joined as Gemma's template joins them: an image is its marker
        texts = []
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"].strip())
            elif isinstance(part, dict) and part.get("type") == "image_url":
                images.append(_image_url(part.get("image_url"), f"{where}.content[{j}].image_url", f"{where}.content"))
                texts.append(MARKER)
            else:
                raise APIError(
                    400, f"{where}.content: only text and image_url parts are supported", param=f"{where}.content"
                )
        content = "".join(texts)
    if not isinstance(content, str):
        raise APIError(400, f"{where}.content must be a string or a list of text parts", param=f"{where}.content")
    return ROLES[role], content, images


def _image_url(image_url, where: str, param: str) -> str:
    """The URL of an image_url part (read later, by the server's ImageSources)."""
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise APIError(400, f"{where} must be {{url: ...}}, e.g. a data:image/png;base64,... URL", param=param)
    return url


def _job(body: dict, engine, defaults: GenerationOptions, prompt: list[int], *, chat: bool, logprobs: int | None) -> Job:
    _get(body, "model", str)
    for name, message in UNSUPPORTED:
        if body.get(name):
            raise APIError(400, message, param=name)
    if body.get("tool_choice") not in (None, "none"):
        raise APIError(400, "tool calls are not supported", param="tool_choice")
    constraint_param, constraint = _constraint(body)
    if _get(body, "n", int) not in (None, 1):
        raise APIError(400, "n must be 1: one choice per request", param="n")
    stream = bool(_get(body, "stream", bool))
    stream_options = _get(body, "stream_options", dict)
    if stream_options is not None and not stream:
        raise APIError(400, "stream_options needs stream: true", param="stream_options")
    include_usage = _get(stream_options or {}, "include_usage", bool, name="stream_options.include_usage")
    max_tokens = _get(body, "max_completion_tokens", int, lambda v: v >= 1, "an integer >= 1")
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", int, lambda v: v >= 1, "an integer >= 1")
    top_k = _get(body, "top_k", int, lambda v: v >= -1, "an integer >= 0 (0 or -1: off)")
    given = {
        "max_new_tokens": max_tokens,
        "top_k": None if top_k is None else max(top_k, 0),
        **{name: _get(body, name, float) for name in NUMBERS},
        "seed": _get(body, "seed", int),
        "repeat_last_n": _get(body, "repeat_last_n", int),
        "ignore_eos": _get(body, "ignore_eos", bool),
        "stop": _stops(body.get("stop")),
        "logprobs": logprobs,
        "prediction": _prediction(body.get("prediction")),
        **constraint,
    }
    merged = {f.name: getattr(defaults, f.name) for f in fields(GenerationOptions)}
    merged.update({name: value for name, value in given.items() if value is not None})
    room = engine.max_seq_len - len(prompt)
    if max_tokens is not None and max_tokens > room:  # refused, as vLLM does, rather than cut short unasked
        raise APIError(
            400,
            f"max_tokens is {max_tokens}, but the prompt has {len(prompt)} tokens and this server's context is "
            f"{engine.max_seq_len} tokens: at most {room} new tokens fit",
            param="max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens",
            code="context_length_exceeded",
        )
    if merged["max_new_tokens"] is None:  # as OpenAI and vLLM: until the context is full
        merged["max_new_tokens"] = room
    if given["logprobs"] is None:
        merged["logprobs"] = None
    try:
        options = GenerationOptions(**merged)
    except InvalidArgumentError as e:
        raise APIError(400, str(e), param=_param_named_in(str(e))) from None
    if options.constraint is not None:
        try:  # compiled now, so that a schema the library cannot use is a 400 before anything runs
            engine.grammars.compile(options.constraint)
        except (InvalidArgumentError, MissingExtraError) as e:
            raise APIError(400, str(e), param=constraint_param) from None
    reuse = _get(body, "cache_prompt", bool)
    return Job(chat, prompt, options, stream, bool(include_usage), reuse is not False)


def _prediction(prediction) -> str | None:
    """Predicted Outputs: {"type": "content", "content": text or [{"type": "text", "text": ...}]}, as text."""
    if prediction is None:
        return None
    content = prediction.get("content") if isinstance(prediction, dict) and prediction.get("type") == "content" else None
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise APIError(400, 'prediction must be {"type": "content", "content": a string or a list of text parts}', param="prediction")
    return content


def _constraint(body: dict) -> tuple[str | None, dict]:
    """(the field that asks, generation options) for structured output: OpenAI's response_format
    (json_object, or json_schema with name, schema and strict), or llama-server's json_schema or grammar."""
    given = []
    response_format = body.get("response_format")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "json_object":
            given.append(("response_format", {"json_schema": True}))
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            where = "response_format.json_schema"
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                message = f"{where} must be an object with a schema (a JSON Schema object), a name and optionally strict"
                raise APIError(400, message, param=where)
            _get(spec, "name", str, name=f"{where}.name")
            _get(spec, "strict", bool, name=f"{where}.strict")  # the reply always follows the schema
            given.append(("response_format", {"json_schema": spec["schema"]}))
        elif kind != "text":
            shapes = "{type: text}, {type: json_object} or {type: json_schema, json_schema: {name, schema, strict}}"
            raise APIError(400, f"response_format must be {shapes}", param="response_format")
    if body.get("json_schema") is not None:
        schema = body["json_schema"]
        if not isinstance(schema, dict):
            raise APIError(400, "json_schema must be a JSON Schema object", param="json_schema")
        given.append(("json_schema", {"json_schema": schema}))
    if body.get("grammar") is not None:
        given.append(("grammar", {"grammar": _get(body, "grammar", str)}))
    if len(given) > 1:
        names = " and ".join(name for name, _ in given)
        raise APIError(400, f"{names} cannot be combined: give one constraint for the reply", param=given[1][0])
    return given[0] if given else (None, {})


def _get(body: dict, key: str, kind: type, check=None, expected: str | None = None, *, name: str | None = None):
    """body[key] when present and not null, checked to be of `kind` (an int is a float too, a bool is neither)."""
    value = body.get(key)
    if value is None:
        return None
    name = name or key
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            value = float(value) if ok else value
        except OverflowError:  # an integer too large for a float
            ok = False
        ok = ok and math.isfinite(value) and abs(value) <= FLOAT32_MAX  # sampling runs in float32
    else:
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok or (check is not None and not check(value)):
        kinds = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "an object"}
        raise APIError(400, f"{name} must be {expected or kinds[kind]}, got {json.dumps(value)[:80]}", param=name)
    return value


def _stops(stop) -> tuple[str, ...] | None:
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 16:
        raise APIError(400, "stop must be a non-empty string or a list of at most 16 of them", param="stop")
    return tuple(stops)


def _param_named_in(message: str) -> str | None:
    """The request field an options error names (the options use the API's names, bar max_new_tokens)."""
    first = message.split(" ", 1)[0]
    return first if re.fullmatch(r"[a-z_]+", first) else None


def _check_length(engine, prompt: list[int], param: str) -> list[int]:
    limit = engine.max_seq_len
    if len(prompt) >= limit:
        raise APIError(
            400,
            f"the prompt has {len(prompt)} tokens, but this server's context is {limit} tokens: "
            f"at most {limit - 1} prompt tokens fit (one place is left for the reply)",
            param=param,
            code="context_length_exceeded",
        )
    return prompt


# ---------------------------------------------------------------------- tokenize
def parse_tokenize(body: dict, engine) -> tuple[list[int], bool]:
    """The ids of {"prompt"} or {"messages"} as a request would send them, and whether to name them
    (`return_token_strs`). `add_special_tokens: false` leaves <bos> out of a prompt."""
    names = bool(_get(body, "return_token_strs", bool))
    if "messages" in body:
        if "prompt" in body:
            raise APIError(400, "give prompt or messages, not both", param="messages")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
        if _get(body, "add_generation_prompt", bool) is False:
            raise APIError(400, "add_generation_prompt: false is not supported", param="add_generation_prompt")
        text, images = _conversation(messages, engine)
        return engine.encode(text, images=len(images) or None), names
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise APIError(400, "prompt must be a string (or send messages)", param="prompt")
    ids = engine.encode(prompt)
    return (ids if _get(body, "add_special_tokens", bool) is not False else ids[1:]), names


def parse_detokenize(body: dict, engine) -> list[int]:
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in tokens):
        raise APIError(400, "tokens must be a list of token ids", param="tokens")
    try:
        engine.check_ids(tokens)
    except InvalidArgumentError as e:
        raise APIError(400, str(e), param="tokens") from None
    return tokens


def error_for(error: BaseException) -> APIError:
    """The API error for an exception raised while a request ran."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, InvalidArgumentError):
        return APIError(400, str(error))
    if isinstance(error, GemmaliteError):  # the server is shutting down
        return APIError(503, str(error))
    return APIError(500, f"the server failed on this request: {type(error).__name__}: {error}")
