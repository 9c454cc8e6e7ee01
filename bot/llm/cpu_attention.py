"""Attention for the batching engine on a CPU: each request attends to its own keys only.

Without flash attention, transformers' continuous batching runs one attention over the whole
step: every request's queries against every request's keys through a dense block-diagonal mask,
with the KV heads repeated for grouped-query attention. On a CPU (no flash kernel exists) that
is what separates the engine from static batching once requests have long prompts: at 16
questions of ~260 tokens a decode step took 210 ms against `generate`'s 151 ms. Here the step's
packed queries and keys are cut at the cumulative lengths transformers passes along
(`cu_seq_lens_q`, `cu_seq_lens_k`) and each request runs torch's SDPA on its own slice, grouped
heads handled natively (`enable_gqa`): the same arithmetic without the mask or the repeated KV
(130 ms per step). The mask transformers still builds is left unused.

It is installed in front of transformers' `sdpa` attention and applies only to the modules of
models `use_per_request_attention` marked, and only to continuous-batching calls (the ones that
carry `cu_seq_lens_q`): `generate`, other models, and the GPU keep transformers' own path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

_MARK = "_supportbot_per_request_attention"
_original: Any = None


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
    bounds_q = kwargs["cu_seq_lens_q"].tolist()
    bounds_k = kwargs["cu_seq_lens_k"].tolist()
    gqa = query.shape[1] != key.shape[1]
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
    for module in model.modules():
        setattr(module, _MARK, True)
