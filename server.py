"""Stages 24, 25 — an HTTP endpoint: POST /generate, and OpenAI's API so that its clients can talk to the model.

One process loads the run once; every request brings its prompt and its
sampling settings as JSON and gets the continuation back (the prompt not
repeated), whole as {"text": ...} or streamed as server-sent events: one
`data: {"text": ...}` line per piece, then `data: [DONE]`, as chat UIs expect.
The request body is checked before any work: a bad value is a 422 with a
message. Requests run at the same time, each in its own thread with its own
KV cache and random generator, so they never disturb each other; the model's
weights are only read.

The same model also speaks OpenAI's API, so any program written for it (the
`openai` package, chat front ends) works by changing its base URL:
`GET /v1/models`, `POST /v1/completions` (text continuation) and, on a chat
run (a tokenizer with the chat tokens, made by finetune.py),
`POST /v1/chat/completions`: the messages go through the chat template and the
answer ends at `<|end|>`. Both take `"stream": true` for OpenAI's chunks as
server-sent events, and a bad request gets OpenAI's error object with a 4xx.

New since the chat (cli.py): the same `sample.stream_text`, served over
HTTP. FastAPI and uvicorn are an optional extra (pip install fastapi uvicorn).

    python server.py out/gpt --port 8000
    curl -s localhost:8000/generate -H 'content-type: application/json' \\
         -d '{"prompt": "ROMEO:", "max_new_tokens": 100, "temperature": 0.8}'
    curl -sN localhost:8000/generate -H 'content-type: application/json' \\
         -d '{"prompt": "ROMEO:", "stream": true}'
    curl -s localhost:8000/v1/completions -H 'content-type: application/json' \\
         -d '{"model": "gpt", "prompt": "ROMEO:", "max_tokens": 50}'
    python server.py out/chat        # a chat run made by finetune.py: its model id is "chat"
    curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"model": "chat", "messages": [{"role": "user", "content": "Hello!"}], "temperature": 0}'
"""
import argparse
import json
import sys
import time
import uuid
from typing import ClassVar, Literal

import torch

from char_tokenizer import replace_unencodable_output
from chat_format import chat_ids, encode_chat
from checkpoint import CONFIG, load_run, resolve_run_dir
from sample import compile_for_generation, context_window, prompt_ids, stream_text

MAX_NEW_TOKENS_CAP = 1024  # the most one request may ask for: a guard against tying the server up
MAX_PROMPT_CHARS = 20_000  # the prompt is cropped to block_size tokens anyway; this bounds the encoding work
MAX_STOPS = 4  # stop texts per request, OpenAI's limit
INSTALL = "the server needs FastAPI and uvicorn: pip install fastapi uvicorn"


def request_models():
    """The JSON bodies of POST /generate, /v1/completions and /v1/chat/completions, validated by pydantic."""
    from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored

    class GenerateRequest(Strict):
        prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="text to continue")
        max_new_tokens: int = Field(200, ge=1, le=MAX_NEW_TOKENS_CAP, description="tokens to generate")
        temperature: float = Field(1.0, ge=0.0, description="0 is greedy")
        top_k: int | None = Field(None, ge=0, description="keep the k most likely tokens; 0 or null: off")
        top_p: float | None = Field(None, gt=0.0, le=1.0, description="nucleus probability; null: off")
        repetition_penalty: float = Field(1.0, gt=0.0, description="> 1 discourages repeats")
        stop: str | None = Field(None, description="the answer ends before this text")
        seed: int | None = Field(None, description="the same seed and settings give the same text")
        stream: bool = Field(False, description="server-sent events, one per piece of text")

    class StreamOptions(Strict):
        include_usage: bool = Field(False, description="a last chunk with the token counts")

    class OpenAIRequest(Strict):
        """The fields both OpenAI endpoints share; top_k and repetition_penalty are ours (as vLLM accepts them)."""

        default_max_tokens: ClassVar[int]
        model: str = Field(description="the id GET /v1/models lists")
        max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS_CAP, description="longest answer, in tokens")
        max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS_CAP, description="max_tokens' new name")
        temperature: float = Field(1.0, ge=0.0, description="0 is greedy")
        top_p: float | None = Field(None, gt=0.0, le=1.0, description="nucleus probability; null: off")
        top_k: int | None = Field(None, ge=0, description="keep the k most likely tokens; 0 or null: off")
        repetition_penalty: float = Field(1.0, gt=0.0, description="> 1 discourages repeats")
        seed: int | None = Field(None, description="the same seed and settings give the same text")
        stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOPS} texts that end the answer")
        n: int = Field(1, description="answers per request: 1 only")
        stream: bool = Field(False, description="OpenAI's chunks as server-sent events")
        stream_options: StreamOptions | None = None
        user: str | None = Field(None, description="accepted and ignored, as an end-user id for logs")

        @field_validator("n")
        @classmethod
        def one_answer(cls, n):
            if n != 1:
                raise ValueError(f"only n=1 is served, got {n}: send {n} requests with different seeds")
            return n

        @field_validator("stop")
        @classmethod
        def few_stops(cls, stop):
            if isinstance(stop, list) and len(stop) > MAX_STOPS:
                raise ValueError(f"at most {MAX_STOPS} stop texts, got {len(stop)}")
            return stop

        @property
        def limit(self):
            return self.max_completion_tokens or self.max_tokens or self.default_max_tokens

    class CompletionRequest(OpenAIRequest):
        default_max_tokens = 16  # OpenAI's default for this endpoint
        prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="text to continue")

    class TextPart(Strict):
        type: Literal["text"]
        text: str

    class Message(Strict):
        role: Literal["system", "developer", "user", "assistant"]  # "developer" is OpenAI's newer "system"
        content: str | list[TextPart]

        def as_dict(self):
            text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
            return {"role": "system" if self.role == "developer" else self.role, "content": text}

    class ChatRequest(OpenAIRequest):
        default_max_tokens = MAX_NEW_TOKENS_CAP  # the answer normally ends at <|end|> well before
        messages: list[Message] = Field(min_length=1, description="the conversation so far")

        @model_validator(mode="after")
        def bounded(self):
            if sum(len(m["content"]) for m in self.conversation()) > MAX_PROMPT_CHARS:
                raise ValueError(f"the messages hold more than {MAX_PROMPT_CHARS} characters")
            return self

        def conversation(self):
            return [m.as_dict() for m in self.messages]

    return GenerateRequest, CompletionRequest, ChatRequest


