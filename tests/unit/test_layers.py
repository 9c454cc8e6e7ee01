"""The shape of the code: the core imports no platform, model or Redis library, and the test
scaffolding needs no model library until a test asks for a model."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import repo_root

FOREIGN = ("redis", "torch", "transformers", "slack_bolt", "slack_sdk", "discord", "openai")


def imported_after(*modules: str) -> set[str]:
    """Top-level packages loaded by importing `modules` in a fresh interpreter."""
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "print(' '.join(sorted({n.split('.')[0] for n in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo_root()
    )
    return set(out.stdout.split())


def test_the_core_imports_no_platform_model_or_redis_library():
    loaded = imported_after("bot.service", "bot.prompt", "bot.conversation", "bot.sampling")
    assert not loaded & set(FOREIGN), loaded & set(FOREIGN)


def test_the_test_scaffolding_loads_no_model_library():
    # A parser unit test must run without torch: conftest builds models only when asked.
    loaded = imported_after("tests.conftest")
    assert not loaded & {"torch", "transformers"}, loaded & {"torch", "transformers"}
