"""The whole-suite secrets scan can fail: a session in which a secret reaches a log line, a
subprocess's output or a test's stdout ends with exit status 1 and names each leak, without
printing the secret; a test marked `logs_secrets_on_purpose` is left out.

The scan itself runs over this whole suite (tests/conftest.py, tests/support/log_scan.py). Here
it runs over a small session of its own, in a subprocess, so nothing leaks into this one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import repo_root
from tests.support import secrets

# Defined here, registered by name when this suite is collected (a *_SECRET constant), so this
# session's scan would catch the probe session's output if it printed the value.
PROBE_SECRET = "probe-signing-value-5c9a1e7d3b"
PROBE_SHAPED = "xoxb-9999-probe-wrong-token-zzzzzzzz"  # caught by its shape, registered or not

PROBE_TESTS = f"""
import logging
import subprocess
import sys

import pytest

PROBE_SECRET = {PROBE_SECRET!r}
PROBE_SHAPED = {PROBE_SHAPED!r}


def test_logs_a_secret_by_mistake():
    logging.getLogger("bot.platforms.slack").info("verifying with %s", PROBE_SECRET)


def test_an_exception_traceback_carries_a_token():
    try:
        raise RuntimeError("auth.test failed for " + PROBE_SHAPED)
    except RuntimeError:
        logging.getLogger("slack_sdk").exception("call failed")


def test_a_subprocess_prints_a_secret():
    code = "import sys; sys.stderr.write(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, PROBE_SECRET], capture_output=True, check=True)


def test_prints_a_secret():
    print("debugging:", PROBE_SECRET)


@pytest.mark.logs_secrets_on_purpose
def test_checks_redaction_on_purpose():
    logging.getLogger("bot").warning("this one is expected: %s", PROBE_SECRET)
"""


def test_a_leaking_session_fails_and_names_each_leak_without_the_secret(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text("from tests.conftest import *  # noqa: F403\n")
    (tmp_path / "test_probe.py").write_text(textwrap.dedent(PROBE_TESTS))
    plugins = ["-p", "no:cacheprovider", "-p", "no:asyncio"]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *plugins, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(repo_root())},
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert "5 passed" in output, output  # every test passed; the scan alone fails the session
    assert result.returncode == 1, output
    leaks = [line for line in output.splitlines() if line.strip().startswith("LEAK in ")]
    assert len(leaks) == 4, output
    found = "\n".join(leaks)
    assert "test_logs_a_secret_by_mistake (log bot.platforms.slack INFO)" in found
    assert "test_an_exception_traceback_carries_a_token (log slack_sdk ERROR)" in found
    assert "test_a_subprocess_prints_a_secret (subprocess stderr" in found
    assert "test_prints_a_secret (captured stdout)" in found
    assert "test_checks_redaction_on_purpose" not in output.split("secrets scan")[-1]
    assert "<test_probe.PROBE_SECRET>" in found and "<token-shaped xoxb…>" in found
    for value in (PROBE_SECRET, PROBE_SHAPED):
        assert value not in output  # the report hides what it found
    assert PROBE_SECRET in secrets.registered()  # and this session would have caught it
