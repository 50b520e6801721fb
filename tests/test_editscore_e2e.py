"""EditScore end to end with the real `editscore` package: its `openai` backbone talks to a stub
OpenAI-compatible chat-completions server on 127.0.0.1, so EditScore's own prompts and answer parsing run.

The stub answers in the format EditScore's prompts ask for, `{"reasoning": ..., "score": [a, b]}`, with
a and b in 0..25 taken from a hash of the request (different images, different scores). The scores our
client gets from `python -m rcgrpo.reward_server --scorer editscore ...` must equal `editscore.EditScore`
called directly on the same images, and EditScore's formula applied to what the stub answered.
The GPU backbones (qwen25vl, qwen3vl, their vLLM variants, internvl3_5) need CUDA and are not run here.
"""
import contextlib
import hashlib
import inspect
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

editscore = pytest.importorskip(
    "editscore", reason="the editscore package is not installed (pip install --no-deps editscore==0.2 json-repair)")

from rcgrpo.rewards import EditScoreClient, RewardServerError  # noqa: E402
from rcgrpo.rewards.codec import decode_png_base64, encode_png_base64  # noqa: E402
from rcgrpo.rewards.editscore_scorer import EditScoreScorer, editscore_kwargs  # noqa: E402
from rcgrpo.rewards.server import RewardServer, ServerSettings  # noqa: E402
from test_reward_server import clean_env, start_server_process  # noqa: E402

API_KEY = "sk-stub-key"
TOKEN = "reward-server-token"
MODEL = "stub-vlm"
SCORE_RANGE = 25


