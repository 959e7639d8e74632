"""An OpenAI chat-completions request, checked field by field, turned into our prompt and sampling.

The body is what ``POST /v1/chat/completions`` takes: ``model``, ``messages`` (``system`` or
``developer``, ``user``, ``assistant``; content a string or parts of type ``text`` and
``image_url``), ``max_tokens`` (or ``max_completion_tokens``), ``temperature``, ``top_p``,
``stop``, ``seed``, ``stream`` (with ``stream_options.include_usage``), ``n`` (1 only), and, as
vLLM and others take them, ``top_k``, ``repetition_penalty`` and ``return_token_ids``. Anything
else is refused by name, so a typo never silently changes an answer. Every refusal is a
:class:`RequestError`: an HTTP status, an OpenAI error type and code, the field, one line.

Images are ``image_url`` parts with ``data:`` URIs (base64); local paths (``file://`` or plain)
only when the server allows them. A message's images go first in its turn (LLaVA's place for
them) unless its text says where with ``<image>`` markers, one per image.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

from gammamod.errors import GammamodError
from gammamod.runtime.prompt import IMAGE_TOKEN, Template

from .batching import Sampling

FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "repetition_penalty", "stop", "seed", "stream", "stream_options", "n", "user", "frequency_penalty",
          "presence_penalty", "return_token_ids"}
ROLES = {"system", "developer", "user", "assistant"}


class RequestError(GammamodError):
    """A request the server refuses: ``status`` (HTTP), ``kind`` (OpenAI error type), ``code``, ``param``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind


@dataclass
class ChatRequest:
    prompt: str  # the whole conversation in the template, with an <image> marker per image
    images: list  # decoded pictures, in marker order
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False
    model: str = ""


@dataclass
class Limits:
    max_tokens: int = 1024  # the most one request may ask for
    default_max_tokens: int = 256  # when the request says nothing
    allow_local_files: bool = False
    takes_images: bool = True


def parse_chat_request(body, template: Template, limits: Limits) -> ChatRequest:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r} (this server takes: {', '.join(sorted(FIELDS))})",
                           param=unknown[0], code="unknown_field")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("model: expected the served model's name (see /v1/models)", param="model")
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise RequestError("n: this server returns one choice per request (n = 1)", param="n")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise RequestError(f"{name}: not supported (use repetition_penalty)", param=name)
    sampling = Sampling(
        max_tokens=_max_tokens(body, limits),
        temperature=_number(body, "temperature", 1.0),  # OpenAI's default: send 0 for greedy answers
        top_p=_number(body, "top_p", 1.0),
        top_k=_integer(body, "top_k", 0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0),
        stop=_stop(body.get("stop")),
        seed=_integer(body, "seed", None))
    try:
        sampling.check()
    except GammamodError as e:
        raise RequestError(str(e), param=str(e).split()[0]) from None
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise RequestError("stream_options: expected {\"include_usage\": true|false}", param="stream_options")
    prompt, images = _conversation(body.get("messages"), template, limits)
    return ChatRequest(prompt=prompt, images=images, sampling=sampling, stream=stream,
                       include_usage=bool((options or {}).get("include_usage")),
                       return_token_ids=_flag(body, "return_token_ids"), model=model)


# -- sampling fields ------------------------------------------------------------------------------
def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} {value!r}: expected a finite number", param=name)
    return float(value)


def _integer(body: dict, name: str, default):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} {value!r}: expected an integer", param=name)
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"{name} {value!r}: expected true or false", param=name)
    return value


def _max_tokens(body: dict, limits: Limits) -> int:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = _integer(body, name, limits.default_max_tokens)
    if value < 1:
        raise RequestError(f"{name} {value}: expected a positive integer", param=name)
    if value > limits.max_tokens:
        raise RequestError(f"{name} {value}: this server generates at most {limits.max_tokens} tokens per request",
                           param=name, code="max_tokens_exceeded")
    return value


def _stop(value) -> list[str] | None:
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise RequestError("stop: expected a string or a list of up to 4 strings", param="stop")
    if any(s == "" for s in stops):
        raise RequestError("stop: an empty stop string would end every answer at once", param="stop")
    return stops or None