class OpenAIError(Exception):
    """A request the server refuses, answered with OpenAI's error object."""

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self):
        return {"error": {"message": str(self), "type": "invalid_request_error", "param": self.param,
                          "code": self.code}}


class Answer:
    """The text pieces of one answer; once they are all read, why it ended and its token counts."""

    def __init__(self, pieces, prompt_tokens):
        self.pieces, self.prompt_tokens = pieces, prompt_tokens
        self.finish, self.completion_tokens = None, 0

    def __iter__(self):
        self.finish, self.completion_tokens = yield from self.pieces

    def usage(self):
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def pieces(model, tok, prompt, max_new_tokens, request, stop_ids=(), chat=False):
    """The text pieces answering one request: its own generator, and (inside generate) its own KV cache.
    A chat answer's repetition penalty counts the answer's own tokens, not the conversation's."""
    generator = torch.Generator(device=next(model.parameters()).device)
    if request.seed is None:
        generator.seed()  # fresh randomness per request
    else:
        generator.manual_seed(request.seed)
    return stream_text(model, tok, prompt, max_new_tokens, stop_text=request.stop, stop_ids=stop_ids,
                       temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
                       repetition_penalty=request.repetition_penalty, penalize_prompt=not chat, generator=generator)


def event(data):
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def sse(pieces_iter):
    """Server-sent events: `data: {"text": piece}` per piece, then `data: [DONE]`."""
    for piece in pieces_iter:
        if piece:
            yield event({"text": piece})
    yield event("[DONE]")


def chunk_events(answer, head, choice, include_usage):
    """OpenAI's stream: a chunk per piece, one with the finish reason, maybe one with usage, then [DONE].

    head: the fields every chunk shares (id, object, created, model);
    choice(text, finish): the one entry of a chunk's "choices".
    """
    yield event({**head, "choices": [choice("", None)]})  # at once: the client sees the answer begin
    for piece in answer:
        if piece:
            yield event({**head, "choices": [choice(piece, None)]})
    yield event({**head, "choices": [choice("", answer.finish)]})
    if include_usage:
        yield event({**head, "choices": [], "usage": answer.usage()})
    yield event("[DONE]")


def text_choice(text, finish):
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


def message_choice(text, finish):
    return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish}


