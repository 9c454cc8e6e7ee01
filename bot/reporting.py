"""The support picture for `supportbot report`: figures per platform and channel, and the
questions that most need better documents. Pure: the rows come from the store
(`RedisStore.report_data`), the text, JSON and CSV renderings are made here."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

Where = tuple[str, str, str]  # platform, workspace, channel

_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+)\s*([mhdw])\s*$")


def parse_duration(text: str) -> float:
    """`30m`, `12h`, `7d`, `2w` → seconds; ValueError with the accepted forms otherwise."""
    match = _DURATION.match(text.lower())
    if match is None or int(match.group(1)) == 0:
        raise ValueError(
            f"{text!r} is not a duration: use a positive number and a unit, "
            "m (minutes), h (hours), d (days) or w (weeks), e.g. 7d"
        )
    return int(match.group(1)) * _UNITS[match.group(2)]


@dataclass(frozen=True, slots=True)
class AnswerRow:
    """One stored answer (or a strict-mode "no documented answer"), with its votes."""

    where: Where
    question: str
    backend: str  # "" when no model answered (no passage in strict mode)
    at: float
    first_token_s: float | None
    no_passage: bool
    handoff: bool
    up: int
    down: int


@dataclass(slots=True)
class ChannelFigures:
    platform: str
    workspace: str
    channel: str
    questions: int = 0
    answers: dict[str, int] = field(default_factory=dict)  # by backend
    up: int = 0
    down: int = 0
    handoffs: int = 0
    no_passage: int = 0
    first_token_p50_s: float | None = None
    first_token_p95_s: float | None = None


@dataclass(frozen=True, slots=True)
class NeedsDocs:
    platform: str
    workspace: str
    channel: str
    question: str
    down: int
    handoffs: int
    no_passage: int

    @property
    def score(self) -> int:
        return self.down + self.handoffs + self.no_passage


@dataclass(frozen=True, slots=True)
class Report:
    since: float
    until: float
    channels: list[ChannelFigures]
    needs: list[NeedsDocs]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0…100); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def build_report(
    questions: Mapping[Where, int],
    answers: Iterable[AnswerRow],
    *,
    since: float,
    until: float,
    top: int = 10,
) -> Report:
    figures: dict[Where, ChannelFigures] = {}
    latencies: dict[Where, list[float]] = {}
    needs: dict[tuple[Where, str], list[int]] = {}

    def of(where: Where) -> ChannelFigures:
        if where not in figures:
            figures[where] = ChannelFigures(*where)
        return figures[where]

    for where, count in questions.items():
        of(where).questions += count
    for row in answers:
        if row.at < since:
            continue
        fig = of(row.where)
        if row.backend:
            fig.answers[row.backend] = fig.answers.get(row.backend, 0) + 1
        fig.up += row.up
        fig.down += row.down
        fig.handoffs += row.handoff
        fig.no_passage += row.no_passage
        if row.first_token_s is not None:
            latencies.setdefault(row.where, []).append(row.first_token_s)
        if row.down or row.handoff or row.no_passage:
            # The same question asked again in a channel adds up.
            counts = needs.setdefault((row.where, row.question), [0, 0, 0])
            counts[0] += row.down
            counts[1] += row.handoff
            counts[2] += row.no_passage
    for where, values in latencies.items():
        figures[where].first_token_p50_s = percentile(values, 50)
        figures[where].first_token_p95_s = percentile(values, 95)
    ranked = sorted(
        (NeedsDocs(*where, question, *counts) for (where, question), counts in needs.items()),
        key=lambda n: (-n.score, n.question),
    )
    return Report(since, until, sorted(figures.values(), key=_order), ranked[:top])


def _order(fig: ChannelFigures) -> tuple[str, str, str]:
    return fig.platform, fig.workspace, fig.channel


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def _backends(answers: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(answers.items())) or "-"


def as_text(report: Report) -> str:
    lines = [f"Support report, {_stamp(report.since)} to {_stamp(report.until)}", ""]
    if not report.channels:
        lines.append("No questions in this period.")
    for fig in report.channels:
        lines += [
            f"{fig.platform} {fig.workspace} #{fig.channel}",
            f"  questions            {fig.questions}",
            f"  answers              {sum(fig.answers.values())} ({_backends(fig.answers)})",
            f"  👍 / 👎               {fig.up} / {fig.down}",
            f"  hand-offs            {fig.handoffs}",
            f"  without a passage    {fig.no_passage}",
            f"  first token p50/p95  {_seconds(fig.first_token_p50_s)} / "
            f"{_seconds(fig.first_token_p95_s)}",
            "",
        ]
    if report.needs:
        lines.append("Questions that most need better documents (👎, hand-offs, no passage):")
        for n in report.needs:
            lines.append(
                f"  {n.score:>3}  {n.question!r}  ({n.platform} #{n.channel}: "
                f"👎 {n.down}, hand-offs {n.handoffs}, no passage {n.no_passage})"
            )
    return "\n".join(lines).rstrip() + "\n"


def as_json(report: Report) -> str:
    data = {
        "since": report.since,
        "until": report.until,
        "channels": [asdict(fig) for fig in report.channels],
        "needs_better_documents": [{**asdict(n), "score": n.score} for n in report.needs],
    }
    return json.dumps(data, ensure_ascii=False, indent=2) + "\n"


CSV_COLUMNS = (
    "platform", "workspace", "channel", "questions", "answers", "answers_by_backend", "up",
    "down", "handoffs", "no_passage", "first_token_p50_s", "first_token_p95_s",
)  # fmt: skip


NEEDS_COLUMNS = (
    "score", "platform", "workspace", "channel", "question", "down", "handoffs", "no_passage",
)  # fmt: skip


def as_csv(report: Report) -> str:
    """Two tables separated by a blank line: one row per channel (the per-backend counts as
    `backend=count;…`), then the questions that most need better documents."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for fig in report.channels:
        writer.writerow([
            fig.platform, fig.workspace, fig.channel, fig.questions, sum(fig.answers.values()),
            ";".join(f"{k}={v}" for k, v in sorted(fig.answers.items())), fig.up, fig.down,
            fig.handoffs, fig.no_passage,
            "" if fig.first_token_p50_s is None else f"{fig.first_token_p50_s:.3f}",
            "" if fig.first_token_p95_s is None else f"{fig.first_token_p95_s:.3f}",
        ])  # fmt: skip
    out.write("\n")
    writer.writerow(NEEDS_COLUMNS)
    for n in report.needs:
        writer.writerow(
            [n.score, n.platform, n.workspace, n.channel, n.question, n.down, n.handoffs,
             n.no_passage]
        )  # fmt: skip
    return out.getvalue()


FORMATS = {"text": as_text, "json": as_json, "csv": as_csv}
