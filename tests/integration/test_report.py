"""`supportbot report`: the figures equal what the test generated (questions, answers by backend,
👍/👎 with the latest vote counting, hand-offs, no passage, first-token p50/p95, the questions that
need better documents), in text, JSON and CSV; a bad --since is refused, nothing changes."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from bot.commands import report
from bot.config import Settings
from bot.conversation import AnswerRecord, ConversationKey, Message
from bot.llm.base import Finished
from bot.llm.chain import LLMChain
from bot.ops import metrics
from bot.ops.metrics import PrometheusObserver
from bot.reporting import parse_duration
from bot.sampling import KnowledgeChoice
from bot.service import Answered, SupportService, User
from bot.store import RedisStore, answer_key
from tests.conftest import make_store, repo_root
from tests.support.backends import ScriptedLLM
from tests.support.knowledge import knowledge, write_docs

SLACK = ConversationKey("slack", "T1", "C1", "1700.1")
DISCORD = ConversationKey("discord", "G1", "C9")
DAY = 86400.0


async def answer(
    store: RedisStore, key: ConversationKey, question: str, backend: str, ftt: float | None,
    *, answer_id: str, at: float | None = None, no_passage: bool = False,
) -> None:  # fmt: skip
    await store.start_turn(key, Message("user", question))
    record = AnswerRecord(
        answer_id, question, backend, "U0ASKER", at or time.time(), ftt, no_passage=no_passage
    )
    await store.finish_turn(key, Message("assistant", "…"), record)


async def generate(store: RedisStore, redis: Redis) -> None:
    await answer(store, SLACK, "how do I reset?", "local:exaone", 0.1, answer_id="a")
    await answer(store, SLACK, "refund?", "local:exaone", 0.3, answer_id="b")
    await answer(store, SLACK, "shipping?", "openai:gpt", 0.2, answer_id="c")
    await answer(store, SLACK, "warranty?", "", None, answer_id="d", no_passage=True)
    await store.start_turn(SLACK, Message("user", "unanswered (the model failed)"))
    await answer(store, DISCORD, "hello?", "openai:gpt", 0.5, answer_id="e")
    # Older than the period: its answer is not counted (its question's hour is now, though).
    await answer(
        store, DISCORD, "old?", "openai:gpt", 9.0, answer_id="f", at=time.time() - 10 * DAY
    )
    now = time.time()
    assert await store.vote(SLACK, "a", "U1", "up", now)
    assert await store.vote(SLACK, "a", "U2", "up", now)
    assert await store.vote(SLACK, "a", "U1", "down", now)  # U1 changed their mind
    assert await store.vote(SLACK, "b", "U3", "down", now)
    assert await store.vote(DISCORD, "e", "U4", "up", now)
    await redis.hset(answer_key(SLACK, "c"), "handoff", 1)  # as a hand-off marks it


EXPECTED: dict[tuple[str, str, str], dict[str, Any]] = {
    ("slack", "T1", "C1"): {
        "questions": 5, "answers": {"local:exaone": 2, "openai:gpt": 1}, "up": 1, "down": 2,
        "handoffs": 1, "no_passage": 1, "first_token_p50_s": 0.2, "first_token_p95_s": 0.3,
    },
    ("discord", "G1", "C9"): {
        "questions": 2, "answers": {"openai:gpt": 1}, "up": 1, "down": 0,
        "handoffs": 0, "no_passage": 0, "first_token_p50_s": 0.5, "first_token_p95_s": 0.5,
    },
}  # fmt: skip
NEEDS = ["how do I reset?", "refund?", "shipping?", "warranty?"]  # each scores 1


def settings(url: str) -> Settings:
    values: dict[str, Any] = {"redis_url": url, "llm_model": "none"}
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


async def render(redis_server: Any, fmt: str, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert await report.run(settings(redis_server.url), 7 * DAY, fmt) == 0
    return capsys.readouterr().out


async def test_report_figures_equal_what_was_generated_in_all_three_formats(
    redis: Redis, redis_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    store = make_store(redis)
    await generate(store, redis)

    data = json.loads(await render(redis_server, "json", capsys))
    got = {
        (c["platform"], c["workspace"], c["channel"]): {
            k: v for k, v in c.items() if k not in ("platform", "workspace", "channel")
        }
        for c in data["channels"]
    }
    assert got == EXPECTED
    needs = data["needs_better_documents"]
    assert [n["question"] for n in needs] == NEEDS and {n["score"] for n in needs} == {1}

    channels_csv, needs_csv = (await render(redis_server, "csv", capsys)).split("\n\n")
    needs_rows = list(csv.DictReader(io.StringIO(needs_csv)))
    assert [row["question"] for row in needs_rows] == NEEDS
    assert {row["score"] for row in needs_rows} == {"1"}
    rows = list(csv.DictReader(io.StringIO(channels_csv)))
    assert len(rows) == 2
    for row in rows:
        want = EXPECTED[(row["platform"], row["workspace"], row["channel"])]
        assert int(row["questions"]) == want["questions"]
        assert int(row["answers"]) == sum(want["answers"].values())
        assert dict(p.split("=") for p in row["answers_by_backend"].split(";")) == {
            k: str(v) for k, v in want["answers"].items()
        }
        for name in ("up", "down", "handoffs", "no_passage"):
            assert int(row[name]) == want[name], name
        assert float(row["first_token_p50_s"]) == want["first_token_p50_s"]
        assert float(row["first_token_p95_s"]) == want["first_token_p95_s"]

    text = await render(redis_server, "text", capsys)
    assert "slack T1 #C1\n  questions            5\n" in text
    assert "  answers              3 (local:exaone 2, openai:gpt 1)\n" in text
    assert "  👍 / 👎               1 / 2\n  hand-offs            1\n" in text
    assert "  without a passage    1\n  first token p50/p95  0.20s / 0.30s\n" in text
    assert "discord G1 #C9\n  questions            2\n" in text
    assert "  first token p50/p95  0.50s / 0.50s\n" in text
    for question in NEEDS:
        assert f"    1  {question!r}  (" in text
    assert "old?" not in text


async def test_an_empty_store_reports_no_questions(
    redis_server: Any, capsys: pytest.CaptureFixture[str], redis: Redis
) -> None:
    assert "No questions in this period." in await render(redis_server, "text", capsys)


@pytest.mark.parametrize(
    ("text", "seconds"), [("30m", 1800), ("12h", 43200), ("7d", 7 * DAY), (" 2W ", 14 * DAY)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["0d", "7", "d", "-1d", "7y", "1.5h"])
def test_a_bad_since_is_refused_with_the_accepted_forms(bad: str) -> None:
    with pytest.raises(ValueError, match=r"m \(minutes\), h \(hours\), d \(days\) or w"):
        parse_duration(bad)


def test_the_cli_refuses_a_bad_since_and_changes_nothing(redis_server: Any, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS", "LLM_"))}
    env.update(PYTHONPATH=str(repo_root()), HOME=str(tmp_path), REDIS_URL=redis_server.url,
               LLM_MODEL="none")  # fmt: skip
    run = [sys.executable, "-m", "bot", "report"]
    bad = subprocess.run([*run, "--since", "soon"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and bad.stdout == ""
    assert "--since: 'soon' is not a duration" in bad.stderr
    good = subprocess.run([*run, "--format", "csv"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=60)  # fmt: skip
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith("platform,workspace,channel,questions,answers,")


async def test_answers_without_a_passage_are_counted_in_the_report_and_on_metrics(
    redis: Redis, tmp_path: Path
) -> None:
    llm = ScriptedLLM()
    store = make_store(redis)
    store.knowledge_defaults = KnowledgeChoice("strict", "default")
    kb = knowledge(redis, semantic=False)
    svc = SupportService(
        store=store, llm=LLMChain(llm, None), persona="p", observer=PrometheusObserver(),
        knowledge=kb,
    )  # fmt: skip
    await svc.llm.start()
    await kb.add([str(write_docs(tmp_path / "docs"))], "default")
    before = metrics.REGISTRY.get_sample_value("supportbot_no_passage_total", {"platform": "slack"})
    key = ConversationKey("slack", "T9", "C9", "1.1")
    refused = [e async for e in svc.ask(key, User("U1"), "What is the capital of Mongolia?")]
    assert any(isinstance(e, Answered) for e in refused)  # the reply gets the controls too
    answered = [e async for e in svc.ask(key, User("U1"), "How do I return an item?")]
    assert isinstance(answered[-1], Finished)
    after = metrics.REGISTRY.get_sample_value("supportbot_no_passage_total", {"platform": "slack"})
    assert (after or 0) - (before or 0) == 1
    questions, rows = await store.report_data(time.time() - DAY)
    assert questions == {("slack", "T9", "C9"): 2}
    assert sorted((r.question, r.backend, r.no_passage) for r in rows) == [
        ("How do I return an item?", "test:scripted", False),
        ("What is the capital of Mongolia?", "", True),
    ]
