"""Judges against a fake OpenAI-compatible server on 127.0.0.1: request shape, retries, cache, key."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pixellm.evaluation.judge import IoUOnlyJudge, OpenAICompatibleJudge, parse_scores

KEY_ENV = "PIXELLM_TEST_JUDGE_KEY"


class FakeChatServer:
    """Answers POST /v1/chat/completions; the first ``failures`` requests get HTTP 503."""

    def __init__(self, reply: str | None, failures: int = 0, bodies: list[bytes] = ()) -> None:
        self.requests: list[dict] = []
        self.reply, self.failures = reply, failures
        self.bodies = list(bodies)  # 200 replies sent first, as they are
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if server.failures > 0:
                    server.failures -= 1
                    self.send_response(503)
                    self.end_headers()
                    self.wfile.write(b"overloaded")
                    return
                payload = {"choices": [{"message": {"role": "assistant", "content": server.reply}}]}
                data = server.bodies.pop(0) if server.bodies else json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    fake = FakeChatServer("Scores: [7, 3]", failures=2)
    yield fake
    fake.close()


def make_judge(server: FakeChatServer, tmp_path) -> OpenAICompatibleJudge:
    return OpenAICompatibleJudge(
        model="grader-1", base_url=server.base_url, api_key_env=KEY_ENV, cache_dir=str(tmp_path / "cache"),
        max_retries=3, backoff_s=0.01, timeout_s=5,
    )


def test_request_shape_retries_on_5xx_and_cache_hit(server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-secret")
    judge = make_judge(server, tmp_path)
    answer = "the cat (a grey cat [1,2,3,4]) and (None [])"
    verdict = judge.judge("where is the cat?", answer, [True, False])
    assert verdict.scores == [7, 0]  # the unmatched target scores 0 whatever the judge says
    assert verdict.parsed and verdict.reply == "Scores: [7, 3]"
    assert len(server.requests) == 3  # two 503 replies, retried with backoff, then success
    request = server.requests[-1]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-test-secret"
    assert request["body"]["model"] == "grader-1" and request["body"]["temperature"] == 0
    (message,) = request["body"]["messages"]
    assert message["role"] == "user" and message["content"] == verdict.prompt
    assert "where is the cat?" in verdict.prompt and "(a grey cat [1,2,3,4])" in verdict.prompt
    assert "JSON list of 2 integers" in verdict.prompt
    # a re-run is answered from the disk cache: no new request, same verdict, key never written
    again = make_judge(server, tmp_path).judge("where is the cat?", answer, [True, False])
    assert again == verdict and len(server.requests) == 3
    cached = list((tmp_path / "cache").glob("*.json"))
    assert len(cached) == 1 and "sk-test-secret" not in cached[0].read_text()


def test_gives_up_after_the_retries_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")
    fake = FakeChatServer("[1]", failures=10)
    try:
        with pytest.raises(RuntimeError, match=r"failed: HTTP 503: overloaded"):
            make_judge(fake, tmp_path).judge("q", "a (x [0,0,1,1])", [True])
        assert len(fake.requests) == 4  # 1 + 3 retries
    finally:
        fake.close()


def test_missing_key_is_a_clear_error(server, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=f"API key in the environment variable {KEY_ENV}"):
        make_judge(server, tmp_path)
    assert server.requests == []


def test_unparseable_reply_scores_zero_and_is_flagged(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")
    fake = FakeChatServer("I cannot grade this.")
    try:
        verdict = make_judge(fake, tmp_path).judge("q", "a (x [0,0,1,1])", [True])
    finally:
        fake.close()
    assert verdict.scores == [0] and not verdict.parsed


def test_a_reply_that_is_not_a_chat_completion_is_retried(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")
    bodies = [b'{"error": {"message": "rate limited"}}', b"<html>proxy</html>", b'{"choices": []}']
    fake = FakeChatServer("[6]", bodies=bodies)
    try:
        verdict = make_judge(fake, tmp_path).judge("q", "a (x [0,0,1,1])", [True])
        assert verdict.scores == [6] and verdict.parsed and len(fake.requests) == 4
        fake.bodies = bodies * 2  # more malformed replies than retries: the documented error, nothing cached
        with pytest.raises(RuntimeError, match=r"failed: malformed reply: not a chat completion"):
            make_judge(fake, tmp_path / "other").judge("q", "a (x [0,0,1,1])", [True])
        assert not (tmp_path / "other" / "cache").exists()
    finally:
        fake.close()


def test_a_refusal_scores_zero_is_flagged_and_cached_as_text(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")
    fake = FakeChatServer(None)  # content: null, as a refusal
    try:
        verdict = make_judge(fake, tmp_path).judge("q", "a (x [0,0,1,1])", [True])
        assert verdict.scores == [0] and not verdict.parsed and verdict.reply == ""
        again = make_judge(fake, tmp_path).judge("q", "a (x [0,0,1,1])", [True])
        assert again == verdict and len(fake.requests) == 1  # answered from the cache
        (cached,) = (tmp_path / "cache").glob("*.json")
        cached.write_text(json.dumps({"reply": None}))  # an earlier version's cache entry
        fake.reply = "[4]"
        assert make_judge(fake, tmp_path).judge("q", "a (x [0,0,1,1])", [True]).scores == [4]
        assert len(fake.requests) == 2  # that entry is asked again
    finally:
        fake.close()


def test_parse_scores_and_iou_only_judge():
    # a reply that quotes references: their boxes are not the scores of a 4-target answer
    assert parse_scores("1. (a dog [10,20,30,40]) -> 2\nScores: [2, 3, 1, 2]", 4) == [2, 3, 1, 2]
    assert parse_scores("(None []) (a cat [1, 2, 3, 4]) [9, 8, 7, 6]", 4) == [9, 8, 7, 6]
    assert parse_scores("```json\n[10, 0.4, 12]\n```", 3) == [10, 1, 10]
    assert parse_scores("[1, 2] then [3, 4, 5]", 3) == [3, 4, 5]
    assert parse_scores("[1, 2]", 3) is None
    for reply in ("Scores: [NaN, 8]", "[Infinity, 3]", "[1e400, 2]", "[true, 9]"):  # not scores: unparsed
        assert parse_scores(reply, 2) is None
    assert parse_scores("[NaN, 8] or rather [7, 8]", 2) == [7, 8]
    verdict = IoUOnlyJudge().judge("q", "a", [True, False, True])
    assert verdict.scores == [10, 0, 10] and verdict.prompt == "" and IoUOnlyJudge.label == "IoU-only"
