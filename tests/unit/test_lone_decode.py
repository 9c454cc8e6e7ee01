"""A request decoding alone keeps its keys between steps (bot/llm/lone_decode.py): attention over
the kept keys equals attention over the cache's full read, and the kept keys are trusted only
while they mirror the cache. The engine-level proof (answers equal `generate`'s, the path taken
with transformers' real cache) is in tests/integration/test_batching_engine.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from bot.llm import cpu_attention  # noqa: E402
from bot.llm.lone_decode import LoneDecode  # noqa: E402

STRIDE = 64  # physical rows per block in the stand-in for transformers' block table
PAGE = 16  # tokens of one layer per block


def cache_with(**requests: list[int]) -> SimpleNamespace:
    """What LoneDecode reads of transformers' PagedAttentionCache: one full-attention allocator,
    its block table (request -> block ids) and the physical stride of a block."""
    allocator = SimpleNamespace(block_table=dict(requests), block_physical_stride=STRIDE)
    return SimpleNamespace(cache_allocators={"full_attention": allocator})


def positions(blocks: list[int], length: int) -> Any:
    """The read index of a request's first `length` tokens, as transformers lays it out."""
    return torch.tensor([blocks[i // PAGE] * STRIDE + i % PAGE for i in range(length)])


def begin(lone: LoneDecode, cache: SimpleNamespace, blocks: list[int], length: int) -> bool:
    read = positions(blocks, length)
    return lone.begin(cache, read, read[-1:])


def test_attention_over_kept_keys_equals_attention_over_the_full_read_as_they_grow():
    torch.manual_seed(0)
    layer = object()  # a layer's attention module: the key of its buffers
    blocks = list(range(40))
    cache = cache_with(a=blocks)
    keys, values = torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)  # the prompt's
    lone = LoneDecode()
    for _ in range(600):  # past the first room (256 tokens past the prompt), twice
        keys = torch.cat([keys, torch.randn(1, 2, 1, 16)], dim=2)
        values = torch.cat([values, torch.randn(1, 2, 1, 16)], dim=2)
        length = keys.shape[2]
        assert begin(lone, cache, blocks, length)
        query = torch.randn(1, 8, 1, 16)
        given = (keys[:, :, -1:], values[:, :, -1:]) if lone.appending else (keys, values)
        out = lone.attend(layer, query, *given, scaling=None, gqa=True)
        lone.end_of_call()
        expected = torch.nn.functional.scaled_dot_product_attention(
            query, keys, values, enable_gqa=True
        ).transpose(1, 2)
        torch.testing.assert_close(out, expected)
    assert lone.appending  # every step after the first appended


def appended_after(change) -> bool:
    """Whether the next step appends when a lone step of request a at 20 tokens returned, then
    `change(lone, cache)` happened; it may name the next step's length (else 21)."""
    cache = cache_with(a=[3, 5], b=[7])
    lone = LoneDecode()
    assert begin(lone, cache, [3, 5], 20) and not lone.appending
    lone.end_of_call()
    length = change(lone, cache) or 21
    assert begin(lone, cache, [3, 5], length)
    return lone.appending


def nothing(lone, cache):
    return None


def raised(lone, cache):
    """The step at 21 tokens appended in some layers and raised: the forward hook never ran."""
    assert begin(lone, cache, [3, 5], 21) and lone.appending
    return 22


def moved_out_and_back(lone, cache):
    """transformers' offloading gave the request a new block list with the same blocks."""
    table = cache.cache_allocators["full_attention"].block_table
    table["a"] = list(table["a"])


def answered_and_replaced(lone, cache):
    """Request a finished; request c took its blocks, at the same positions."""
    table = cache.cache_allocators["full_attention"].block_table
    table["c"] = table.pop("a")[:]


def another_call_between(lone, cache):
    """The model ran a call that was not this request's lone step (the hook ran, no begin)."""
    lone.end_of_call()


def skipped_a_token(lone, cache):
    return 22


@pytest.mark.parametrize(
    "change", [raised, moved_out_and_back, answered_and_replaced, another_call_between,
               skipped_a_token],
)  # fmt: skip
def test_kept_keys_are_copied_afresh_unless_the_same_request_returned_its_last_step(change):
    assert appended_after(nothing)
    assert not appended_after(change)


def test_a_cache_laid_out_otherwise_leaves_lone_steps_to_the_paged_read():
    lone = LoneDecode()
    read = positions([3], 10)
    assert not lone.begin(cache_with(a=[4]), read, read[-1:])  # no request writes there
    other_layout = SimpleNamespace(cache_allocators={"full_attention": SimpleNamespace()})
    assert not lone.begin(other_layout, read, read[-1:])
    two_groups = cache_with(a=[3])
    two_groups.cache_allocators["sliding_attention"] = two_groups.cache_allocators["full_attention"]
    assert not lone.begin(two_groups, read, read[-1:])


def step(blocks_by_request: dict[str, list[int]], lengths: list[int], cache: SimpleNamespace):
    """Decoding-step kwargs as transformers passes them to the model."""
    reads = [
        positions(blocks_by_request[r], n) for r, n in zip(blocks_by_request, lengths, strict=True)
    ]
    read = torch.cat(reads)
    bounds_k = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    return {
        "cu_seq_lens_q": torch.arange(len(lengths) + 1),
        "cu_seq_lens_k": {"full_attention": torch.tensor(bounds_k)},
        "read_index": [read],
        "write_index": [torch.stack([r[-1] for r in reads])],
        "cache": cache,
    }


def test_the_step_prelude_empties_the_read_of_an_appending_step_and_forgets_on_other_steps():
    model = SimpleNamespace(**{cpu_attention._LONE: LoneDecode()})
    lone = getattr(model, cpu_attention._LONE)
    cache = cache_with(a=[3, 5], b=[7])

    def prepared(kwargs):
        read = kwargs["read_index"][0]
        _, kwargs = cpu_attention._prepare_step(model, (), kwargs)
        cpu_attention._end_of_call(model, (), None)
        return kwargs[cpu_attention._STEP], kwargs["read_index"][0], read

    first, read, full = prepared(step({"a": [3, 5]}, [20], cache))
    assert first.lone is lone and read is full  # copied from transformers' read
    second, read, _ = prepared(step({"a": [3, 5]}, [21], cache))
    assert second.lone is lone and read.numel() == 0  # transformers only writes
    both, read, full = prepared(step({"a": [3, 5], "b": [7]}, [22, 9], cache))
    assert both.lone is None and read.numel() >= full.numel() and not lone._keys
    again, read, full = prepared(step({"a": [3, 5]}, [23], cache))
    assert again.lone is lone and not lone.appending and read is full
