"""moss-serve's HTTP surface: OpenAI's chat completions API, the model list, health, the page.

    POST /v1/chat/completions   streaming (SSE, OpenAI's chunk format) or not
    GET  /v1/models             the served models (+ `moss`: plugins, quality levels, context)
    GET  /health                load: turns active / waiting, rows, tokens, cancelled
    GET  /                      the web chat (static/index.html; static/ holds its CSS and JS)

Each reply's ``content`` is the reply; what MOSS wrote besides it travels in one extra field,
``moss``, of the message (non-streaming) or of each delta (streaming: text to append)::

    "moss": {"inner_thoughts": "...", "commands": "Calculate(\\"24*15\\")",
             "results": [{"command": "Calculate(\\"24*15\\")", "result": "360", "error": null,
                          "line": "Calculate(\\"24*15\\") => '360'"}],
             "plugins": ["calculator"], "quality": "5/5" or null}

An assistant message of the history may carry its ``moss`` back (``inner_thoughts``,
``commands``, ``results`` with their ``line``), and the turn is then rendered as the model wrote
it; without it the turn's thoughts, commands and results read ``None``. Extra request fields:
``quality`` (N/K, best, worst), ``plugins`` (names, default all the server loaded), ``top_k``,
``repetition_penalty``. Every error is OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``, with a 4xx status for a bad request; the server goes on. See docs/serve.md.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from moss_train import format as fmt
from moss_train.chat import protocol
from moss_train.chat.cli import DEFAULTS
from moss_train.chat.generate import Sampling
from moss_train.chat.plugins import Plugin, ToolCall
from moss_train.serve.engine import Engine, EngineError
from moss_train.serve.turn import CONTENT, RESULTS, Delta, Options, Outcome, stream_turn

DEFAULT_MAX_TOKENS = 512  # when a request gives none (less where the context has less room)
MAX_STOP_STRINGS = 4  # as OpenAI's API


# ----------------------------------------------------------------------------- errors
class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.kind, self.param, self.code), status_code=self.status)


def error_body(message: str, kind: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    """One readable line per problem pydantic found, e.g. ``messages[1].role: Input should be ...``."""
    lines, param = [], None
    for problem in error.errors():
        if problem.get("type") == "json_invalid":
            return f"the request body is not valid JSON: {problem.get('ctx', {}).get('error', problem['msg'])}", None
        where = ""
        for part in problem["loc"][1:] if problem["loc"][:1] == ("body",) else problem["loc"]:
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
        param = param or where or None
        got = (
            f" (got {json.dumps(problem['input'])[:80]})"
            if "input" in problem and not isinstance(problem["input"], dict)
            else ""
        )
        lines.append(f"{where or 'body'}: {problem['msg']}{got}")
    return "; ".join(lines), param


# ----------------------------------------------------------------------------- the request
class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ResultItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    line: str  # the results line as the model saw it (rendered into the history)
    command: Optional[str] = None
    result: Optional[str] = None


class MossFields(BaseModel):
    model_config = ConfigDict(extra="ignore")
    inner_thoughts: Optional[str] = None
    commands: Optional[str] = None
    results: list[ResultItem] = []


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None
    moss: Optional[MossFields] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """OpenAI's fields that apply to MOSS (others are ignored), and moss-serve's own."""

    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None  # default: the first served model
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    n: int = Field(1, ge=1, le=1)
    quality: Optional[str] = None
    plugins: Optional[list[str]] = None
    top_k: Optional[int] = Field(None, ge=0)
    repetition_penalty: Optional[float] = Field(None, gt=0)


# ----------------------------------------------------------------------------- a served model
@dataclass
class ServedModel:
    id: str
    engine: Engine
    plugins: dict[str, Plugin]  # loaded; a request enables any of them
    preamble: str = fmt.MOSS_PREAMBLE
    quality_form: Optional[dict] = None  # quality.json of a tag-conditioned model
    created: int = field(default_factory=lambda: int(time.time()))

    def card(self) -> dict:
        form = self.quality_form
        return {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": "moss-train",
            "moss": {
                "plugins": list(self.plugins),
                "quality_levels": int(form["levels"]) if form else None,
                "context": self.engine.context,
            },
        }


@dataclass
class Prepared:
    """A request checked and turned into what the protocol takes."""

    turn: protocol.TurnRequest
    options: Options
    plugins: list[str]
    quality: Optional[str]


def prepare(served: ServedModel, body: ChatRequest) -> Prepared:
    messages = list(body.messages)
    system = messages.pop(0).text() if messages[0].role == "system" else None
    offset = 1 if system is not None else 0
    if not messages:
        raise APIError(400, "messages: there is no user message to answer", "messages")
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            raise APIError(
                400,
                f"messages[{i + offset}]: a {message.role} message where the {expected}'s belongs; "
                "the order is an optional system message, then user, assistant, user, ... ending with the user's",
                "messages",
            )
    if len(messages) % 2 == 0:
        raise APIError(400, "messages: the last message must be the user's (the one to answer)", "messages")
    history = []
    for human, reply in zip(messages[0:-1:2], messages[1::2]):
        moss = reply.moss or MossFields()
        history.append(
            fmt.Turn.from_text(
                human.text(), reply.text(), moss.inner_thoughts, moss.commands, [r.line for r in moss.results]
            )
        )

    plugins = list(served.plugins) if body.plugins is None else list(dict.fromkeys(body.plugins))
    unknown = [name for name in plugins if name not in served.plugins]
    if unknown:
        raise APIError(
            400,
            f"plugins: {', '.join(unknown)} not loaded by this server (loaded: {', '.join(served.plugins) or 'none'})",
            "plugins",
        )
    preamble = served.preamble if system is None else (system if system.endswith("\n") else system + "\n")
    meta = fmt.meta_instruction(plugins, preamble=preamble)
    try:
        quality = fmt.choose_quality(body.quality, served.quality_form)
    except ValueError as error:
        raise APIError(400, f"quality {error}", "quality") from None
    if quality:
        template = served.quality_form["template"] if served.quality_form else fmt.QUALITY_TEMPLATE
        meta = fmt.with_quality(meta, *quality, template=template)
    turn = protocol.TurnRequest(meta, history, messages[-1].text())
    return Prepared(turn, _options(served, body, turn), plugins, f"{quality[0]}/{quality[1]}" if quality else None)


def _options(served: ServedModel, body: ChatRequest, turn: protocol.TurnRequest) -> Options:
    context = served.engine.context
    prompt_tokens = len(protocol.first_prompt(served.engine.tokenizer, turn))
    room = context - prompt_tokens
    if room < 1:
        raise APIError(
            400,
            f"the prompt is {prompt_tokens} tokens, and the model's context is {context}: "
            "shorten the conversation (or start a new one)",
            "messages",
            "context_length_exceeded",
        )
    asked = body.max_completion_tokens or body.max_tokens
    if asked is not None and asked > room:
        raise APIError(
            400,
            f"max_tokens {asked} does not fit: the context is {context} tokens and the prompt takes "
            f"{prompt_tokens}, so at most {room} can be generated",
            "max_tokens",
            "context_length_exceeded",
        )
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise APIError(400, f"stop: up to {MAX_STOP_STRINGS} non-empty strings", "stop")
    try:
        sampling = Sampling(
            DEFAULTS["temperature"] if body.temperature is None else body.temperature,
            DEFAULTS["top_k"] if body.top_k is None else body.top_k,
            DEFAULTS["top_p"] if body.top_p is None else body.top_p,
            DEFAULTS["repetition_penalty"] if body.repetition_penalty is None else body.repetition_penalty,
        )
    except ValueError as error:
        raise APIError(400, str(error)) from None
    seed = secrets.randbits(62) if body.seed is None else body.seed
    return Options(asked or min(DEFAULT_MAX_TOKENS, room), sampling, seed, tuple(stop))


# ----------------------------------------------------------------------------- the response
def results_json(calls: list[ToolCall]) -> list[dict]:
    return [
        {"command": f'{c.api}("{c.argument}")', "result": c.answer, "error": c.error, "line": c.line} for c in calls
    ]


def moss_json(outcome: Outcome, prepared: Prepared) -> dict:
    result = outcome.result
    return {
        "inner_thoughts": fmt.body_text(result.inner_thoughts),
        "commands": fmt.body_text(result.commands),
        "results": results_json(result.tool_calls),
        "plugins": prepared.plugins,
        "quality": prepared.quality,
    }


def usage_json(outcome: Outcome) -> dict:
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
    }


def _delta_json(delta: Delta) -> dict:
    if delta.field == CONTENT:
        return {"content": delta.value}
    return {"moss": {RESULTS: results_json(delta.value)} if delta.field == RESULTS else {delta.field: delta.value}}


class _Completion:
    def __init__(self, model: str):
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model

    def chunk(self, delta: dict, finish_reason=None) -> str:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        return sse(body)

    def whole(self, outcome: Outcome, prepared: Prepared) -> dict:
        message = {"role": "assistant", "content": outcome.result.reply, "moss": moss_json(outcome, prepared)}
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": outcome.finish_reason}],
            "usage": usage_json(outcome),
        }


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _turn(served: ServedModel, prepared: Prepared):
    """The turn's deltas and outcome, holding an engine slot from start to end."""
    async with served.engine.slot():
        async with contextlib.aclosing(
            stream_turn(served.engine, prepared.turn, served.plugins, prepared.options)
        ) as items:
            async for item in items:
                yield item


