"""The OpenAI-compatible HTTP API, as a Starlette (ASGI) application.

``POST /v1/chat/completions`` (plain, or ``stream: true`` as server-sent events), ``GET
/v1/models``, ``GET /health``. Requests are checked (``chat_request``), prepared (template,
tokens, the vision graph) in a worker thread, and answered by the :class:`ContinuousBatcher`,
which decodes every running request in one generator step. Errors are one-line JSON bodies in
OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``) with the status that says
what went wrong: 400 bad input, 404 unknown model or path, 405 wrong method, 413 body too large,
503 too many waiting, 500 a bug.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass

from gammamod.errors import GammamodError
from gammamod.runtime.pipeline import GenerationResult, Pipeline

from .batching import Busy, ContinuousBatcher, Job
from .chat_request import Limits, RequestError, parse_chat_request


@dataclass
class ServerConfig:
    model_name: str
    max_batch: int = 8
    max_body_bytes: int = 20 * 2**20
    max_waiting: int = 256
    limits: Limits = None  # type: ignore[assignment]

    def __post_init__(self):
        self.limits = self.limits or Limits()


FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
           param: str | None = None):
    from starlette.responses import Response

    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return Response(json.dumps(body) + "\n", status_code=status, media_type="application/json")


def create_app(pipeline: Pipeline, config: ServerConfig):
    """The ASGI application serving ``pipeline``; the batcher starts with the app and stops with it."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    if pipeline.tokenizer is None or pipeline.template is None:
        raise GammamodError(f"{pipeline.manifest.root}: the artifact has no tokenizer or prompt template; the "
                            "chat server needs both")
    config.limits.takes_images = pipeline.image_processor is not None and "vision" not in pipeline.manifest["absent"]
    state: dict = {}
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["batcher"] = ContinuousBatcher(pipeline, config.max_batch, config.max_waiting)
        try:
            yield
        finally:
            await run_in_threadpool(state["batcher"].close)

    async def health(request):
        return JSONResponse({"status": "ok", "model": config.model_name, **state["batcher"].load()})

    async def models(request):
        return JSONResponse({"object": "list", "data": [
            {"id": config.model_name, "object": "model", "created": created, "owned_by": "gammamod"}]})

    async def read_body(request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise RequestError(f"the request body has {declared} bytes, more than this server's limit of "
                               f"{config.max_body_bytes}", status=413, code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body_bytes:
                raise RequestError(f"the request body is over this server's limit of {config.max_body_bytes} bytes",
                                   status=413, code="body_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON ({e.msg if hasattr(e, 'msg') else e})",
                               code="invalid_json") from None

    def prepare(body: dict):
        """Check the request and turn it into decoder inputs (tokeniser, vision graph): in a worker
        thread, so a bad request is refused before any answer starts."""
        chat = parse_chat_request(body, pipeline.template, config.limits)
        if chat.model != config.model_name:
            raise RequestError(f"model {chat.model!r} is not served here (this server serves "
                               f"{config.model_name!r})", param="model", status=404, code="model_not_found")
        try:
            prepared = pipeline.prepare([chat.images], [chat.prompt], rendered=True)
        except GammamodError as e:
            code = "context_length_exceeded" if "max_seq" in str(e) else None
            raise RequestError(str(e), param="messages", code=code) from None
        return chat, prepared

    async def chat_completions(request):
        try:
            chat, prepared = await run_in_threadpool(prepare, await read_body(request))
        except RequestError as e:
            return _error(e.status, str(e), e.kind, e.code, e.param)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(*event):
            loop.call_soon_threadsafe(events.put_nowait, event)

        # a plain request reads only the result: no event per token for it
        on_text = (lambda text, token: put("text", text, token)) if chat.stream else (lambda text, token: None)
        job = Job(prepared, chat.sampling, on_text=on_text,
                  on_done=lambda result: put("done", result), on_error=lambda message: put("error", message))
        try:
            state["batcher"].submit(job)
        except Busy as e:
            return _error(503, str(e), "server_error", "overloaded")
        except GammamodError as e:
            return _error(400, str(e))
        ident = f"chatcmpl-{secrets.token_hex(12)}"
        if chat.stream:
            return StreamingResponse(_sse(events, job, chat, ident, config.model_name), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            while True:
                kind, *data = await events.get()
                if kind == "done":
                    return JSONResponse(_completion(data[0], chat, ident, config.model_name))
                if kind == "error":
                    return _error(500, data[0], "server_error")
        finally:
            job.cancelled = True  # a client that went away frees its row

    async def not_found(request, exc: HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind)

    async def internal(request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                      "server_error")

    routes = [Route("/health", health, methods=["GET"]), Route("/v1/models", models, methods=["GET"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: not_found, Exception: internal})


def _usage(result: GenerationResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.tokens),
            "total_tokens": result.prompt_tokens + len(result.tokens)}


def _completion(result: GenerationResult, chat, ident: str, model: str) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
              "finish_reason": FINISH[result.finish_reason], "logprobs": None}
    if chat.return_token_ids:
        choice["token_ids"] = result.tokens
    return {"id": ident, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": _usage(result)}


async def _sse(events: asyncio.Queue, job: Job, chat, ident: str, model: str):
    """The answer as OpenAI's ``chat.completion.chunk`` events: the role first, then the text as it
    comes, then the finish reason (and usage when asked), then ``[DONE]``."""
    created = int(time.time())

    def chunk(delta: dict, finish=None, **extra) -> str:
        body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None, **extra}]}
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, *data = await events.get()
            if kind == "text":
                text, token = data
                if chat.return_token_ids:
                    yield chunk({"content": text}, token_ids=[token])
                elif text:
                    yield chunk({"content": text})
            elif kind == "done":
                result = data[0]
                yield chunk({}, FINISH[result.finish_reason])
                if chat.include_usage:
                    body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [], "usage": _usage(result)}
                    yield f"data: {json.dumps(body)}\n\n"
                break
            else:  # an error after the answer began: the stream carries it, in OpenAI's shape
                yield f"data: {json.dumps({'error': {'message': data[0], 'type': 'server_error'}})}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True  # the client went away or the answer is complete: the row is free
