"""The HTTP endpoint through FastAPI's TestClient: answers, streams, validates, and serves requests at once."""
import json
import sys
import threading

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