# -- messages -------------------------------------------------------------------------------------
def _conversation(messages, template: Template, limits: Limits) -> tuple[str, list]:
    """Messages -> the template's rendering of the conversation, and its images in order."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: expected a non-empty list of messages", param="messages")
    system, turns, images = None, [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RequestError(f"{where}: expected an object with role system, user or assistant", param=where)
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise RequestError(f"{where}: unknown field {extra[0]!r}", param=f"{where}.{extra[0]}",
                               code="unknown_field")
        role = message["role"]
        text, pictures = _content(message.get("content"), where, role, limits)
        if role in ("system", "developer"):
            if turns or system is not None:
                raise RequestError(f"{where}: one system message, first", param=where)
            system = text
            continue
        speaker = template.roles[0] if role == "user" else template.roles[1]
        images += pictures
        if turns and turns[-1][0] == speaker:  # two messages of one role in a row: one turn
            turns[-1] = (speaker, f"{turns[-1][1]}\n{text}")
        else:
            turns.append((speaker, text))
    if not turns or turns[-1][0] != template.roles[0]:
        raise RequestError("messages: the last message must be the user's", param="messages")
    if turns[0][0] != template.roles[0]:
        raise RequestError("messages: the conversation must start with the user (after a system message)",
                           param="messages")
    return template.render(turns + [(template.roles[1], None)], system=system), images


def _content(content, where: str, role: str, limits: Limits) -> tuple[str, list]:
    """A message's text, with an ``<image>`` marker for each of its images, and the images."""
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list) and content:
        parts = content
    else:
        raise RequestError(f"{where}.content: expected a string or a list of parts", param=f"{where}.content")
    texts, images = [], []
    for j, part in enumerate(parts):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str) and set(part) <= {"type", "text"}:
            texts.append(part["text"])
        elif kind == "image_url" and set(part) <= {"type", "image_url"}:
            if role != "user":
                raise RequestError(f"{at}: only user messages carry images", param=at)
            if not limits.takes_images:
                raise RequestError(f"{at}: this model takes no images (exported without a vision tower)", param=at,
                                   code="images_not_supported")
            images.append(_image(part.get("image_url"), at, limits))
        else:
            raise RequestError(f"{at}: expected {{\"type\": \"text\", \"text\": ...}} or {{\"type\": \"image_url\", "
                               "\"image_url\": {\"url\": ...}}", param=at)
    text = "\n".join(texts)
    marks = text.count(IMAGE_TOKEN)
    if marks > len(images):
        raise RequestError(f"{where}: its text places {marks} {IMAGE_TOKEN} but the message carries {len(images)} "
                           "image(s): no image where one is required", param=where, code="image_missing")
    if marks and marks != len(images):
        raise RequestError(f"{where}: {len(images)} images and {marks} {IMAGE_TOKEN} markers; give one marker per "
                           "image, or none", param=where)
    if not marks and len(images) > 1:
        raise RequestError(f"{where}: {len(images)} images need {IMAGE_TOKEN} markers in the text saying where each "
                           "goes", param=where)
    if not marks and images:
        text = f"{IMAGE_TOKEN}\n{text.strip()}"  # LLaVA's place for the image, as Template.prompt puts it
    return text, images


def _image(value, at: str, limits: Limits):
    from gammamod.runtime.image import load_image

    url = value.get("url") if isinstance(value, dict) else None
    if not isinstance(url, str) or not url:
        raise RequestError(f"{at}.image_url: no image where one is required (expected {{\"url\": \"data:...\"}})",
                           param=f"{at}.image_url", code="image_missing")
    if set(value) - {"url", "detail"}:
        raise RequestError(f"{at}.image_url: unknown field {sorted(set(value) - {'url', 'detail'})[0]!r}",
                           param=f"{at}.image_url", code="unknown_field")
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise RequestError(f"{at}.image_url: expected a base64 data URI (data:image/png;base64,...)",
                               param=f"{at}.image_url", code="invalid_image")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"{at}.image_url: the data URI is not valid base64", param=f"{at}.image_url",
                               code="invalid_image") from None
        source = io.BytesIO(data)
    else:
        parsed = urlparse(url)
        if parsed.scheme not in ("", "file"):
            raise RequestError(f"{at}.image_url: this server fetches no URLs ({parsed.scheme}://); send the image as "
                               "a data: URI", param=f"{at}.image_url", code="invalid_image")
        if not limits.allow_local_files:
            raise RequestError(f"{at}.image_url: local files are off (start the server with --allow-local-files); "
                               "send the image as a data: URI", param=f"{at}.image_url", code="invalid_image")
        source = unquote(parsed.path) if parsed.scheme == "file" else url
        if not os.path.isabs(source):
            raise RequestError(f"{at}.image_url: a local file must be an absolute path", param=f"{at}.image_url",
                               code="invalid_image")
    try:
        return load_image(source, where=f"{at}.image_url")
    except GammamodError as e:
        raise RequestError(str(e), param=f"{at}.image_url", code="invalid_image") from None