class StubChat:
    """A chat-completions endpoint: POST /v1/chat/completions; records (kind, images, scores) per call."""

    def __init__(self):
        self.calls: list[dict] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Authorization") != f"Bearer {API_KEY}":
                    return self._answer(401, {"error": {"code": "invalid_api_key", "message": "bad key"}})
                payload = json.loads(raw)
                content = payload["messages"][0]["content"]
                text = content[0]["text"]
                images = [c["image_url"]["url"] for c in content[1:] if c["type"] == "image_url"]
                kind = "SC" if "Editing instruction:" in text else "PQ"
                if "ratelimit" in text:
                    return self._answer(429, {"error": {"code": "rate_limit_exceeded", "message": "slow down"}})
                digest = hashlib.sha256(raw).digest()
                scores = [digest[0] % (SCORE_RANGE + 1), digest[1] % (SCORE_RANGE + 1)]
                answer = "no scores here" if "garbage" in text else json.dumps(
                    {"reasoning": f"stub {kind} answer", "score": scores})
                with stub.lock:
                    stub.calls.append({"kind": kind, "images": images, "scores": scores, "model": payload["model"],
                                       "text": text})
                self._answer(200, {"choices": [{"message": {"role": "assistant", "content": answer}}]})

            def _answer(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/chat/completions"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def direct_editscore(url):
    return editscore.EditScore(backbone="openai", openai_url=url, key=API_KEY, model_name_or_path=MODEL,
                               score_range=SCORE_RANGE)


def examples(n=3, size=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.rand(n, 3, size, size, generator=g)


def as_served(t):
    """The PIL image the server decodes from what the client sends."""
    return decode_png_base64(encode_png_base64(t))


def expected_overall(sc, pq):
    unit = SCORE_RANGE / 10
    return math.sqrt(min(sc) / unit * min(pq) / unit)


def test_reward_server_scores_equal_editscore_called_directly(tmp_path):
    edited, sources = examples()
    instructions = ["make the sky purple", "remove the cat", "add a red hat"]
    with StubChat() as stub:
        args = ["--scorer", "editscore", "--editscore-backbone", "openai", "--editscore-model", MODEL,
                "--editscore-url", stub.url, "--editscore-score-range", SCORE_RANGE, "--editscore-num-pass", 1]
        env = clean_env(OPENAI_API_KEY=API_KEY, RCGRPO_REWARD_TOKEN=TOKEN)
        with start_server_process(args, env=env) as (url, _proc):
            client = EditScoreClient(url, token=TOKEN, timeout=60, retries=0, batch_size=2)
            assert client.health()["scorer"] == "editscore:openai"
            served = client(edited, sources, None, instructions)
            served_calls = list(stub.calls)
        stub.calls.clear()
        scorer = direct_editscore(stub.url)
        direct = [scorer.evaluate([as_served(s), as_served(e)], text)["overall"]
                  for s, e, text in zip(sources, edited, instructions)]
        direct_calls = list(stub.calls)

    assert served.dtype == torch.float32 and served.shape == (3,)
    assert torch.equal(served, torch.tensor(direct, dtype=torch.float32))
    assert len(set(served.tolist())) > 1, served  # different images get different scores
    # EditScore asked one SC question (source + edited + instruction) and one PQ question (edited) per edit
    assert [c["kind"] for c in served_calls] == ["SC", "PQ"] * 3
    assert [len(c["images"]) for c in served_calls] == [2, 1] * 3
    assert all(c["model"] == MODEL and c["images"][0].startswith("data:image/jpeg;base64,") for c in served_calls)
    assert [c["text"].rsplit("Editing instruction: ", 1)[1].strip() for c in served_calls[::2]] == instructions
    assert [c["scores"] for c in served_calls] == [c["scores"] for c in direct_calls]  # same requests, same answers
    formula = [expected_overall(served_calls[2 * i]["scores"], served_calls[2 * i + 1]["scores"]) for i in range(3)]
    assert torch.allclose(served, torch.tensor(formula, dtype=torch.float32), atol=1e-6)


@contextlib.contextmanager
def in_process(scorer):
    server = RewardServer(("127.0.0.1", 0), scorer, scorer_name="editscore:test", settings=ServerSettings())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        server.shutdown()
        server.server_close()


def test_unparseable_answers_are_refused_not_guessed():
    edited, sources = examples(1)
    with StubChat() as stub:
        scorer = EditScoreScorer(**editscore_kwargs_for(stub.url))
        with in_process(scorer) as url:
            with pytest.raises(RewardServerError, match="HTTP 500") as err:
                EditScoreClient(url, retries=0, timeout=60)(edited, sources, None, ["garbage please"])
            assert err.value.request_id
            # EditScore itself would have returned a random guess
            result = scorer.model.evaluate([as_served(sources[0]), as_served(edited[0])], "garbage please")
            assert result["SC_reasoning"].startswith("guess_if_cannot_parse")


def test_upstream_rate_limit_is_a_retryable_503():
    edited, sources = examples(1)
    with StubChat() as stub:
        with in_process(EditScoreScorer(**editscore_kwargs_for(stub.url))) as url:
            with pytest.raises(RewardServerError, match=r"busy for 2 attempt\(s\).*HTTP 503.*rate limit") as err:
                EditScoreClient(url, retries=1, backoff=0.01, max_backoff=0.01, timeout=60)(
                    edited, sources, None, ["ratelimit"])
            assert err.value.status == 503


class BatchedBackbone:
    """The openai backbone with a `batch_inference`, as EditScore's vLLM backbones have (one call per prompt)."""

    def __init__(self, inner):
        self.inner = inner
        self.inner.use_encode = True  # batch_evaluate does not set it (evaluate does, for openai)

    def prepare_input(self, images, text_prompt=""):
        return self.inner.prepare_input(images, text_prompt)

    def inference(self, prompt, seed=None):
        return self.inner.inference(prompt, seed=seed)

    def batch_inference(self, prompts, seed=None):
        return [self.inner.inference(p, seed=seed) for p in prompts]


def test_batched_scoring_runs_batch_evaluate():
    edited, sources = examples(2, seed=5)
    instructions = ["turn the car blue", "remove the tree"]
    with StubChat() as stub:
        model = direct_editscore(stub.url)
        model.model = BatchedBackbone(model.model)
        with in_process(EditScoreScorer(model=model, batched=True)) as url:
            served = EditScoreClient(url, retries=0, timeout=60)(edited, sources, None, instructions)
        calls = list(stub.calls)
        direct = model.batch_evaluate([[as_served(s), as_served(e)] for s, e in zip(sources, edited)], instructions)
    assert torch.equal(served, torch.tensor([r["O_score"] for r in direct], dtype=torch.float32))
    assert [c["kind"] for c in calls] == ["SC", "SC", "PQ", "PQ"]  # one batch: all SC prompts, then all PQ
    assert [len(c["images"]) for c in calls] == [2, 2, 2, 2]  # batch_evaluate shows PQ both images
    formula = [expected_overall(calls[i]["scores"], calls[2 + i]["scores"]) for i in range(2)]
    assert torch.allclose(served, torch.tensor(formula, dtype=torch.float32), atol=1e-6)


def editscore_kwargs_for(url):
    return dict(backbone="openai", model_name_or_path=MODEL, url=url, api_key=API_KEY, score_range=SCORE_RANGE)


def test_our_constructor_arguments_are_editscores():
    accepted = set(inspect.signature(editscore.EditScore).parameters)
    for backbone in ("openai", "qwen25vl", "qwen25vl_vllm", "qwen3vl_vllm"):
        kwargs = editscore_kwargs(backbone=backbone, model_name_or_path="m",
                                  lora_path="" if backbone == "openai" else "/lora")
        assert set(kwargs) <= accepted, set(kwargs) - accepted
    assert "enable_lora" not in accepted  # the README's example argument; 0.2 takes lora_path alone


def test_backbones_that_cannot_score_are_refused_at_start():
    class NoSeed:
        def inference(self, messages):  # as editscore 0.2's InternVL35
            return ""

    class Model:
        backbone = "internvl3_5"
        model = NoSeed()

    with pytest.raises(RuntimeError, match="takes no 'seed'"):
        EditScoreScorer(model=Model())
    with pytest.raises(ValueError, match="no batch_inference"):
        EditScoreScorer(model=direct_editscore("http://127.0.0.1:9/v1/chat/completions"), batched=True)
    with pytest.raises(ValueError, match="needs a backbone with batched inference"):
        EditScoreScorer(batched=True, **editscore_kwargs_for("http://127.0.0.1:9/v1/chat/completions"))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            EditScoreScorer(backbone="qwen25vl", model_name_or_path="Qwen/Qwen2.5-VL-7B-Instruct")
