"""EXAONE 3.5 checkpoints load natively as Llama: config, weight names, tying, tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from bot.llm.base import BackendUnavailable
from bot.llm.exaone import (
    EXAONE_KEY_MAPPING,
    exaone_to_llama_config,
    is_exaone,
    load_model_and_tokenizer,
    read_config,
    resolve_model_dir,
)
from tests.fixtures.tiny_exaone import EXAONE_3_5_2_4B_CONFIG, TINY_SHAPE, remote_code_marker

REAL_2_4B_CONFIG = EXAONE_3_5_2_4B_CONFIG

MESSAGES = [
    {"role": "system", "content": "You are a helpful support assistant."},
    {"role": "user", "content": "GPU 메모리가 부족해요. How do I restart the service?"},
]


def _llama_name(exaone_name: str) -> str:
    """EXAONE -> Llama weight names, written out independently of EXAONE_KEY_MAPPING."""
    parts = exaone_name.split(".")
    if parts[:2] == ["transformer", "wte"]:
        return "model.embed_tokens." + parts[-1]
    if parts[:2] == ["transformer", "ln_f"]:
        return "model.norm." + parts[-1]
    if parts[0] == "lm_head":
        return exaone_name
    assert parts[:2] == ["transformer", "h"], exaone_name
    layer, rest = parts[2], ".".join(parts[3:])
    renames = {
        "ln_1.weight": "input_layernorm.weight",
        "ln_2.weight": "post_attention_layernorm.weight",
        "attn.attention.q_proj.weight": "self_attn.q_proj.weight",
        "attn.attention.k_proj.weight": "self_attn.k_proj.weight",
        "attn.attention.v_proj.weight": "self_attn.v_proj.weight",
        "attn.attention.out_proj.weight": "self_attn.o_proj.weight",
        "mlp.c_fc_0.weight": "mlp.gate_proj.weight",
        "mlp.c_fc_1.weight": "mlp.up_proj.weight",
        "mlp.c_proj.weight": "mlp.down_proj.weight",
    }
    return f"model.layers.{layer}.{renames[rest]}"


def _reference_llama(model_dir: Path) -> Any:
    """A Llama built by hand from the tiny checkpoint's numbers, not through the loader."""
    raw = json.loads((model_dir / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=TINY_SHAPE["hidden_size"],
        intermediate_size=TINY_SHAPE["intermediate_size"],
        num_hidden_layers=TINY_SHAPE["num_layers"],
        num_attention_heads=TINY_SHAPE["num_attention_heads"],
        num_key_value_heads=TINY_SHAPE["num_key_value_heads"],
        head_dim=TINY_SHAPE["head_dim"],
        hidden_act="silu",
        max_position_embeddings=TINY_SHAPE["max_position_embeddings"],
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=raw["eos_token_id"],
        pad_token_id=0,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 1000000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 512,
        },
    )
    model: Any = LlamaForCausalLM(config)
    state = {_llama_name(k): v for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model.eval()


# -- config translation ---------------------------------------------------------------------------


def test_real_exaone_config_translates_to_llama() -> None:
    config = exaone_to_llama_config(REAL_2_4B_CONFIG)

    assert isinstance(config, LlamaConfig)
    assert config.model_type == "llama"
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.vocab_size == 102400
    assert config.hidden_size == 2560
    assert config.intermediate_size == 7168
    assert config.num_hidden_layers == 30
    assert config.num_attention_heads == 32
    assert config.num_key_value_heads == 8
    assert config.head_dim == 80
    assert config.hidden_act == "silu"
    assert config.max_position_embeddings == 32768
    assert config.rms_norm_eps == 1e-5
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 361, 0)
    assert config.tie_word_embeddings is True
    assert config.attention_bias is False
    assert config.mlp_bias is False
    # transformers 5 keeps rope_theta and rope_scaling together in rope_parameters.
    assert config.rope_parameters == {
        "rope_type": "llama3",
        "rope_theta": 1000000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    # The llama3 RoPE initialiser accepts it (it raises on a malformed rope_parameters).
    inv_freq, scale = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    assert inv_freq.shape == (80 // 2,)
    assert scale == 1.0


def test_rope_scaling_with_legacy_type_key() -> None:
    raw = dict(REAL_2_4B_CONFIG)
    raw["rope_scaling"] = {
        "type": "llama3",
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
    }
    rope = exaone_to_llama_config(raw).rope_parameters
    assert rope is not None
    assert rope["rope_type"] == "llama3"
    assert "type" not in rope


def test_no_rope_scaling_is_default_rope() -> None:
    raw = {k: v for k, v in REAL_2_4B_CONFIG.items() if k != "rope_scaling"}
    assert exaone_to_llama_config(raw).rope_parameters == {
        "rope_type": "default",
        "rope_theta": 1000000.0,
    }


def test_config_without_shape_keys_is_refused() -> None:
    raw = {k: v for k, v in REAL_2_4B_CONFIG.items() if k != "num_layers"}
    with pytest.raises(ValueError, match="num_layers"):
        exaone_to_llama_config(raw)


def test_is_exaone() -> None:
    assert is_exaone(REAL_2_4B_CONFIG)
    assert is_exaone({"architectures": ["ExaoneForCausalLM"]})
    assert not is_exaone({"model_type": "exaone4", "architectures": ["Exaone4ForCausalLM"]})
    assert not is_exaone({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})


def test_key_mapping_uses_at_most_one_group_per_pattern() -> None:
    # transformers 5.23 substitutes only \1 in a replacement; \2 would be left in the name.
    for pattern, replacement in EXAONE_KEY_MAPPING.items():
        assert "\\2" not in replacement, pattern
        assert pattern.count("(") <= 1, pattern


# -- loading ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_weight_lands_where_it_belongs_and_embeddings_are_tied(
    tiny_exaone_dir: Path,
) -> None:
    config = exaone_to_llama_config(read_config(tiny_exaone_dir))
    result: Any = LlamaForCausalLM.from_pretrained(
        tiny_exaone_dir, config=config, key_mapping=EXAONE_KEY_MAPPING, output_loading_info=True
    )
    model, info = result
    assert info["missing_keys"] == set()
    assert info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set()
    assert info["error_msgs"] == []
    assert model.lm_head.weight is model.model.embed_tokens.weight

    params = dict(model.named_parameters(remove_duplicate=False))
    checkpoint = load_file(str(tiny_exaone_dir / "model.safetensors"))
    for name, tensor in checkpoint.items():
        assert torch.equal(params[_llama_name(name)], tensor), name
    assert "lm_head.weight" not in checkpoint  # tied: the real 2.4B ships no separate head


@pytest.mark.slow
@pytest.mark.parametrize(
    ("options", "tied"),
    [({"include_lm_head": True}, True), ({"tie_word_embeddings": False}, False)],
)
def test_lm_head_variants_load_cleanly(
    tiny_exaone_factory: Any, options: dict[str, Any], tied: bool
) -> None:
    model_dir = tiny_exaone_factory(seed=3, **options)
    model, _ = load_model_and_tokenizer(model_dir, "cpu", torch.float32)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
    head = load_file(str(model_dir / "model.safetensors"))["lm_head.weight"]
    assert torch.equal(model.lm_head.weight, head)


@pytest.mark.slow
def test_unmapped_weight_fails_loudly(tiny_exaone_factory: Any) -> None:
    model_dir = tiny_exaone_factory(seed=1)
    state = load_file(str(model_dir / "model.safetensors"))
    # As if a new checkpoint renamed one projection: the loader must not leave it random.
    state["transformer.h.1.mlp.c_fc_2.weight"] = state.pop("transformer.h.1.mlp.c_fc_1.weight")
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})

    with pytest.raises(ValueError, match=r"missing weights.*up_proj.*unexpected weights.*c_fc_2"):
        load_model_and_tokenizer(model_dir, "cpu", torch.float32)


