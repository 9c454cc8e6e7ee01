"""EXAONE 3.5 checkpoints loaded as native transformers Llama modules, without remote code.

EXAONE 3.5 is a Llama-architecture decoder (RMSNorm, SwiGLU MLP, GQA, llama3-scaled RoPE, no
biases) published under its own names: `model_type: exaone`, `num_layers`, `transformer.h.N.*`.
transformers 5.x has no EXAONE 3.5 class and the Hub's `modeling_exaone.py` does not run on 5.x,
so we translate the config to a `LlamaConfig` and rename the weights while loading
(`from_pretrained(key_mapping=...)`). Anything else loads through the Auto classes.

torch and transformers are imported inside the functions: importing this module stays cheap for
commands that never load a model.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from bot.llm import hub
from bot.llm.base import BackendUnavailable

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Checkpoint name -> Llama name. Every renaming that matches a key is applied, in this order, and
# each replacement is a plain string in which only `\1` is substituted (transformers 5.23 ignores
# `\2`), so each weight family gets its own pattern with at most one group.
EXAONE_KEY_MAPPING: dict[str, str] = {
    r"^transformer\.wte\.": "model.embed_tokens.",
    r"^transformer\.ln_f\.": "model.norm.",
    r"^transformer\.h\.(\d+)\.": r"model.layers.\1.",
    r"\.ln_1\.": ".input_layernorm.",
    r"\.ln_2\.": ".post_attention_layernorm.",
    r"\.attn\.attention\.([qkv]_proj)\.": r".self_attn.\1.",
    r"\.attn\.attention\.out_proj\.": ".self_attn.o_proj.",
    r"\.mlp\.c_fc_0\.": ".mlp.gate_proj.",
    r"\.mlp\.c_fc_1\.": ".mlp.up_proj.",
    r"\.mlp\.c_proj\.": ".mlp.down_proj.",
}

# Files a checkpoint needs to load through the native path; remote code is fetched only on request.
_WEIGHT_AND_CONFIG_FILES = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "tokenizer*",
    "*.txt",
    "*.model",
    "*.tiktoken",
]

# Keys the EXAONE config must carry; the rest fall back to ExaoneConfig's defaults.
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads")

# RoPE buffers that some exports persist; transformers recomputes them from the config.
_RECOMPUTED_BUFFER = re.compile(r"(^|\.)inv_freq$")


def resolve_model_dir(model: str, *, include_code: bool = False) -> Path:
    """A local checkpoint directory for `model`: a directory as is, else a Hub repository id.

    A Hub repository is downloaded once into the Hugging Face cache and read from there when the
    Hub cannot be reached (or `HF_HUB_OFFLINE=1`). Python files come along only with
    `include_code`, i.e. when remote code is allowed to run.
    """
    local = Path(model).expanduser()
    if local.is_dir():
        return local.resolve()
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise BackendUnavailable(
            f"local model {model!r} is not a directory; point LLM_MODEL at a checkpoint "
            "directory or a Hugging Face Hub id (org/name)"
        )
    patterns = [*_WEIGHT_AND_CONFIG_FILES, "*.py"] if include_code else _WEIGHT_AND_CONFIG_FILES
    # Bounded and logged: a hub that never answers costs HF_HUB_DOWNLOAD_TIMEOUT, not forever.
    return hub.download(model, patterns)


def read_config(model_dir: Path) -> dict[str, Any]:
    """The checkpoint's config.json as a dict."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist; is {model_dir} a model checkpoint?")
    return cast(dict[str, Any], json.loads(config_file.read_text(encoding="utf-8")))


def is_exaone(config_dict: Mapping[str, Any]) -> bool:
    """Whether this config is EXAONE 3.0/3.5's own format (not EXAONE 4, which transformers has)."""
    architectures = config_dict.get("architectures") or []
    return config_dict.get("model_type") == "exaone" or "ExaoneForCausalLM" in architectures


def _rope_parameters(config_dict: Mapping[str, Any]) -> dict[str, Any]:
    """EXAONE's `rope_theta` + `rope_scaling` as transformers 5's `rope_parameters`."""
    rope: dict[str, Any] = dict(config_dict.get("rope_scaling") or {})
    # EXAONE configs name the kind "rope_type" or, in older exports, "type".
    rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    rope["rope_type"] = rope_type
    rope["rope_theta"] = float(config_dict.get("rope_theta", 10000.0))
    return rope


