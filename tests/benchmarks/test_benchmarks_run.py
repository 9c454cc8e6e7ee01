"""The benchmark scripts, run with reduced sizes so they cannot rot.

Speed is not asserted here (benchmarks print figures, side by side in one run); these check that
every figure the README quotes is still produced. The GPU benchmark is the same script as the
CPU proxy with --size full --device cuda, so running it on CPU with the tiny shape covers it.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.benchmarks import engine_bench, memory_bench, overhead_bench

pytestmark = pytest.mark.slow


def test_engine_bench_prints_every_figure(capsys):
    args = engine_bench.parse(
        ["--size", "tiny", "--concurrency", "1,4", "--new-tokens", "6", "--repeat", "2",
         "--ttft-prompt-words", "40", "--pipeline-max", "2"]
    )  # fmt: skip
    asyncio.run(engine_bench.main(args))
    out = capsys.readouterr().out
    assert re.search(r"single stream: \d+ tokens/s", out)
    assert re.search(r"time to first token, 40-word prompt: p50 [\d.]+ ms", out)
    for n in (1, 4):
        row = re.search(rf"\s{n} concurrent: engine\s+\d+ tokens/s .* ratio [\d.]+x", out)
        assert row, out
    assert re.search(r"for 24 tokens", out)


def test_overhead_bench_reports_latency_and_round_trips(capsys):
    overhead_bench.main(["--channels", "5", "--rounds", "2"])
    out = capsys.readouterr().out
    assert re.search(r"p50 [\d.]+ ms, p99 [\d.]+ ms", out)
    found = re.search(r"round trips per question: ([\d.]+)", out)
    assert found, out
    trips = float(found.group(1))
    assert trips == 2.0  # a real count: settings+question in one pipeline, the answer in another


def test_memory_bench_reports_engine_and_redis(capsys):
    memory_bench.main(["--questions", "40", "--channels", "5", "--concurrency", "8"])
    out = capsys.readouterr().out
    assert re.search(r"after 10 questions [\d.]+ MiB resident, after 40", out)
    assert "in flight 0, result handlers 0, undelivered outputs 0" in out
    assert "(40 messages kept of 200)" in out
