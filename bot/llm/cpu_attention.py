"""Attention for the batching engine on a CPU: each request attends to its own keys only.

Without flash attention, transformers' continuous batching runs one attention over the whole
step: every request's queries against every request's keys through a dense block-diagonal mask,
with the KV heads repeated for grouped-query attention. On a CPU (no flash kernel exists) that
is what separated the engine from static batching once requests had long prompts: at 16
questions of ~260 tokens a decode step took 210 ms against `generate`'s 151 ms. Here each
request attends to its own keys, grouped heads handled natively (`enable_gqa`), in one of two
ways:

- A step in which every request decodes one token (most steps) reads the paged cache straight
  into a padded block, one row of keys per request, and runs one SDPA call for all of them with
  a padding mask, as static batching does: a step's prelude (`_prepare_step`, a forward
  pre-hook on the model) swaps transformers' packed read index for a padded one, so the cache
  read that happens anyway lays the keys out. One call instead of one per request: at 32
  questions of ~160 keys a layer's attention (cache read included) takes 1.5 ms instead of
  2.4 ms, at ~400 keys 3.2 ms instead of 5.9 ms. Only when the padding stays small: rows of
  very different lengths take the per-request path. When every request has as many keys (one
  request decoding alone, most of all), the packed read is one row per request already: no
  re-read, no mask (one question of ~150 tokens: the step's prelude 155 -> 15 us, each
  layer's attention 86 -> 71 us). One request decoding alone goes further: it keeps its keys
  and values in place between steps and transformers only writes the new token
  (bot/llm/lone_decode.py).
- Any other step (prompts, chunks of prompts, decoding beside them) is cut at the cumulative
  lengths transformers passes along (`cu_seq_lens_q`, `cu_seq_lens_k`), and each request runs
  SDPA on its own slice.

The mask transformers still builds is left unused. All of it is installed in front of
transformers' `sdpa` attention and applies only to the models `use_per_request_attention`
marked, and only to continuous-batching calls (the ones that carry `cu_seq_lens_q`):
`generate`, other models, and the GPU keep transformers' own path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from bot.llm.lone_decode import LoneDecode

_MARK = "_supportbot_per_request_attention"
_LONE = "_supportbot_lone_decode"  # the model's LoneDecode
_STEP = "supportbot_step"  # the keyword argument `_prepare_step` adds for the attention calls
# Padded decoding only while the padded block holds at most this many times the real keys.
MAX_PADDING = 1.5
_original: Any = None


@dataclass(frozen=True)
class Step:
    """What every layer's attention in a step needs, worked out once per step."""

    bounds_q: list[int]  # cumulative query lengths, one more than requests
    bounds_k: list[int]  # cumulative key lengths
    in_rows: bool = False  # every request decodes; keys read as one row per request
    padded_mask: torch.Tensor | None = None  # [requests, 1, 1, longest]; when rows are padded
    lone: LoneDecode | None = None  # one request decoding alone, from its kept keys


