"""Per-request attention on a CPU (bot/llm/cpu_attention.py) computes what transformers' dense
block-diagonal masked attention computes, for a step mixing decoding requests, a whole prompt and
a prompt's later chunk, with grouped-query heads; other calls keep transformers' function."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from bot.llm import cpu_attention  # noqa: E402


def dense_reference(query, key, value, bounds_q, bounds_k):
    """The step as one attention through a block-diagonal, end-aligned causal mask."""
    heads, kv_heads = query.shape[1], key.shape[1]
    key = key.repeat_interleave(heads // kv_heads, dim=1)
    value = value.repeat_interleave(heads // kv_heads, dim=1)
    mask = torch.zeros(bounds_q[-1], bounds_k[-1], dtype=torch.bool)
    for i in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[i], bounds_q[i + 1], bounds_k[i], bounds_k[i + 1]
        lq, lk = q1 - q0, k1 - k0
        mask[q0:q1, k0:k1] = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    return out.transpose(1, 2)


@pytest.mark.parametrize("kv_heads", [2, 8])
def test_each_request_attends_to_its_own_keys_as_the_dense_mask_says(kv_heads):
    torch.manual_seed(0)
    # Two decoding requests (1 query, 9 and 4 keys), a whole prompt (5 of 5), a later chunk of
    # a prompt (3 queries over 7 keys), and an empty slot (padding).
    lengths_q, lengths_k = [1, 1, 5, 3, 0], [9, 4, 5, 7, 0]
    bounds_q = [0, *torch.tensor(lengths_q).cumsum(0).tolist()]
    bounds_k = [0, *torch.tensor(lengths_k).cumsum(0).tolist()]
    query = torch.randn(1, 8, bounds_q[-1], 16)
    key = torch.randn(1, kv_heads, bounds_k[-1], 16)
    value = torch.randn(1, kv_heads, bounds_k[-1], 16)
    out, _ = cpu_attention.per_request_attention(
        None, query, key, value, None,
        cu_seq_lens_q=torch.tensor(bounds_q), cu_seq_lens_k=torch.tensor(bounds_k),
    )  # fmt: skip
    assert out.shape == (1, bounds_q[-1], 8, 16)
    torch.testing.assert_close(out, dense_reference(query, key, value, bounds_q, bounds_k))


def test_unmarked_modules_and_calls_without_packed_lengths_keep_transformers_sdpa():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    marked, other = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    cpu_attention.use_per_request_attention(marked)
    cpu_attention.use_per_request_attention(marked)  # twice: still one layer in front
    calls = []

    def transformers_sdpa(module, *args, **kwargs):
        calls.append(module)
        return "transformers"

    original = cpu_attention._original
    cpu_attention._original = transformers_sdpa
    try:
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        assert sdpa(other, cu_seq_lens_q=None) == "transformers"
        assert sdpa(marked) == "transformers"  # generate(): no packed lengths
        assert calls == [other, marked]
    finally:
        cpu_attention._original = original
    assert original is not cpu_attention._dispatch
