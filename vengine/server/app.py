"""The ASGI app (FastAPI): OpenAI's routes over one EngineLoop, and `serve`, which runs it.

Handlers run in the asyncio loop: they check and tokenise a request, post it to the engine thread
and await its events. A client that leaves (a closed stream, a dropped connection) aborts its
request, which frees its pages before the next step. At most max_batch requests run and
max_queue more wait; beyond that a request gets 429 at once rather than an unbounded wait.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import signal
import socket
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from vengine.errors import ConfigError
from vengine.server.engine_loop import EngineLoop, Final, Handle, ShuttingDown
from vengine.server.protocol import (APIError, check_prompt, chunk, extras, new_id,
                                     parse_request, response, usage)

PAGE = Path(__file__).parent / "static" / "index.html"


@dataclass(frozen=True)
class ServerSettings:
    model_id: str  # what /v1/models lists and requests must name (or leave out)
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`
    max_queue: int = 64  # requests waiting beyond the running batch; one more gets 429
    defaults: dict[str, Any] = field(default_factory=dict)  # sampling for omitted fields
    shutdown_timeout: float = 10.0  # SIGTERM: seconds in-flight requests get to finish


class _ClientGone(Exception):
    pass


class _EventStream(StreamingResponse):
    """Server-sent events, then on_close however the response ended: finished, failed, or
    cancelled by Starlette when the client disconnected (possibly before the first event)."""

    media_type = "text/event-stream"

    def __init__(self, content: Any, on_close: Any) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def build_app(llm: Any, settings: ServerSettings) -> FastAPI:
    engine = EngineLoop(llm)
    limit = llm.config.max_batch + settings.max_queue
    vocab = min(llm.model.config.vocab_size, llm.tokenizer.vocab_size)  # ids that decode
    attention = llm.config.attention
    in_flight = 0

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start(asyncio.get_running_loop())
        yield
        engine.stop()

    app = FastAPI(title="vengine", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(),
                            status_code=e.status_code)

    async def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                           kind="authentication_error", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings.model_id, "object": "model",
                                            "created": 0, "owned_by": "vengine",
                                            "max_model_len": llm.config.max_context}]}

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @v1.post("/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    async def generate(request: Request, chat: bool):
        nonlocal in_flight
        req = parse_request(await _json(request), chat, settings.model_id, settings.defaults,
                            attention)
        ids = _tokens(llm, req)
        check_prompt(ids, llm.config.max_context, vocab, "messages" if chat else "prompt")
        if not engine.alive:
            raise APIError(503, "the engine thread has stopped (see the server's log)",
                           kind="server_error")
        if in_flight >= limit:
            raise APIError(429, f"the server is at capacity ({llm.config.max_batch} running, "
                           f"{settings.max_queue} waiting): retry later",
                           kind="rate_limit_error", code="overloaded")
        handle, rid = Handle(ids, req.params), new_id(chat)
        in_flight += 1
        engine.submit(handle)
        if req.stream:
            return _EventStream(stream(handle, rid, req.chat, req.include_usage),
                                lambda: done(handle))
        watcher = asyncio.ensure_future(_on_disconnect(request, handle))
        try:
            final = await _final(handle)
        finally:
            watcher.cancel()
            done(handle)
        return response(rid, chat, settings.model_id, final, attention, req.params)

    def done(handle: Handle) -> None:
        """The response is over, however it ended: abort the request if it still runs."""
        nonlocal in_flight
        in_flight -= 1
        engine.abort(handle)

    async def stream(handle: Handle, rid: str, chat: bool, include_usage: bool):
        """Server-sent events: a role chunk, a chunk per step's text, the finish reason (with
        vengine's fields), the usage if asked, [DONE]."""
        model = settings.model_id
        if chat:
            yield _sse(chunk(rid, chat, model, role=True))
        while True:
            item = await handle.events.get()
            if isinstance(item, Exception):
                handle.done = True
                yield _sse(_engine_error(item).body())
                break
            text, final = item
            if text:
                yield _sse(chunk(rid, chat, model, text))
            if final is not None:
                handle.done = True
                last = chunk(rid, chat, model, finish_reason=final.finish_reason)
                yield _sse(last | {"vengine": extras(final, attention, handle.params)})
                if include_usage:
                    yield _sse({**last, "choices": [], "usage": usage(final)})
                break
        yield "data: [DONE]\n\n"

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the engine thread runs (503 if it died), with the pool's occupancy."""
        body = {"status": "ok" if engine.alive else "engine stopped", "model": settings.model_id,
                "device": str(llm.config.device), "in_flight": in_flight, **engine.occupancy()}
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html")

    app.include_router(v1)
    return app


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}") from None


def _tokens(llm: Any, req: Any) -> list[int]:
    if req.chat:
        try:
            return llm.chat_ids(req.messages)
        except Exception as e:  # noqa: BLE001  (a template's raise_exception: role order)
            raise APIError(400, f"the chat template refused the messages: {e}",
                           "messages") from None
    if isinstance(req.prompt, str):
        ids = llm.tokenizer.encode(req.prompt)
        if not ids:
            raise APIError(400, "the prompt encodes to no tokens", "prompt")
        return ids
    return list(req.prompt)


async def _final(handle: Handle) -> Final:
    while True:
        item = await handle.events.get()
        if isinstance(item, _ClientGone):
            raise item
        if isinstance(item, Exception):
            handle.done = True
            raise _engine_error(item)
        if item[1] is not None:
            handle.done = True
            return item[1]


async def _on_disconnect(request: Request, handle: Handle) -> None:
    """Wait for the client to leave (the body is read: the next message is the disconnect),
    then end the wait in _final, whose `finally` aborts the request."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    handle.events.put_nowait(_ClientGone())


def _engine_error(e: Exception) -> APIError:
    if isinstance(e, ShuttingDown):
        return APIError(503, "the server is shutting down: this request was cancelled",
                        kind="server_error", code="shutting_down")
    return APIError(500, f"the engine failed on this request: {type(e).__name__}: {e}",
                    kind="server_error")


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a busy port fails in one line."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port,
                                                          type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise ConfigError(f"--host/--port: cannot listen on {host}:{port}: "
                          f"{e.strerror or e}", field="port") from None
    return sock


def serve(llm: Any, settings: ServerSettings, sock: socket.socket) -> int:
    """Run until SIGTERM or Ctrl-C: then stop accepting, give in-flight requests
    shutdown_timeout seconds, cancel the rest (their pages freed), exit 0."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:  # the first signal: cancel what has not finished in time
                app.state.engine.cancel_after(settings.shutdown_timeout)
            super().handle_exit(sig, frame)

    app = build_app(llm, settings)
    host, port = sock.getsockname()[:2]
    # uvicorn's own timeout only backs ours up: its cancellation logs a traceback per request
    config = uvicorn.Config(app, log_level="warning",
                            timeout_graceful_shutdown=settings.shutdown_timeout + 5)
    server = Server(config)
    sock.listen(2048)
    print(f"vengine: serving {settings.model_id} at http://{host}:{port} "
          f"(ctx {llm.config.max_context}, batch {llm.config.max_batch}, "
          f"queue {settings.max_queue})", file=sys.stderr, flush=True)
    # uvicorn re-raises the signal it stopped on once it is done; with this handler that is a
    # no-op, so a SIGTERM shutdown exits 0
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        started = time.perf_counter()
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"vengine: stopped after {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0