async def _stream(served: ServedModel, prepared: Prepared, include_usage: bool):
    completion = _Completion(served.id)
    yield completion.chunk(
        {"role": "assistant", "content": "", "moss": {"plugins": prepared.plugins, "quality": prepared.quality}}
    )
    try:
        async with contextlib.aclosing(_turn(served, prepared)) as items:
            async for item in items:
                if isinstance(item, Delta):
                    yield completion.chunk(_delta_json(item))
                else:
                    outcome = item
    except EngineError as error:
        yield sse(error_body(str(error), "server_error"))
    else:
        yield completion.chunk({}, outcome.finish_reason)
        if include_usage:
            yield sse(
                {
                    "id": completion.id,
                    "object": "chat.completion.chunk",
                    "created": completion.created,
                    "model": served.id,
                    "choices": [],
                    "usage": usage_json(outcome),
                }
            )
    yield "data: [DONE]\n\n"


# ----------------------------------------------------------------------------- the app
def create_app(models: list[ServedModel], api_key: str | None = None) -> FastAPI:
    by_id = {m.id: m for m in models}
    app = FastAPI(title="moss-serve", docs_url=None, redoc_url=None, openapi_url=None)
    static = resources.files("moss_train.serve") / "static"

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, error: RequestValidationError):
        message, param = _validation_message(error)
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):
        return JSONResponse(error_body(str(error.detail), "invalid_request_error"), status_code=error.status_code)

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
                return JSONResponse(
                    error_body(
                        "this server needs an API key: send the header 'Authorization: Bearer KEY'",
                        code="invalid_api_key",
                    ),
                    status_code=401,
                )
        return await call_next(request)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(str(static / "index.html"), headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": {m.id: m.engine.stats() for m in models}}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [m.card() for m in models]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str):
        return _served(by_id, model_id).card()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        served = _served(by_id, body.model if body.model is not None else models[0].id)
        prepared = prepare(served, body)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream(served, prepared, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        outcome = None
        try:
            async with contextlib.aclosing(_turn(served, prepared)) as items:
                async for item in items:
                    outcome = item if isinstance(item, Outcome) else outcome
        except EngineError as error:
            raise APIError(500, str(error), kind="server_error") from None
        return _Completion(served.id).whole(outcome, prepared)

    return app


def _served(by_id: dict[str, ServedModel], model_id: str) -> ServedModel:
    if model_id not in by_id:
        raise APIError(
            404, f"model {model_id!r} is not served here; served: {', '.join(by_id)}", "model", "model_not_found"
        )
    return by_id[model_id]
