"""The HTTP endpoint through FastAPI's TestClient: answers, streams, validates, and serves requests at once."""
import json
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # TestClient's transport
from fastapi.testclient import TestClient  # noqa: E402

import server  # noqa: E402
from char_tokenizer import CharTokenizer  # noqa: E402
from checkpoint import WEIGHTS, load_run, model_config_dict, save_run_files, save_weights  # noqa: E402
from sample import stream_text  # noqa: E402
from transformer import ModelConfig, Transformer  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    tok = CharTokenizer.train("to be or not to be, that is the question\n")
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32,
                                    pos="rope", norm="rmsnorm", mlp="swiglu"))
    run_dir = tmp_path_factory.mktemp("server") / "run"
    save_run_files(run_dir, {"model": model_config_dict(model), "tokenizer": "char",
                             "tokenizer_file": "tokenizer.json"}, tok, "tokenizer.json")
    save_weights(model, run_dir / WEIGHTS)
    return run_dir


@pytest.fixture(scope="module")
def client(run):
    return TestClient(server.create_app(run))


def post(client, **body):
    return client.post("/generate", json=body)


def test_answers_like_the_sampler_and_repeats_with_a_seed(client, run):
    reply = post(client, prompt="to be", max_new_tokens=20, temperature=0)
    assert reply.status_code == 200
    model, tok, _ = load_run(run)
    assert reply.json()["text"] == "".join(stream_text(model, tok, "to be", 20, temperature=0))
    assert len(reply.json()["text"]) == 20  # one character per token, no EOS in a char vocabulary
    first, again = (post(client, prompt="to", max_new_tokens=30, seed=7, top_p=0.95).json() for _ in range(2))
    assert first == again
    assert client.get("/info").json()["model"]["n_layer"] == 2


def test_streams_server_sent_events(client):
    reply = post(client, prompt="or not", max_new_tokens=25, seed=3, stream=True)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in reply.text.split("\n\n") if line]
    assert events[-1] == "[DONE]" and len(events) > 2
    streamed = "".join(json.loads(e)["text"] for e in events[:-1])
    assert streamed == post(client, prompt="or not", max_new_tokens=25, seed=3).json()["text"]


