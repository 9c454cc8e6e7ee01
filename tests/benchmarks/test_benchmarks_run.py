"""The benchmark scripts, run with reduced sizes so they cannot rot.

Speed is not asserted here (benchmarks print figures, side by side in one run); these check that
every figure the README quotes is still produced. The GPU run (tests/benchmarks/gpu.sh) is the
same script with --size full --device cuda; its --smoke mode runs it on CPU with the tiny shape.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.benchmarks import (
    engine_bench,
    lone_bench,
    memory_bench,
    overhead_bench,
    threads_bench,
)

pytestmark = pytest.mark.slow


def test_engine_bench_prints_every_figure(capsys):
    args = engine_bench.parse(
        ["--size", "tiny", "--concurrency", "1,4", "--words", "16", "--new-tokens", "6",
         "--repeat", "3", "--long-words", "40", "--pipeline-max", "2"]
    )  # fmt: skip
    report = asyncio.run(engine_bench.main(args))
    out = capsys.readouterr().out
    assert re.search(r"single stream: \d+ tokens/s \([\d.]+ ms/token", out)
    assert re.search(r"roofline \d+ tokens/s -> \d+% of it", out)
    assert re.search(r"time to first token, fresh 40-word prompt: min/median/max [\d/]+ ms", out)
    for n in (1, 4):
        row = re.search(
            rf"\s{n} concurrent,  16-word prompts: tokens/s min/median/max engine [\d/]+, "
            r"pipeline [\d/]+, static generate [\d/]+; engine/pipeline [\d.]+x, "
            r"engine/static [\d.]+x",
            out,
        )
        assert row, out
        assert len(report["rows"][f"{n}x16w"]["engine_tokens_per_s"]) == 3  # three repetitions


def test_gpu_script_runs_its_cpu_smoke_mode_and_prints_json():
    """tests/benchmarks/gpu.sh is what a GPU host runs; --smoke takes the same code path on CPU
    with the tiny shape, so the script cannot rot while no GPU is lent."""
    script = Path(__file__).with_name("gpu.sh")
    done = subprocess.run(
        ["bash", str(script), "--smoke"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"single_stream_tokens_per_s", "roofline_fraction", "ttft_ms_long_prompt",
            "cuda_graphs", "attention", "static_cache_generate_tokens_per_s",
            } <= report.keys()  # fmt: skip
    assert set(report["rows"]) == {"1x16w", "4x16w"}
    assert report["cuda_graphs"] is False  # CPU


def test_overhead_bench_reports_latency_and_round_trips(capsys):
    overhead_bench.main(["--channels", "5", "--rounds", "2"])
    out = capsys.readouterr().out
    assert re.search(r"p50 [\d.]+ ms, p99 [\d.]+ ms", out)
    found = re.search(r"round trips per question: ([\d.]+)", out)
    assert found, out
    trips = float(found.group(1))
    assert trips == 2.0  # a real count: settings+question in one pipeline, the answer in another
    # Exactly-once across replicas costs one round trip more than the claim it always had.
    door = re.search(r"front door .*: ([\d.]+) round trips per question, \+([\d.]+) over", out)
    assert door and float(door.group(1)) == 4.0 and float(door.group(2)) == 1.0, out


def test_memory_bench_reports_engine_and_redis(capsys):
    memory_bench.main(["--questions", "40", "--channels", "5", "--concurrency", "8"])
    out = capsys.readouterr().out
    assert re.search(r"after 10 questions [\d.]+ MiB resident, after 40", out)
    assert "in flight 0, result handlers 0, undelivered outputs 0" in out
    assert "(40 messages kept of 200)" in out


def test_kb_bench_prints_quality_ingest_latency_and_memory(capsys):
    from tests.benchmarks import kb_bench

    report = kb_bench.main(kb_bench.parse(["--sizes", "2000", "--queries", "20"]))
    out = capsys.readouterr().out
    for mode in ("keyword ", "semantic", "fused   "):
        assert re.search(rf"  {mode} recall@4 [\d.]+  MRR [\d.]+", out), out
    assert re.search(r"ingest: \d+ passages/s", out)
    assert re.search(r"query embedding: p50 [\d.]+ ms", out)
    assert re.search(r"search at 2,000 passages: p50 [\d.]+ ms, p99 [\d.]+ ms", out)
    assert re.search(r"index memory [\d.]+ MB per 10,000 passages", out)
    recall, _ = report["quality"]["fused"]  # type: ignore[index]
    assert recall >= 0.9  # the set's labels still match what retrieval finds


def test_threads_bench_reports_each_side(capsys):
    figures = asyncio.run(threads_bench.main(["--size", "tiny", "--new-tokens", "6"]))
    out = capsys.readouterr().out
    assert len(figures) == 3 and all(len(ms) == 3 for ms in figures.values())
    for label in ("fresh engine", "threads of their own (the bot)", "asyncio.to_thread (before)"):
        assert re.search(rf"{re.escape(label)}: ms/token min/median/max [\d./]+; threads", out)


def test_lone_bench_times_each_side_and_its_paged_side_keeps_no_keys(capsys):
    from bot.llm.lone_decode import LoneDecode

    real = LoneDecode.begin
    rows = asyncio.run(
        lone_bench.main(["--size", "tiny", "--words", "16", "--new-tokens", "6", "--repeat", "3"])
    )
    out = capsys.readouterr().out
    assert list(rows) == ["16w"]
    assert {side: len(v) for side, v in rows["16w"].items()} == {
        "kept keys": 6,
        "paged read": 6,
        "pipeline": 3,
    }
    assert re.search(
        r"~\s*\d+-token prompt: kept keys [\d./]+, paged read [\d./]+, pipeline [\d./]+; "
        r"kept/paged [\d.]+x, kept/pipeline [\d.]+x, paged/pipeline [\d.]+x",
        out,
    ), out
    for keys in (150, 500, 1000):
        assert re.search(
            rf"one layer, \s*{keys} keys: paged read \d+ us, kept keys \d+ us, generate \d+ us", out
        ), out
    assert LoneDecode.begin is real  # the paged side put the engine back as it was
    with lone_bench.paged_read_only():
        begin: Any = LoneDecode().begin
        assert not begin(None, None, None)  # declines before reading anything
