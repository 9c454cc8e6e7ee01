"""Prometheus metrics, in one registry of our own (so tests can read exact values)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

QUESTIONS = Counter("supportbot_questions", "Questions received", ["platform"], registry=REGISTRY)
ANSWERS = Counter(
    "supportbot_answers", "Answers completed", ["platform", "backend"], registry=REGISTRY
)
ERRORS = Counter(
    "supportbot_errors",
    "Questions that ended in an error message, by reason (redis, busy, failed, no_backend, …)",
    ["platform", "reason"],
    registry=REGISTRY,
)
FALLBACKS = Counter(
    "supportbot_fallbacks",
    "Questions a backend passed on to the next one, by that backend and why",
    ["backend", "reason"],
    registry=REGISTRY,
)
DUPLICATES = Counter(
    "supportbot_duplicate_events", "Re-delivered events ignored", ["platform"], registry=REGISTRY
)
LATENCY = Histogram(
    "supportbot_answer_seconds",
    "Time from question to complete answer",
    ["platform", "backend"],
    buckets=(0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128),
    registry=REGISTRY,
)
FIRST_TOKEN = Histogram(
    "supportbot_first_token_seconds",
    "Time from question to the first text",
    ["platform", "backend"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16),
    registry=REGISTRY,
)
TOKENS_PER_S = Histogram(
    "supportbot_decode_tokens_per_second",
    "Decode speed of each answer after its first token",
    ["backend"],
    buckets=(5, 10, 20, 40, 80, 160, 320, 640, 1280),
    registry=REGISTRY,
)
VOTES = Counter(
    "supportbot_votes",
    "👍/👎 presses on answers (a changed vote counts again; the report counts the latest)",
    ["platform", "vote"],
    registry=REGISTRY,
)
HANDOFFS = Counter(
    "supportbot_handoffs", "Conversations handed off to a human", ["platform"], registry=REGISTRY
)
NO_PASSAGE = Counter(
    "supportbot_no_passage",
    "Questions answered (or, in strict mode, declined) without a relevant passage",
    ["platform"],
    registry=REGISTRY,
)
ACTIVE = Gauge("supportbot_active_answers", "Answers being generated now", registry=REGISTRY)
QUEUE_DEPTH = Gauge(
    "supportbot_engine_requests",
    "Requests in the local engine (running or waiting for a batch slot)",
    registry=REGISTRY,
)
GPU_MEMORY = Gauge(
    "supportbot_gpu_memory_bytes", "GPU memory allocated by the local model", registry=REGISTRY
)


class PrometheusObserver:
    """The service's Observer (bot.service) on these metrics."""

    def question(self, platform: str) -> None:
        QUESTIONS.labels(platform).inc()

    def answered(
        self,
        platform: str,
        backend: str,
        total_s: float,
        first_token_s: float | None,
        tokens_per_s: float | None,
    ) -> None:
        ANSWERS.labels(platform, backend).inc()
        LATENCY.labels(platform, backend).observe(total_s)
        if first_token_s is not None:
            FIRST_TOKEN.labels(platform, backend).observe(first_token_s)
        if tokens_per_s is not None:
            TOKENS_PER_S.labels(backend).observe(tokens_per_s)

    def failed(self, platform: str, reason: str) -> None:
        ERRORS.labels(platform, reason).inc()

    def active(self, change: int) -> None:
        ACTIVE.inc(change)

    def voted(self, platform: str, vote: str) -> None:
        VOTES.labels(platform, vote).inc()

    def handed_off(self, platform: str) -> None:
        HANDOFFS.labels(platform).inc()

    def no_passage(self, platform: str) -> None:
        NO_PASSAGE.labels(platform).inc()