@pytest.mark.parametrize("field, value", [("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("top_k", -1),
                                          ("max_new_tokens", server.MAX_NEW_TOKENS_CAP + 1), ("max_new_tokens", 0),
                                          ("repetition_penalty", 0), ("prompt", 3), ("temprature", 0.5)])
def test_rejects_a_bad_request_with_422_and_a_message(client, field, value):
    reply = post(client, **{"prompt": "to be", field: value})
    assert reply.status_code == 422
    detail = reply.json()["detail"][0]
    assert detail["loc"][-1] == field and detail["msg"]


def test_openai_endpoints_answer_a_body_that_is_not_json_with_an_openai_error(client):
    for body in (b'{"model": "run", "prompt": ', b""):
        reply = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert reply.status_code == 400
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"} and reply.json()["error"]["message"]


def test_concurrent_requests_do_not_disturb_each_other(client):
    bodies = [dict(prompt="to be", max_new_tokens=150, seed=1), dict(prompt="the question", max_new_tokens=150,
                                                                    seed=2, temperature=0.7, stream=True)]
    alone = [post(client, **body).text for body in bodies]
    together, start = [None, None], threading.Barrier(2)

    def worker(i):
        start.wait()
        together[i] = post(client, **bodies[i]).text

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert together == alone


def test_command_line_errors_exit_2(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        server.main([str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "not a run directory" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if uvicorn were not installed
    with pytest.raises(SystemExit) as exit_info:
        server.main([str(tmp_path / "missing")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "pip install fastapi uvicorn" in err[0]


# --- OpenAI's API, through the official `openai` client against a real server on 127.0.0.1 -------------------
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from chat_format import encode_chat  # noqa: E402
from test_cli import REPLY, scripted_chat_run  # noqa: E402


@contextmanager
def serving(run_dir):
    """A uvicorn server for `run_dir` in a thread, on a free port; yields an OpenAI client pointed at it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # the port is taken here, so no other process can race for it
    web = uvicorn.Server(uvicorn.Config(server.create_app(run_dir), log_level="warning"))
    thread = threading.Thread(target=web.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not web.started:
            thread.join(0.01)
            assert thread.is_alive(), "the server did not start"
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="not-checked",
                            max_retries=0, timeout=60)
    finally:
        web.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def base_api(run):
    with serving(run) as api:
        yield api


@pytest.fixture(scope="module")
def chat_api(tmp_path_factory):
    with serving(scripted_chat_run(tmp_path_factory.mktemp("server") / "chat")) as api:
        yield api


def streamed(chunks):
    """The text of a stream of chunks, its finish reason and its usage (when asked for)."""
    text, finish, usage = [], None, None
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            text.append(piece or "")
            finish = choice.finish_reason or finish
    return [t for t in text if t], finish, usage


def test_models_and_text_completions_match_the_sampler(base_api, run):
    assert [m.id for m in base_api.models.list().data] == ["run"]
    assert base_api.models.retrieve("run").id == "run"
    model, tok, _ = load_run(run)
    reply = base_api.completions.create(model="run", prompt="to be", max_tokens=20, temperature=0)
    assert reply.choices[0].text == "".join(stream_text(model, tok, "to be", 20, temperature=0))
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (5, 20, 25)
    pieces, finish, usage = streamed(base_api.completions.create(
        model="run", prompt="to be", max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(pieces) == reply.choices[0].text and len(pieces) == 20 and finish == "length"
    assert usage.model_dump() == reply.usage.model_dump()
    stopped = base_api.completions.create(model="run", prompt="to be", max_tokens=20, temperature=0, stop=["e", "o"])
    assert stopped.choices[0].finish_reason == "stop"
    assert reply.choices[0].text.startswith(stopped.choices[0].text) and not {"e", "o"} & set(stopped.choices[0].text)


def test_chat_completion_stops_at_end_and_streams_the_same_text(chat_api, tmp_path):
    messages = [{"role": "system", "content": "日本語で"}, {"role": "user", "content": "猫は?"}]
    reply = chat_api.chat.completions.create(model="chat", messages=messages, temperature=0)
    choice = reply.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", REPLY, "stop")
    _, tok, _ = load_run(scripted_chat_run(tmp_path / "chat"))
    prompt = encode_chat(tok, messages, add_generation_prompt=True)[0]
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == len(REPLY.encode()) + 1  # bytes, then <|end|>
    pieces, finish, usage = streamed(chat_api.chat.completions.create(
        model="chat", messages=messages, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert pieces == list(REPLY) and finish == "stop"  # a whole character per chunk, never three U+FFFD and usage.model_dump() == reply.usage.model_dump()
    cut = chat_api.chat.completions.create(model="chat", messages=messages, temperature=0, max_tokens=3)
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == ("猫", "length")
    role_token = chat_api.completions.create(model="chat", prompt="h", max_tokens=10, temperature=0)
    assert (role_token.choices[0].text, role_token.choices[0].finish_reason) == ("i", "stop")  # not "i<|system|>"


@pytest.mark.parametrize("api_name, call, param", [
    ("base_api", dict(n=2), "n"),
    ("base_api", dict(temperature=-1), "temperature"),
    ("base_api", dict(max_tokens=server.MAX_NEW_TOKENS_CAP + 1), "max_tokens"),
    ("base_api", dict(extra_body={"frobnicate": 1}), "frobnicate"),
    ("base_api", dict(), "messages"),  # a base run has no chat tokens
    ("chat_api", dict(messages=[{"role": "tool", "content": "x"}]), "messages.0.role"),
    ("chat_api", dict(messages=[{"role": "user", "content": "x" * 100}]), "messages"),  # past the context
])
def test_a_bad_request_gets_an_openai_error(request, api_name, call, param):
    api = request.getfixturevalue(api_name)
    model = api.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as error:
        api.chat.completions.create(**{"model": model, "messages": [{"role": "user", "content": "hi"}], **call})
    body = error.value.response.json()["error"]
    assert error.value.status_code == 400 and body["param"] == param and body["message"]
    assert body["type"] == "invalid_request_error" and "code" in body
    with pytest.raises(openai.NotFoundError) as error:
        api.completions.create(model="gpt-4o", prompt="to be")
    assert error.value.response.json()["error"]["code"] == "model_not_found"


def test_concurrent_openai_requests_equal_sequential_ones(base_api, chat_api):
    calls = [lambda: base_api.completions.create(model="run", prompt="to be", max_tokens=60, seed=1).choices[0].text,
             lambda: "".join(streamed(base_api.completions.create(model="run", prompt="or not", max_tokens=60,
                                                                    seed=2, stream=True))[0]),
             lambda: chat_api.completions.create(model="chat", prompt="more", max_tokens=60, seed=3).choices[0].text,
             lambda: chat_api.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                                                      seed=4).choices[0].message.content]
    alone = [call() for call in calls]
    with ThreadPoolExecutor(len(calls)) as pool:
        together = list(pool.map(lambda call: call(), calls))
    assert together == alone and len(set(alone)) == len(alone)


def test_a_chat_answers_penalty_counts_its_own_tokens_a_completions_the_prompt_too(tmp_path, monkeypatch):
    asked = []

    def stream_text(model, tok, prompt, max_new_tokens, **rules):
        asked.append((rules["repetition_penalty"], rules["penalize_prompt"]))
        yield "x"
        return "stop", 1

    monkeypatch.setattr(server, "stream_text", stream_text)
    client = TestClient(server.create_app(scripted_chat_run(tmp_path / "chat")))
    chat = client.post("/v1/chat/completions", json={"model": "chat", "repetition_penalty": 1.3,
                                                     "messages": [{"role": "user", "content": "hi"}]})
    text = client.post("/v1/completions", json={"model": "chat", "prompt": "hi", "repetition_penalty": 1.3})
    assert (chat.status_code, text.status_code) == (200, 200)
    assert asked == [(1.3, False), (1.3, True)]