def _padded_read(
    read_index: torch.Tensor, bounds_k: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The read index laid out as one row of `longest` positions per request (short rows repeat
    their last position, masked out), and the mask of the real ones."""
    starts = torch.tensor(bounds_k[:-1])
    lengths = torch.tensor(bounds_k[1:]) - starts
    longest = int(lengths.max())
    offsets = torch.arange(longest)
    rows = starts[:, None] + torch.minimum(offsets, lengths[:, None] - 1)
    mask = offsets < lengths[:, None]
    return read_index[rows.flatten().to(read_index.device)], mask[:, None, None, :]


def _prepare_step(module: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Forward pre-hook: the step's bounds for every layer, and the padded read when it pays."""
    if "cu_seq_lens_q" not in kwargs:
        return args, kwargs  # generate(), not a continuous-batching step
    bounds_q = kwargs["cu_seq_lens_q"].tolist()
    keys = kwargs["cu_seq_lens_k"]
    # One full-attention cache layout: anything else (sliding windows) takes the general path.
    if not isinstance(keys, dict) or len(keys) != 1 or len(kwargs["read_index"]) != 1:
        return args, kwargs
    bounds_k = next(iter(keys.values())).tolist()
    requests = len(bounds_q) - 1
    lengths = [bounds_k[i + 1] - bounds_k[i] for i in range(requests)]
    decoding = requests > 0 and bounds_q[-1] == requests and min(lengths) > 0
    read = kwargs["read_index"][0]
    lone: LoneDecode | None = getattr(module, _LONE, None)
    if decoding and read.numel() == bounds_k[-1] and min(lengths) == max(lengths):
        if (
            requests == 1
            and lone is not None
            and kwargs.get("cache") is not None
            and lone.begin(kwargs["cache"], read, kwargs["write_index"][0])
        ):
            if lone.appending:
                kwargs["read_index"] = [read[:0]]  # transformers writes the new token, reads none
            kwargs[_STEP] = Step(bounds_q, bounds_k, in_rows=True, lone=lone)
            return args, kwargs
        kwargs[_STEP] = Step(bounds_q, bounds_k, in_rows=True)
    elif (
        decoding
        and read.numel() == bounds_k[-1]
        and requests * max(lengths) <= MAX_PADDING * bounds_k[-1]
    ):
        padded, mask = _padded_read(read, bounds_k)
        kwargs["read_index"] = [padded]
        kwargs[_STEP] = Step(bounds_q, bounds_k, in_rows=True, padded_mask=mask.to(read.device))
    else:
        kwargs[_STEP] = Step(bounds_q, bounds_k)
    if lone is not None:
        lone.forget()  # not a lone step: what it kept no longer mirrors the cache
    return args, kwargs


def _end_of_call(module: Any, args: Any, output: Any) -> None:
    """Forward hook: the model call returned (a lone step's keys are whole at every layer)."""
    getattr(module, _LONE).end_of_call()


def per_request_attention(
    module: Any,
    query: torch.Tensor,  # [1, heads, all queries of the step, head_dim]
    key: torch.Tensor,  # [1, kv_heads, all keys of the step's requests, head_dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; returns [1, queries, heads, head_dim]."""
    step: Step | None = kwargs.get(_STEP)
    if step is None:  # a cache layout the pre-hook leaves alone, or a call without it
        step = Step(kwargs["cu_seq_lens_q"].tolist(), kwargs["cu_seq_lens_k"].tolist())
    gqa = query.shape[1] != key.shape[1]
    if step.lone is not None:
        return step.lone.attend(module, query, key, value, scaling, gqa), None
    if step.in_rows:
        return _decode_in_rows(query, key, value, step.padded_mask, scaling, gqa), None
    bounds_q, bounds_k = step.bounds_q, step.bounds_k
    outputs = []
    for i in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[i], bounds_q[i + 1], bounds_k[i], bounds_k[i + 1]
        length_q, length_k = q1 - q0, k1 - k0
        if length_q == 0:
            continue
        q, k, v = query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1]
        if length_q == 1:  # decoding: the new token sees all of its request's keys
            out = scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=gqa)
        elif length_q == length_k:  # a whole prompt
            out = scaled_dot_product_attention(
                q, k, v, scale=scaling, is_causal=True, enable_gqa=gqa
            )
        else:  # a prompt's later chunk: causal, aligned to the end of the keys
            causal = torch.ones(length_q, length_k, dtype=torch.bool, device=q.device)
            causal = causal.tril(length_k - length_q)
            out = scaled_dot_product_attention(
                q, k, v, attn_mask=causal, scale=scaling, enable_gqa=gqa
            )
        outputs.append(out)
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _decode_in_rows(
    query: torch.Tensor,  # [1, heads, requests, head_dim]: one new token each
    key: torch.Tensor,  # [1, kv_heads, requests * longest, head_dim]: one row per request
    value: torch.Tensor,
    mask: torch.Tensor | None,  # [requests, 1, 1, longest]; None when no row is padded
    scaling: float | None,
    gqa: bool,
) -> torch.Tensor:
    # Views only, as few as possible: each costs microseconds, 12+ layers a step.
    requests, kv_heads, head_dim = query.shape[2], key.shape[1], key.shape[3]
    rows = (kv_heads, requests, -1, head_dim)  # then [requests, kv_heads, longest, head_dim]
    out = scaled_dot_product_attention(
        query.permute(2, 1, 0, 3),  # [requests, heads, 1, head_dim]
        key.reshape(rows).transpose(0, 1),
        value.reshape(rows).transpose(0, 1),
        attn_mask=mask,
        scale=scaling,
        enable_gqa=gqa,
    )  # [requests, heads, 1, head_dim]
    return out.permute(2, 0, 1, 3)  # [1, requests, heads, head_dim]; the caller reshapes it


def _dispatch(module: Any, *args: Any, **kwargs: Any) -> Any:
    if "cu_seq_lens_q" in kwargs and getattr(module, _MARK, False):
        return per_request_attention(module, *args, **kwargs)
    return _original(module, *args, **kwargs)


def use_per_request_attention(model: Any) -> None:
    """Route `model`'s continuous-batching attention through `per_request_attention`."""
    global _original
    if ALL_ATTENTION_FUNCTIONS["sdpa"] is not _dispatch:
        _original = ALL_ATTENTION_FUNCTIONS["sdpa"]
        ALL_ATTENTION_FUNCTIONS["sdpa"] = _dispatch
    if getattr(model, _MARK, False):
        return  # marked and hooked already
    for module in model.modules():
        setattr(module, _MARK, True)
    setattr(model, _LONE, LoneDecode())
    model.register_forward_pre_hook(_prepare_step, with_kwargs=True)
    model.register_forward_hook(_end_of_call)
