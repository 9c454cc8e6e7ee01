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
    calls: list[int] = []

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


def decoding_step(lengths_k, kv_heads=2, cache_tokens=64):
    """A decoding step as transformers hands it to the model: one new query per request, and the
    read index of each request's keys in a shuffled paged cache."""
    torch.manual_seed(1)
    bounds_k = [0, *torch.tensor(lengths_k).cumsum(0).tolist()]
    kwargs = {
        "cu_seq_lens_q": torch.arange(len(lengths_k) + 1),
        "cu_seq_lens_k": {"full_attention": torch.tensor(bounds_k)},
        "read_index": [torch.randperm(cache_tokens)[: bounds_k[-1]]],
    }
    cache_k = torch.randn(cache_tokens, kv_heads, 16)
    cache_v = torch.randn(cache_tokens, kv_heads, 16)
    query = torch.randn(1, 8, len(lengths_k), 16)
    return kwargs, cache_k, cache_v, query, bounds_k


def read(cache, index):
    """The paged cache's read, in the layout transformers passes to attention."""
    return cache.index_select(0, index).transpose(0, 1).unsqueeze(0)


@pytest.mark.parametrize("kv_heads", [2, 8])
def test_a_decoding_step_reads_padded_rows_and_attends_in_one_call_as_the_dense_mask_says(
    kv_heads, monkeypatch
):
    lengths_k = [9, 7, 9, 8]
    kwargs, cache_k, cache_v, query, bounds_k = decoding_step(lengths_k, kv_heads)
    packed_index = kwargs["read_index"][0]
    expected = dense_reference(
        query, read(cache_k, packed_index), read(cache_v, packed_index),
        list(range(len(lengths_k) + 1)), bounds_k,
    )  # fmt: skip

    _, kwargs = cpu_attention._prepare_step(None, (), kwargs)
    step = kwargs[cpu_attention._STEP]
    padded_index = kwargs["read_index"][0]
    assert padded_index.numel() == len(lengths_k) * max(lengths_k)
    assert step.padded_mask.squeeze().sum(-1).tolist() == lengths_k
    calls: list[int] = []
    monkeypatch.setattr(cpu_attention, "scaled_dot_product_attention", counted(calls))
    out, _ = cpu_attention.per_request_attention(
        None, query, read(cache_k, padded_index), read(cache_v, padded_index), None, **kwargs
    )
    assert len(calls) == 1  # one call for the whole step
    torch.testing.assert_close(out, expected)


def counted(calls):
    real = torch.nn.functional.scaled_dot_product_attention

    def sdpa(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    return sdpa


def test_rows_of_very_different_lengths_keep_the_packed_read_and_one_call_per_request(monkeypatch):
    lengths_k = [40, 3, 2, 4]  # padded, 160 keys would be read for 49
    kwargs, cache_k, cache_v, query, bounds_k = decoding_step(lengths_k)
    packed_index = kwargs["read_index"][0]
    _, kwargs = cpu_attention._prepare_step(None, (), kwargs)
    assert kwargs["read_index"][0] is packed_index
    assert kwargs[cpu_attention._STEP].padded_mask is None
    calls: list[int] = []
    monkeypatch.setattr(cpu_attention, "scaled_dot_product_attention", counted(calls))
    keys, values = read(cache_k, packed_index), read(cache_v, packed_index)
    out, _ = cpu_attention.per_request_attention(None, query, keys, values, None, **kwargs)
    assert len(calls) == len(lengths_k)
    bounds_q = list(range(len(lengths_k) + 1))
    torch.testing.assert_close(out, dense_reference(query, keys, values, bounds_q, bounds_k))


def test_a_step_that_prefills_is_not_padded_and_generate_calls_pass_untouched():
    kwargs, *_ = decoding_step([5, 6])
    kwargs["cu_seq_lens_q"] = torch.tensor([0, 1, 4])  # the second request prefills 3 tokens
    packed_index = kwargs["read_index"][0]
    _, kwargs = cpu_attention._prepare_step(None, (), kwargs)
    assert kwargs["read_index"][0] is packed_index
    step = kwargs[cpu_attention._STEP]
    assert (step.bounds_q, step.bounds_k, step.padded_mask) == ([0, 1, 4], [0, 5, 11], None)

    plain = {"attention_mask": None}  # generate(): no packed lengths, nothing added
    assert cpu_attention._prepare_step(None, (), dict(plain)) == ((), plain)


@pytest.mark.parametrize("lengths_k", [[12], [9, 9, 9]])
def test_rows_of_equal_length_keep_the_packed_read_and_attend_in_one_unmasked_call(
    lengths_k, monkeypatch
):
    """One request decoding alone (or several with as many keys each): the packed read is one
    row per request already, so nothing is re-read, padded or masked."""
    kwargs, cache_k, cache_v, query, bounds_k = decoding_step(lengths_k)
    packed_index = kwargs["read_index"][0]
    _, kwargs = cpu_attention._prepare_step(None, (), kwargs)
    assert kwargs["read_index"][0] is packed_index
    step = kwargs[cpu_attention._STEP]
    assert step.in_rows and step.padded_mask is None
    masks: list[object] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def sdpa(*args, attn_mask=None, **options):
        masks.append(attn_mask)
        return real(*args, attn_mask=attn_mask, **options)

    monkeypatch.setattr(cpu_attention, "scaled_dot_product_attention", sdpa)
    keys, values = read(cache_k, packed_index), read(cache_v, packed_index)
    out, _ = cpu_attention.per_request_attention(None, query, keys, values, None, **kwargs)
    assert masks == [None]  # one call for the whole step, no mask
    bounds_q = list(range(len(lengths_k) + 1))
    torch.testing.assert_close(out, dense_reference(query, keys, values, bounds_q, bounds_k))