def exaone_to_llama_config(config_dict: Mapping[str, Any]) -> LlamaConfig:
    """The `LlamaConfig` that computes exactly what an EXAONE 3.5 config describes."""
    from transformers import LlamaConfig

    missing = [key for key in _REQUIRED_KEYS if key not in config_dict]
    if missing:
        raise ValueError(f"EXAONE config.json lacks {', '.join(missing)}")
    hidden_size = int(config_dict["hidden_size"])
    num_heads = int(config_dict["num_attention_heads"])
    head_dim = config_dict.get("head_dim")
    return LlamaConfig(
        vocab_size=int(config_dict["vocab_size"]),
        hidden_size=hidden_size,
        intermediate_size=int(config_dict.get("intermediate_size") or 4 * hidden_size),
        num_hidden_layers=int(config_dict["num_layers"]),
        num_attention_heads=num_heads,
        num_key_value_heads=int(config_dict.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim) if head_dim else hidden_size // num_heads,
        hidden_act=str(config_dict.get("activation_function", "silu")),
        max_position_embeddings=int(config_dict.get("max_position_embeddings", 2048)),
        initializer_range=float(config_dict.get("initializer_range", 0.02)),
        rms_norm_eps=float(config_dict.get("layer_norm_epsilon", 1e-5)),
        use_cache=bool(config_dict.get("use_cache", True)),
        pad_token_id=config_dict.get("pad_token_id"),
        bos_token_id=config_dict.get("bos_token_id"),
        eos_token_id=config_dict.get("eos_token_id"),
        tie_word_embeddings=bool(config_dict.get("tie_word_embeddings", True)),
        rope_parameters=_rope_parameters(config_dict),
        attention_bias=False,
        attention_dropout=float(config_dict.get("attention_dropout", 0.0)),
        mlp_bias=False,
        architectures=["LlamaForCausalLM"],
    )


def _check_loading_info(model_dir: Path, info: Mapping[str, Any]) -> None:
    """Refuse a model with weights left random or dropped: it would answer with noise."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(
        key for key in info.get("unexpected_keys") or () if not _RECOMPUTED_BUFFER.search(key)
    )
    mismatched = sorted(str(item) for item in info.get("mismatched_keys") or ())
    errors = [str(msg) for msg in info.get("error_msgs") or ()]
    problems = []
    if missing:
        problems.append(f"missing weights {missing[:8]}")
    if unexpected:
        problems.append(f"unexpected weights {unexpected[:8]}")
    if mismatched:
        problems.append(f"wrong shapes {mismatched[:8]}")
    if errors:
        problems.append(f"errors {errors[:3]}")
    if problems:
        raise ValueError(
            f"checkpoint {model_dir} does not match its config: " + "; ".join(problems)
        )


def _check_tied(model: PreTrainedModel) -> None:
    """With tied embeddings the head must be the embedding matrix itself, not a copy or noise."""
    untyped: Any = model  # transformers leaves these accessors unannotated
    head = untyped.get_output_embeddings()
    embeddings = untyped.get_input_embeddings()
    if head is None or head.weight is not embeddings.weight:
        raise ValueError("tie_word_embeddings is set but lm_head is not tied to the embeddings")


def _load_exaone_native(
    model_dir: Path, config_dict: Mapping[str, Any], device: str, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    config = exaone_to_llama_config(config_dict)
    # Typed as returning the model alone; output_loading_info=True makes it (model, info).
    loaded: Any = LlamaForCausalLM.from_pretrained(
        model_dir,
        config=config,
        key_mapping=EXAONE_KEY_MAPPING,
        dtype=dtype,
        trust_remote_code=False,
        output_loading_info=True,
    )
    model, info = cast("tuple[PreTrainedModel, dict[str, Any]]", loaded)
    _check_loading_info(model_dir, info)
    if config.tie_word_embeddings:
        _check_tied(model)
    # AutoTokenizer would follow config.json's auto_map into remote code (and prompt on stdin);
    # EXAONE ships a plain byte-level BPE tokenizer.json, which the tokenizers backend reads.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    return model, cast("PreTrainedTokenizerBase", tokenizer)


def _load_auto(
    model_dir: Path, device: str, dtype: torch.dtype, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded: Any = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        output_loading_info=True,
    )
    model, info = cast("tuple[PreTrainedModel, dict[str, Any]]", loaded)
    _check_loading_info(model_dir, info)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    return model, cast("PreTrainedTokenizerBase", tokenizer)


def load_model_and_tokenizer(
    model_dir: Path, device: str, dtype: torch.dtype, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local checkpoint directory, in eval mode.

    EXAONE 3.x loads natively as Llama unless `trust_remote_code` asks for the repository's own
    code; other models load through the Auto classes, running remote code only when allowed.
    Raises (FileNotFoundError, ValueError, OSError, ...) when the checkpoint cannot be used.
    """
    config_dict = read_config(model_dir)
    if is_exaone(config_dict) and not trust_remote_code:
        logger.info("loading EXAONE checkpoint %s natively as Llama", model_dir)
        model, tokenizer = _load_exaone_native(model_dir, config_dict, device, dtype)
    else:
        model, tokenizer = _load_auto(model_dir, device, dtype, trust_remote_code)
    # Loaded on the CPU and then moved: `device_map` would need accelerate, which we do not ship.
    untyped: Any = model  # PreTrainedModel.to/eval are unannotated wrappers
    untyped.to(device)
    untyped.eval()
    return model, tokenizer
