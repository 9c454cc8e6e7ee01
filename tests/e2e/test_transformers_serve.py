"""`supportbot chat` against `transformers serve`, a real third-party OpenAI-compatible server,
serving a Llama copy of the tiny EXAONE checkpoint on 127.0.0.1: as the primary (LLM_BASE_URL)
and as the GPT fallback (OPENAI_BASE_URL), with sampling on.

`transformers serve` refuses `top_k` (HTTP 422, "Unexpected fields in the request"): the bot must
learn that, answer anyway, and say in `/llm-settings show` that top_k is not honoured there.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_chat_cli import env, run_chat  # noqa: F401 - the fixture, reused

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama_copy(tiny_exaone_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny EXAONE checkpoint saved in Llama's own layout, which any server loads."""
    import torch
    from transformers import LlamaForCausalLM

    from bot.llm.exaone import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(tiny_exaone_dir, "cpu", torch.float32)
    # A fresh Llama module: saving the loaded one would write EXAONE's names back.
    llama = LlamaForCausalLM(model.config)  # type: ignore[arg-type]  # a LlamaConfig
    llama.load_state_dict(model.state_dict())
    out = tmp_path_factory.mktemp("tiny-llama")
    llama.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def served(llama_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`transformers serve` on 127.0.0.1 with the Llama copy loaded; yields its /v1 URL."""
    program = shutil.which("transformers", path=str(Path(sys.executable).parent))
    assert program, "transformers serve comes with the dev extra (transformers[serving])"
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    args = [program, "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with log.open("w") as out:
        server = subprocess.Popen(
            [*args, str(llama_copy)], stdout=out, stderr=subprocess.STDOUT, env=offline
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_llm_base_url_answers_with_sampling_and_show_says_top_k_is_not_honoured(
    env,  # noqa: F811
    served: str,
    llama_copy: Path,
) -> None:
    env = {k: v for k, v in env.items() if not k.startswith("OPENAI_")}
    env.update(
        LLM_BASE_URL=served,
        LLM_MODEL=str(llama_copy),  # the id transformers serve lists for it
        LLM_DO_SAMPLE="true",
        LLM_TEMPERATURE="0.9",
        LLM_TOP_K="20",
        LLM_MAX_NEW_TOKENS="8",
    )
    result = run_chat("hello\nagain\n/llm-settings show\n", env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    first, second = lines[0], lines[1]
    for answer in (first, second):  # random weights: any text, but the model's, not an error
        assert answer.strip() and "error id" not in answer and "No model" not in answer, answer
    show = "\n".join(lines[2:])
    assert f"server:{llama_copy}" in show
    assert "top_k = 20" in show and "cannot honour it" in show.split("top_k = 20", 1)[1]
    # Learned once: one refusal in the log, with the server's words.
    refusals = [line for line in result.stderr.splitlines() if "does not accept 'top_k'" in line]
    assert len(refusals) == 1, result.stderr
    assert "HTTP 422" in refusals[0] and "Unexpected fields" in refusals[0]


def test_openai_base_url_as_the_fallback_answers_with_sampling(
    env,  # noqa: F811
    served: str,
    llama_copy: Path,
) -> None:
    env.update(
        LLM_MODEL="none",
        OPENAI_BASE_URL=served,
        OPENAI_MODEL=str(llama_copy),
        LLM_DO_SAMPLE="true",
        LLM_TEMPERATURE="0.9",
        LLM_MAX_NEW_TOKENS="8",
    )
    result = run_chat("hello\n/llm-settings show\n", env)
    assert result.returncode == 0, result.stderr
    answer, show = result.stdout.split("\n", 1)
    assert answer.strip() and "error id" not in answer and "No model" not in answer, answer
    assert f"openai:{llama_copy}" in show
    assert "does not accept" not in result.stderr  # no top_k sent to GPT, nothing refused