def delta_choice(text, finish):
    """A chat chunk's choice: the role comes with the first, empty chunk, the finish reason with an empty delta."""
    delta = {} if finish else {"content": text} if text else {"role": "assistant", "content": ""}
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def create_app(run_dir, device="cpu", compile_model=False):
    """A FastAPI app serving the run in `run_dir` on `device`: POST /generate, GET /info, and OpenAI's /v1 API.

    compile_model=True torch.compiles the model (sample.compile_for_generation); the first request compiles it.
    """
    from fastapi import FastAPI
    from fastapi.exception_handlers import request_validation_exception_handler
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    model, tok, config = load_run(run_dir, device)
    if compile_model:
        compile_for_generation(model)
    run_dir = resolve_run_dir(run_dir)
    chat_tokens = chat_ids(tok)  # None on a base run
    stop_ids = list((chat_tokens or {}).values())  # a chat token is never text: any of them ends an answer
    GenerateRequest, CompletionRequest, ChatRequest = request_models()
    app = FastAPI(title="LLM from scratch", description=f"serving {run_dir}")
    info = {"run": str(run_dir), "model": config["model"], "tokenizer": config.get("tokenizer"),
            "quantization": config.get("quantization"), "max_new_tokens_cap": MAX_NEW_TOKENS_CAP,
            "chat": chat_tokens is not None}
    card = {"id": run_dir.name, "object": "model", "created": int((run_dir / CONFIG).stat().st_mtime),
            "owned_by": "llm-from-scratch"}

    @app.exception_handler(OpenAIError)
    async def refuse(request, error):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, error):
        if not request.url.path.startswith("/v1/"):  # /generate keeps FastAPI's 422 with its detail list
            return await request_validation_exception_handler(request, error)
        first = error.errors()[0]
        if first["type"] == "json_invalid":  # its loc holds the character position, not a field
            return await refuse(request, OpenAIError(400, f"the body is not valid JSON: {first['ctx']['error']}"))
        param = ".".join(str(part) for part in first["loc"][1:]) or None  # ("body", "messages", 0) -> messages.0
        return await refuse(request, OpenAIError(400, f"{param or 'the body'}: {first['msg']}", param))

    @app.get("/info")
    def get_info():
        return info

    @app.post("/generate")
    def generate(request: GenerateRequest):  # a plain def: FastAPI runs each call in its own worker thread
        answer = pieces(model, tok, request.prompt, request.max_new_tokens, request, stop_ids)
        if request.stream:
            return StreamingResponse(sse(answer), media_type="text/event-stream")
        return {"text": "".join(answer)}

    def check_model(name):
        if name != card["id"]:
            raise OpenAIError(404, f"the model {name!r} is not served here; this server has {card['id']!r}",
                              "model", "model_not_found")

    def respond(request, ids, chat):
        """The answer to prompt `ids`, a chat or a text completion: one JSON object, or its chunks as events."""
        answer = Answer(pieces(model, tok, ids, request.limit, request, stop_ids, chat), len(ids))
        kind, whole, chunk = ("chat.completion", message_choice, delta_choice) if chat else \
            ("text_completion", text_choice, text_choice)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
                "created": int(time.time()), "model": card["id"]}
        if request.stream:
            head["object"] = "chat.completion.chunk" if chat else kind
            usage = request.stream_options is not None and request.stream_options.include_usage
            return StreamingResponse(chunk_events(answer, head, chunk, usage), media_type="text/event-stream")
        text = "".join(answer)
        return {**head, "choices": [whole(text, answer.finish)], "usage": answer.usage()}

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name}")
    def get_model(name: str):
        check_model(name)
        return card

    @app.post("/v1/completions")
    def completions(request: CompletionRequest):
        check_model(request.model)
        return respond(request, prompt_ids(tok, request.prompt), chat=False)

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatRequest):
        check_model(request.model)
        if chat_tokens is None:
            raise OpenAIError(400, f"{card['id']} is a base model: its tokenizer has no chat tokens, so it cannot "
                                   f"take turns; use /v1/completions, or fine-tune it with finetune.py", "messages")
        ids, _ = encode_chat(tok, request.conversation(), add_generation_prompt=True)
        if len(ids) > context_window(model):  # a template cut at the front would lose the system message
            raise OpenAIError(400, f"the messages take {len(ids)} tokens; the model's context is "
                                   f"{context_window(model)}: send fewer or shorter ones", "messages",
                              "context_length_exceeded")
        return respond(request, ids, chat=True)

    return app


def main(argv=None):
    replace_unencodable_output()
    p = argparse.ArgumentParser(description="Serve a trained run over HTTP (POST /generate, OpenAI's /v1 API).")
    p.add_argument("run", help="run directory (or a file in it), e.g. out/gpt")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | mps (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model: faster generation after a "
                   "first request that compiles for tens of seconds")
    args = p.parse_args(argv)
    try:
        import uvicorn

        app = create_app(args.run, args.device, args.compile)
    except ModuleNotFoundError as e:
        print(f"error: {INSTALL} ({e.name} is missing)", file=sys.stderr)
        sys.exit(2)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
