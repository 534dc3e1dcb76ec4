"""Answer judges of the MUSE protocol (Sec. 4.3, step 3): a score from 1 to 10 per predicted target.

The paper prompts GPT-3.5; its prompt is not released, so ``judge_prompt`` is ours. Two judges:
``IoUOnlyJudge`` (offline default: every matched target scores 10, so the protocol reduces to mask
IoU; reports say "IoU-only") and ``OpenAICompatibleJudge`` (any OpenAI-compatible chat endpoint).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from pixellm.data.datamodule import default_cache_dir
from pixellm.data.loading import is_number

MAX_SCORE = 10  # judge scores are 1..10; an unmatched target scores 0
RETRIED_HTTP_CODES = (429, 500, 502, 503, 504)


@dataclass(frozen=True)
class Judgement:
    """A judge's verdict on one answer.

    Attributes:
        scores: one score in 0..10 per predicted target (mask reference), in text order; 0 for a
            target matched to no ground truth.
        prompt: the text sent to the judge ("" when none was sent).
        reply: the judge's reply ("" when none).
        parsed: False when the reply held no usable list of scores (every score is then 0).
    """

    scores: list[int]
    prompt: str = ""
    reply: str = ""
    parsed: bool = True


class AnswerJudge(ABC):
    """Scores the targets of one rewritten answer (see ``pixellm.evaluation.muse_protocol``)."""

    label: str = "judge"

    @abstractmethod
    def judge(self, question: str, rewritten_answer: str, matched: list[bool]) -> Judgement:
        """Score each predicted target.

        Args:
            question: the question asked.
            rewritten_answer: the generated answer with every mask reference replaced by its matched
                ground truth's "(description [x0,y0,x1,y1])", or "(None [])".
            matched: per predicted target, in text order, whether it matched a ground truth.
        """


class IoUOnlyJudge(AnswerJudge):
    """Offline default: 10 for every matched target, 0 otherwise; needs no network."""

    label = "IoU-only"

    def judge(self, question: str, rewritten_answer: str, matched: list[bool]) -> Judgement:
        return Judgement(scores=[MAX_SCORE if m else 0 for m in matched])


def judge_prompt(question: str, rewritten_answer: str, num_targets: int) -> str:
    """The grading prompt (ours; the paper's is not released)."""
    return (
        "You grade the answers of a visual assistant that segments objects in an image. After each "
        "object the assistant segmented, the answer shows in parentheses the ground-truth description "
        "and box [x0,y0,x1,y1] of the object its mask matched, or (None []) when it matched no object.\n"
        f"Question: {question}\n"
        f"Answer: {rewritten_answer}\n"
        f"For each of the {num_targets} parenthesised objects, in order, rate from 1 to 10 how well the "
        "answer's mention and its matched object answer the question (10: exactly an object the "
        f"question asks for, described correctly). Reply with only a JSON list of {num_targets} integers."
    )


REFERENCE_SPAN = re.compile(r"\([^()\[\]]*\[[^\[\]]*\]\s*\)")  # "(a grey cat [1,2,3,4])", "(None [])"


def parse_scores(reply: str, count: int) -> list[int] | None:
    """The first JSON list of ``count`` finite numbers (not booleans) in ``reply`` outside the quoted
    "(description [x0,y0,x1,y1])" references, rounded and clipped to 1..10; else None.

    A reply that quotes a reference before its scores would otherwise give the box as the scores of
    a 4-target answer. ``NaN`` and ``Infinity``, which JSON parsing accepts, are not scores.
    """
    for candidate in re.findall(r"\[[^\[\]]*\]", REFERENCE_SPAN.sub(" ", reply)):
        try:
            values = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if len(values) == count and all(is_number(v) for v in values):
            return [min(MAX_SCORE, max(1, round(v))) for v in values]
    return None


def reply_text(payload: object) -> str:
    """The text of a ``/chat/completions`` reply; "" for a reply without text (a refusal).

    Raises:
        ValueError: the payload is not a chat completion (an error body, no choices).
    """
    try:
        message = payload["choices"][0]["message"]  # type: ignore[index]
        content = message["content"]
    except (KeyError, IndexError, TypeError) as error:
        raise ValueError(f"not a chat completion: {json.dumps(payload)[:300]}") from error
    if content is None:
        return ""
    if not isinstance(content, str):
        raise ValueError(f"the reply's content is not text: {json.dumps(content)[:300]}")
    return content


class OpenAICompatibleJudge(AnswerJudge):
    """A judge behind any OpenAI-compatible ``/chat/completions`` endpoint, with a disk cache.

    The key is read from the environment only, never logged or written. Replies are cached on
    disk keyed by (model, prompt), so re-running an evaluation costs nothing.

    Args:
        model: chat model name; default ``$PIXELLM_JUDGE_MODEL``, else "gpt-3.5-turbo" (the paper's).
        base_url: endpoint root (``.../v1``); default ``$PIXELLM_JUDGE_BASE_URL``, else
            "https://api.openai.com/v1".
        api_key_env: name of the environment variable that holds the API key.
        cache_dir: reply cache folder; default ``<PIXELLM_CACHE or ~/.cache/pixellm>/judge``.
        max_retries: retries after a 429/5xx reply, a connection error or a reply that is not a chat
            completion (an error body with status 200, no choices, not JSON). A reply without text
            (a refusal, ``content: null``) is a reply without scores, not an error.
        backoff_s: first retry delay in seconds, doubled at each retry.
        timeout_s: per-request timeout in seconds.
    """

    def __init__(
        self,
        model: str | None = None,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        cache_dir: str | None = None,
        max_retries: int = 4,
        backoff_s: float = 2.0,
        timeout_s: float = 60.0,
    ) -> None:
        self.model = model or os.environ.get("PIXELLM_JUDGE_MODEL") or "gpt-3.5-turbo"
        base = base_url or os.environ.get("PIXELLM_JUDGE_BASE_URL") or "https://api.openai.com/v1"
        self.url = base.rstrip("/") + "/chat/completions"
        self.api_key_env = api_key_env
        if not os.environ.get(api_key_env):
            raise ValueError(
                f"OpenAICompatibleJudge needs an API key in the environment variable {api_key_env} "
                f"(for {self.url}); set it, or use the offline IoUOnlyJudge"
            )
        self.cache_dir = Path(cache_dir or Path(default_cache_dir()) / "judge")
        self.max_retries, self.backoff_s, self.timeout_s = max_retries, backoff_s, timeout_s
        self.label = f"judge {self.model}"

    def judge(self, question: str, rewritten_answer: str, matched: list[bool]) -> Judgement:
        if not matched:
            return Judgement(scores=[])
        prompt = judge_prompt(question, rewritten_answer, len(matched))
        reply = self.complete(prompt)
        scores = parse_scores(reply, len(matched))
        if scores is None:
            return Judgement([0] * len(matched), prompt, reply, parsed=False)
        return Judgement([s if m else 0 for s, m in zip(scores, matched, strict=True)], prompt, reply)

    def _cache_path(self, prompt: str) -> Path:
        digest = hashlib.sha256(json.dumps([self.model, prompt]).encode()).hexdigest()
        return self.cache_dir / f"{digest}.json"

    def complete(self, prompt: str) -> str:
        """The model's reply to ``prompt``: from the cache, else from the endpoint (then cached)."""
        path = self._cache_path(prompt)
        if path.exists():
            cached = json.loads(path.read_text()).get("reply")
            if isinstance(cached, str):  # earlier versions could cache a refusal's null: asked again
                return cached
        reply = self._request(prompt)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"model": self.model, "prompt": prompt, "reply": reply}))
        tmp.replace(path)
        return reply

    def _request(self, prompt: str) -> str:
        body = json.dumps(
            {"model": self.model, "temperature": 0, "messages": [{"role": "user", "content": prompt}]}
        ).encode()
        headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {os.environ.get(self.api_key_env, '')}",
        }
        failure = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return reply_text(json.loads(response.read()))
            except ValueError as error:  # a body that is not a chat completion (JSONDecodeError included)
                failure = f"malformed reply: {error}"
            except urllib.error.HTTPError as error:
                detail = error.read()[:300].decode(errors="replace")
                failure = f"HTTP {error.code}: {detail}"
                if error.code not in RETRIED_HTTP_CODES:
                    break
            except (urllib.error.URLError, TimeoutError) as error:
                failure = f"{type(error).__name__}: {error}"
        raise RuntimeError(f"judge request to {self.url} (model {self.model}) failed: {failure}")
