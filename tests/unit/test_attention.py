"""The batching engine's attention choice on a GPU (bot/llm/attention.py): which flash sources it
tries for each LLM_ATTENTION mode, and that a flash path that cannot load falls back to what the
model had with one warning line. On a CPU the model is left as it is."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bot.llm import attention
from bot.llm.attention import Candidate, candidates, choose, local_kernels

FA2, FA3 = "kernels-community/flash-attn2", "kernels-community/flash-attn3"


def test_local_kernels_reads_the_kernels_packages_format_and_keeps_existing_paths(tmp_path):
    (tmp_path / "fa2").mkdir()
    env = {"LOCAL_KERNELS": f"{FA2}={tmp_path / 'fa2'}:{FA3}={tmp_path / 'missing'}:junk"}
    assert local_kernels(env) == {FA2: tmp_path / "fa2"}
    assert local_kernels({}) == {}


def test_sdpa_never_tries_flash(tmp_path):
    found = candidates("sdpa", packages={"flash_attn"}, kernels=True, local={FA2: tmp_path})
    assert found == []


def test_auto_takes_installed_packages_and_pre_fetched_kernels_but_never_the_hub(tmp_path):
    assert candidates("auto", packages=set(), kernels=True, local={}) == []
    assert candidates("auto", packages=set(), kernels=True, local={FA2: tmp_path}) == [
        Candidate("flash_attention_2", f"{FA2}, pre-fetched in {tmp_path}")
    ]
    # A pre-fetched kernel needs the `kernels` package to load it.
    assert candidates("auto", packages=set(), kernels=False, local={FA2: tmp_path}) == []
    assert candidates("auto", packages={"flash_attn"}, kernels=False, local={}) == [
        Candidate("flash_attention_2", "the flash_attn package")
    ]


def test_flash_lets_kernels_fetch_from_the_hub_newest_first():
    found = candidates("flash", packages=set(), kernels=True, local={})
    assert [c.implementation for c in found] == ["flash_attention_3", "flash_attention_2"]
    assert all("Hugging Face Hub" in c.source for c in found)
    assert candidates("flash", packages=set(), kernels=False, local={}) == []


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


@pytest.mark.slow
def test_on_a_cpu_sdpa_runs_per_request_whatever_the_mode(caplog):
    model = tiny_model()
    with caplog.at_level(logging.INFO, logger="bot.llm.attention"):
        assert choose(model, "cpu", "flash") == "sdpa, per request"
    assert model.config._attn_implementation == "sdpa" and caplog.records == []


@pytest.mark.slow
def test_a_flash_kernel_that_cannot_load_falls_back_with_one_warning(
    monkeypatch, tmp_path: Path, caplog
):
    """A pre-fetched kernel is named but cannot load here (transformers really tries): the model
    keeps sdpa and one warning line says why and what to do."""
    (tmp_path / "fa3").mkdir()
    monkeypatch.setenv("LOCAL_KERNELS", f"{FA3}={tmp_path / 'fa3'}")
    monkeypatch.setattr(attention, "_installed", lambda package: package == "kernels")
    model = tiny_model()
    with caplog.at_level(logging.INFO, logger="bot.llm.attention"):
        assert choose(model, "cuda", "auto") == "sdpa"
    assert model.config._attn_implementation == "sdpa"
    [line] = [r for r in caplog.records if r.name == "bot.llm.attention"]
    assert line.levelno == logging.WARNING
    text = line.getMessage()
    assert "no flash attention" in text and f"{FA3}, pre-fetched in" in text
    assert "LLM_ATTENTION=flash" in text and "\n" not in text


@pytest.mark.slow
def test_no_flash_on_a_gpu_is_said_once(monkeypatch, caplog):
    monkeypatch.delenv("LOCAL_KERNELS", raising=False)
    monkeypatch.setattr(attention, "_installed", lambda package: False)
    model = tiny_model()
    with caplog.at_level(logging.INFO, logger="bot.llm.attention"):
        assert choose(model, "cuda", "auto") == "sdpa"
    [line] = caplog.records
    assert "no flash-attn package and no pre-fetched kernel" in line.getMessage()


def test_prefetch_says_what_is_missing(capsys, monkeypatch):
    assert attention.main([]) == 2
    assert "usage" in capsys.readouterr().err
    monkeypatch.setattr(attention, "_installed", lambda package: False)
    assert attention.main(["prefetch", "/tmp/x"]) == 1
    assert "`kernels` package is not installed" in capsys.readouterr().err
