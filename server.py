"""Stage 24 (optional part) — an HTTP endpoint: the model behind POST /generate.

One process loads the run once; every request brings its prompt and its
sampling settings as JSON and gets the continuation back (the prompt not
repeated), whole as {"text": ...} or streamed as server-sent events: one
`data: {"text": ...}` line per piece, then `data: [DONE]`, as chat UIs expect.
The request body is checked before any work: a bad value is a 422 with a
message. Requests run at the same time, each in its own thread with its own
KV cache and random generator, so they never disturb each other; the model's
weights are only read.

New since the chat (cli.py): the same `sample.stream_text`, served over
HTTP. FastAPI and uvicorn are an optional extra (pip install fastapi uvicorn).

    python server.py out/gpt --port 8000
    curl -s localhost:8000/generate -H 'content-type: application/json' \\
         -d '{"prompt": "ROMEO:", "max_new_tokens": 100, "temperature": 0.8}'
    curl -sN localhost:8000/generate -H 'content-type: application/json' \\
         -d '{"prompt": "ROMEO:", "stream": true}'
"""
import argparse
import json
import sys

import torch

from checkpoint import load_run
from sample import stream_text

MAX_NEW_TOKENS_CAP = 1024  # the most one request may ask for: a guard against tying the server up
MAX_PROMPT_CHARS = 20_000  # the prompt is cropped to block_size tokens anyway; this bounds the encoding work
INSTALL = "the server needs FastAPI and uvicorn: pip install fastapi uvicorn"


def request_model():
    """The JSON body of POST /generate, validated by pydantic (each rule becomes a 422 message)."""
    from pydantic import BaseModel, ConfigDict, Field

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored

        prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="text to continue")
        max_new_tokens: int = Field(200, ge=1, le=MAX_NEW_TOKENS_CAP, description="tokens to generate")
        temperature: float = Field(1.0, ge=0.0, description="0 is greedy")
        top_k: int | None = Field(None, ge=0, description="keep the k most likely tokens; 0 or null: off")
        top_p: float | None = Field(None, gt=0.0, le=1.0, description="nucleus probability; null: off")
        repetition_penalty: float = Field(1.0, gt=0.0, description="> 1 discourages repeats")
        stop: str | None = Field(None, description="the answer ends before this text")
        seed: int | None = Field(None, description="the same seed and settings give the same text")
        stream: bool = Field(False, description="server-sent events, one per piece of text")

    return GenerateRequest


def pieces(model, tok, request):
    """The text pieces answering one request: its own generator, and (inside generate) its own KV cache."""
    generator = torch.Generator(device=next(model.parameters()).device)
    if request.seed is None:
        generator.seed()  # fresh randomness per request
    else:
        generator.manual_seed(request.seed)
    return stream_text(model, tok, request.prompt, request.max_new_tokens, stop_text=request.stop,
                       temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
                       repetition_penalty=request.repetition_penalty, generator=generator)


def sse(pieces_iter):
    """Server-sent events: `data: {"text": piece}` per piece, then `data: [DONE]`."""
    for piece in pieces_iter:
        if piece:
            yield f"data: {json.dumps({'text': piece}, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"


def create_app(run_dir, device="cpu"):
    """A FastAPI app serving the run in `run_dir` on `device`: POST /generate, GET /info."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    model, tok, config = load_run(run_dir, device)
    GenerateRequest = request_model()
    app = FastAPI(title="LLM from scratch", description=f"serving {run_dir}")
    info = {"run": str(run_dir), "model": config["model"], "tokenizer": config.get("tokenizer"),
            "quantization": config.get("quantization"), "max_new_tokens_cap": MAX_NEW_TOKENS_CAP}

    @app.get("/info")
    def get_info():
        return info

    @app.post("/generate")
    def generate(request: GenerateRequest):  # a plain def: FastAPI runs each call in its own worker thread
        if request.stream:
            return StreamingResponse(sse(pieces(model, tok, request)), media_type="text/event-stream")
        return {"text": "".join(pieces(model, tok, request))}

    return app


def main(argv=None):
    p = argparse.ArgumentParser(description="Serve a trained run over HTTP (POST /generate).")
    p.add_argument("run", help="run directory (or a file in it), e.g. out/gpt")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | mps (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        import uvicorn

        app = create_app(args.run, args.device)
    except ModuleNotFoundError as e:
        print(f"error: {INSTALL} ({e.name} is missing)", file=sys.stderr)
        sys.exit(2)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
