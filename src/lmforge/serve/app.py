"""The HTTP routes: OpenAI's chat completions, completions and models, plus /health, /metrics and the web page.

Every error a client can cause leaves as OpenAI's error JSON with a 4xx status; streams use server-sent events in
OpenAI's chunk format and end with `data: [DONE]`. A stream whose client goes away is cancelled (Starlette cancels
the generator; `finally` frees the rows), and a non-streaming request polls for its client while it waits.
With best-of-n, a non-streaming reply is collected whole and only the best n of its candidates are returned
(`Service.best_of`, `Service.rank`); usage counts every candidate's tokens, as OpenAI's does.
This module does not schedule or sample: it turns requests into `Service.submit` calls and events into replies.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from lmforge.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    envelope,
    new_id,
    parse_body,
    sse,
    template_messages,
    usage,
)
from lmforge.serve.scheduler import Delta, Failed
from lmforge.serve.service import Service, Submission
from lmforge.serve.tools import ToolCallSplitter, plan_tools

WEB = resources.files("lmforge.serve") / "web"

Pick = Callable[[list[str]], Awaitable[list[int]]]  # every candidate's text -> the indices kept, in reply order


def create_app(svc: Service) -> FastAPI:
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        svc.metrics.requests.labels(request.url.path, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        # Unknown routes and wrong methods still answer in OpenAI's shape.
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": svc.model_id}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        svc.authorize(request.headers.get("authorization"))
        return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        svc.authorize(request.headers.get("authorization"))
        card = {"id": svc.model_id, "object": "model", "created": svc.created, "owned_by": "lmforge"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        svc.authorize(request.headers.get("authorization"))
        req: ChatRequest = parse_body(await _body(request, svc), ChatRequest)
        svc.check_model(req.model)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        choice = req.tool_choice.model_dump() if hasattr(req.tool_choice, "model_dump") else req.tool_choice
        plan = plan_tools(template_messages(req.messages), tools, choice, svc.tokenizer.chat_template)
        if isinstance(choice, dict) and choice["function"]["name"] not in plan.names:
            raise APIError(400, "tool_choice names a function that is not in tools", param="tool_choice")
        ids = svc.encode_chat(plan.messages, plan.template_tools) + svc.tokenizer.encode(plan.reply_prefix)
        best = svc.best_of(req)
        params = svc.sampling(req, len(ids), req.max_completion_tokens or req.max_tokens, best)
        sub = svc.submit([(ids, p) for p in params])
        svc.metrics.requests.labels("/v1/chat/completions", "200").inc()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(_chat_stream(svc, sub, req.n, plan.reply_prefix, plan.names, include_usage))
        pick = _picker(svc, [template_messages(req.messages)], best, req.n)
        return JSONResponse(await _chat_reply(svc, sub, request, plan.reply_prefix, plan.names, pick))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        svc.authorize(request.headers.get("authorization"))
        req: CompletionRequest = parse_body(await _body(request, svc), CompletionRequest)
        svc.check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise APIError(400, "prompt: give at least one prompt", param="prompt")
        best = svc.best_of(req)
        jobs = []
        for text in prompts:
            ids = svc.tokenizer.encode(text)
            jobs += [(ids, p) for p in svc.sampling(req, len(ids), req.max_tokens, best)]
        sub = svc.submit(jobs)
        svc.metrics.requests.labels("/v1/completions", "200").inc()
        if req.stream:
            return _sse(_completion_stream(svc, sub))
        # The reward model reads a raw prompt as one user message (as `lmforge generate --best-of` does).
        pick = _picker(svc, [[{"role": "user", "content": text}] for text in prompts], best, req.n)
        return JSONResponse(await _completion_reply(svc, sub, request, pick))

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(str(WEB / "index.html"))

    app.mount("/web", StaticFiles(directory=str(WEB)), name="web")
    return app


async def _body(request: Request, svc: Service) -> bytes:
    """The request body, refused with 413 as soon as it passes the limit (never read whole into memory first)."""
    limit = svc.limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is over the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _picker(svc: Service, conversations: list[list[dict]], best: int | None, n: int) -> Pick | None:
    """None without best-of; else the ranking of each conversation's `best` candidates (they come in that order)
    down to its n best, best first."""
    if best is None:
        return None

    async def pick(texts: list[str]) -> list[int]:
        kept = []
        for c, messages in enumerate(conversations):
            order = await svc.rank(messages, texts[c * best : (c + 1) * best], n)
            kept += [c * best + i for i in order]
        return kept

    return pick


async def _ranked(choices: list[dict], texts: list[str], pick: Pick | None) -> list[dict]:
    """Choices sorted by index, or with best-of the kept ones renumbered in their new order."""
    choices = sorted(choices, key=lambda c: c["index"])
    if pick is None:
        return choices
    return [choices[i] | {"index": k} for k, i in enumerate(await pick(texts))]


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


# --- chat --------------------------------------------------------------------------------------------------------


async def _chat_reply(
    svc: Service, sub: Submission, request: Request, prefix: str, tools: set[str], pick: Pick | None = None
) -> dict:
    texts = {i: [] for i in range(len(sub.seqs))}
    choices, prompt_tokens, completion_tokens = [], 0, 0
    async for i, event in sub.events(request.is_disconnected):
        if isinstance(event, Delta):
            texts[i].append(event.text)
        elif isinstance(event, Failed):
            sub.cancel()
            raise APIError(500, event.message)
        else:
            message, reason = _message(prefix + "".join(texts[i]), event.reason, tools)
            choices.append({"index": i, "message": message, "finish_reason": reason, "logprobs": None})
            prompt_tokens, completion_tokens = event.prompt_tokens, completion_tokens + event.completion_tokens
    svc.record(sub, prompt_tokens, completion_tokens)
    choices = await _ranked(choices, [prefix + "".join(texts[i]) for i in range(len(texts))], pick)
    rid = new_id("chatcmpl")
    return envelope(
        rid, "chat.completion", svc.model_id, choices=choices, usage=usage(prompt_tokens, completion_tokens)
    )


def _message(text: str, reason: str, tools: set[str]) -> tuple[dict, str]:
    if tools:
        splitter = ToolCallSplitter(tools)
        content = splitter.push(text)
        rest, calls = splitter.finish()
        if calls:
            return {"role": "assistant", "content": (content + rest).strip() or None, "tool_calls": calls}, "tool_calls"
    return {"role": "assistant", "content": text}, reason


async def _chat_stream(
    svc: Service, sub: Submission, n: int, prefix: str, tools: set[str], include_usage: bool
) -> AsyncIterator[str]:
    rid, model = new_id("chatcmpl"), svc.model_id
    splitters = [ToolCallSplitter(tools) if tools else None for _ in range(n)]
    for s in splitters:
        if s is not None:
            s.push(prefix)

    def chunk(i: int, delta: dict, reason: str | None = None) -> str:
        choice = {"index": i, "delta": delta, "finish_reason": reason, "logprobs": None}
        return sse(envelope(rid, "chat.completion.chunk", model, choices=[choice]))

    prompt_tokens = completion_tokens = 0
    try:
        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for i, event in sub.events():
            split = splitters[i]
            if isinstance(event, Delta):
                text = split.push(event.text) if split else event.text
                if text:
                    yield chunk(i, {"content": text})
            elif isinstance(event, Failed):
                yield sse(APIError(500, event.message).body())
                break
            else:
                reason = event.reason
                rest, calls = split.finish() if split else ("", [])
                if rest:
                    yield chunk(i, {"content": rest})
                if calls:
                    reason = "tool_calls"
                    yield chunk(i, {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]})
                yield chunk(i, {}, reason)
                prompt_tokens, completion_tokens = event.prompt_tokens, completion_tokens + event.completion_tokens
        svc.record(sub, prompt_tokens, completion_tokens)
        if include_usage:
            yield sse(
                envelope(rid, "chat.completion.chunk", model, choices=[], usage=usage(prompt_tokens, completion_tokens))
            )
        yield sse("[DONE]")
    finally:  # also on cancellation (client disconnected): free the rows now
        sub.cancel()


# --- completions -------------------------------------------------------------------------------------------------


async def _completion_reply(svc: Service, sub: Submission, request: Request, pick: Pick | None = None) -> dict:
    texts = {i: [] for i in range(len(sub.seqs))}
    choices, prompt_tokens, completion_tokens = [], 0, 0
    async for i, event in sub.events(request.is_disconnected):
        if isinstance(event, Delta):
            texts[i].append(event.text)
        elif isinstance(event, Failed):
            sub.cancel()
            raise APIError(500, event.message)
        else:
            choices.append({"index": i, "text": "".join(texts[i]), "finish_reason": event.reason, "logprobs": None})
            prompt_tokens += event.prompt_tokens
            completion_tokens += event.completion_tokens
    svc.record(sub, prompt_tokens, completion_tokens)
    choices = await _ranked(choices, ["".join(texts[i]) for i in range(len(texts))], pick)
    rid = new_id("cmpl")
    return envelope(
        rid, "text_completion", svc.model_id, choices=choices, usage=usage(prompt_tokens, completion_tokens)
    )


async def _completion_stream(svc: Service, sub: Submission) -> AsyncIterator[str]:
    rid = new_id("cmpl")
    prompt_tokens = completion_tokens = 0

    def chunk(i: int, text: str, reason: str | None = None) -> str:
        choice = {"index": i, "text": text, "finish_reason": reason, "logprobs": None}
        return sse(envelope(rid, "text_completion", svc.model_id, choices=[choice]))

    try:
        async for i, event in sub.events():
            if isinstance(event, Delta):
                yield chunk(i, event.text)
            elif isinstance(event, Failed):
                yield sse(APIError(500, event.message).body())
                break
            else:
                yield chunk(i, "", event.reason)
                prompt_tokens += event.prompt_tokens
                completion_tokens += event.completion_tokens
        svc.record(sub, prompt_tokens, completion_tokens)
        yield sse("[DONE]")
    finally:
        sub.cancel()