@pytest.mark.slow
def test_greedy_output_equals_hand_built_llama(tiny_exaone_dir: Path) -> None:
    loaded, tokenizer = load_model_and_tokenizer(tiny_exaone_dir, "cpu", torch.float32)
    model: Any = loaded
    reference = _reference_llama(tiny_exaone_dir)
    inputs: Any = tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )

    with torch.inference_mode():
        torch.testing.assert_close(
            model(**inputs).logits, reference(**inputs).logits, rtol=0, atol=0
        )
        common = {"max_new_tokens": 32, "min_new_tokens": 32, "do_sample": False}
        ours = model.generate(**inputs, **common)
        theirs = reference.generate(**inputs, **common)

    assert ours.shape[-1] == inputs["input_ids"].shape[-1] + 32
    assert ours.tolist() == theirs.tolist()


@pytest.mark.slow
def test_loaded_on_requested_dtype_in_eval_mode(tiny_exaone_dir: Path) -> None:
    model, _ = load_model_and_tokenizer(tiny_exaone_dir, "cpu", torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert not model.training
    assert model.device.type == "cpu"


# -- tokenizer and remote code ----------------------------------------------------------------


@pytest.mark.slow
def test_exaone_never_goes_through_auto_classes_or_remote_code(
    tiny_exaone_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("Auto classes must not load an EXAONE checkpoint natively")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)

    model, tokenizer = load_model_and_tokenizer(tiny_exaone_dir, "cpu", torch.float32)

    assert type(model) is LlamaForCausalLM
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert not remote_code_marker(tiny_exaone_dir).exists()


@pytest.mark.slow
def test_chat_template_is_exaones(tiny_exaone_dir: Path) -> None:
    _, tokenizer = load_model_and_tokenizer(tiny_exaone_dir, "cpu", torch.float32)

    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text == (
        "[|system|]You are a helpful support assistant.[|endofturn|]\n"
        "[|user|]GPU 메모리가 부족해요. How do I restart the service?\n"
        "[|assistant|]"
    )
    no_system = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert no_system == "[|system|][|endofturn|]\n[|user|]hi\n[|assistant|]"

    ids: Any = tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    tokens = tokenizer.convert_ids_to_tokens(ids)
    for control in ("[|system|]", "[|endofturn|]", "[|user|]", "[|assistant|]"):
        assert control in tokens  # one token each, not spelled out in bytes
    assert tokenizer.eos_token == "[|endofturn|]"
    assert tokenizer.decode(ids, skip_special_tokens=True) == (
        "You are a helpful support assistant.\n"
        "GPU 메모리가 부족해요. How do I restart the service?\n"
    )


@pytest.mark.slow
def test_trust_remote_code_hands_exaone_to_its_own_code(
    tiny_exaone_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def record(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record)
    with pytest.raises(Stop):
        load_model_and_tokenizer(tiny_exaone_dir, "cpu", torch.float32, trust_remote_code=True)
    assert seen["trust_remote_code"] is True


# -- resolving the model ----------------------------------------------------------------------


def test_local_directory_is_used_as_is(tiny_exaone_dir: Path) -> None:
    assert resolve_model_dir(str(tiny_exaone_dir)) == tiny_exaone_dir.resolve()


def test_missing_directory_is_unavailable_with_a_clear_message(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(BackendUnavailable, match="is not a directory; point LLM_MODEL at") as e:
        resolve_model_dir(missing)
    assert missing in str(e.value)


def test_uncached_hub_id_offline_is_unavailable() -> None:
    with pytest.raises(BackendUnavailable, match="LGAI-EXAONE/no-such-model-for-tests") as e:
        resolve_model_dir("LGAI-EXAONE/no-such-model-for-tests")
    # One line: what failed, why, and what to do.
    assert "\n" not in str(e.value)
    assert "HF_HUB_OFFLINE is set and it is not in the local cache" in str(e.value)
    assert "point LLM_MODEL at a checkpoint directory, or set OPENAI_API_KEY" in str(e.value)
