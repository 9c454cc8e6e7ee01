"""A first download's progress is visible: byte counts and rate logged through the bot's logging
(the bars snapshot_download would draw are replaced), at most one line per interval."""

from __future__ import annotations

import logging

import pytest

from bot.llm import hub


def test_download_progress_is_logged_with_size_share_and_rate(
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(hub, "PROGRESS_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="bot.llm.hub")
    bar = hub.progress_class("LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct")(
        total=4 * 2**30, unit="B", unit_scale=True, mininterval=0
    )
    bar.update(2**30)
    bar.update(2**30)
    bar.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "bot.llm.hub"]
    assert lines, "no progress line"
    assert lines[-1] == "downloading LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct: 2.00GB of 4.00GB (50%)"
    assert any(line.endswith("B/s") for line in lines)  # the rate, once it is known
    assert capsys.readouterr().err == ""  # no bar drawn on the terminal


def test_progress_lines_are_spaced(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bot.llm.hub")
    bar = hub.progress_class("org/model")(total=100, unit="B", mininterval=0)
    for _ in range(50):
        bar.update(1)
    bar.close()
    # PROGRESS_EVERY_S (5 s) apart at most: a burst of updates makes one line.
    assert len([r for r in caplog.records if r.name == "bot.llm.hub"]) <= 1
