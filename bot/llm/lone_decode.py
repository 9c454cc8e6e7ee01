"""A request decoding alone keeps its keys and values in place between steps (CPU engine).

transformers' paged cache gathers all of a request's keys and values at every layer of every step
(`index_select` over the request's cache positions), where `generate` appends to tensors it
keeps. For one question decoding alone, a support bot's usual load, that gather kept the engine
behind the seed's pipeline with long prompts: a layer's share of a step at ~500 keys took 145 us
against `generate`'s 66 (the proxy model's head shapes; 327 against 139 at 1,000). Here the
first step of such a stretch copies the keys the cache read into buffers with room to grow; each
later step has transformers only write the new token to its cache (an empty read index takes its
write-only path) and appends the token here, and attention reads the buffers in place (55 us at
~500 keys, 98 at 1,000). Whole answers: 1.01-1.04x the paged read, 1.03-1.06x the seed's
pipeline (tests/benchmarks/lone_bench.py).

The buffers are trusted only while they mirror the cache: the same request (its block list in
transformers' cache, the same object), the model's previous call was this request's step and it
returned, and the positions read are the ones held plus the new token's. Anything else (a step
with other requests or a prompt, a call that raised, a request moved out of the cache and back
by transformers' offloading) drops them; the next lone step copies afresh from the cache's read.
A cache laid out otherwise than this module expects leaves every step to the paged read.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.functional import scaled_dot_product_attention

# Tokens of room past the keys a lone request has: outgrown, its buffers are copied into ones
# with as much room again (a copy every 256 tokens; the room costs no more than 256 tokens).
_HEADROOM = 256


def _owner(cache: Any, write_position: int) -> tuple[dict[str, list[int]], str] | None:
    """transformers' block table, and the request in it writing at `write_position`."""
    allocators = getattr(cache, "cache_allocators", None)
    if not isinstance(allocators, dict) or len(allocators) != 1:
        return None
    allocator = next(iter(allocators.values()))
    table = getattr(allocator, "block_table", None)
    stride = getattr(allocator, "block_physical_stride", None)
    if not isinstance(table, dict) or not isinstance(stride, int) or stride <= 0:
        return None
    block = write_position // stride
    for request, blocks in table.items():
        if block in blocks:
            return table, request
    return None


class LoneDecode:
    """One model's buffers for a request decoding alone; used from its generation thread only."""

    def __init__(self) -> None:
        self._keys: dict[Any, torch.Tensor] = {}  # attention module -> [1, kv_heads, room, dim]
        self._values: dict[Any, torch.Tensor] = {}
        self._table: dict[str, list[int]] = {}  # transformers' block table: request -> blocks
        self._request: str | None = None
        self._blocks: list[int] | None = None  # the request's block list, the same object
        self._positions: torch.Tensor | None = None  # the cache positions the buffers hold
        self._in_step = False
        self._returned = False  # the model's last call was this request's step, and it returned
        self.length = 0  # keys per layer in this step
        self.appending = False  # this step's keys are the new token's only

    def begin(self, cache: Any, read: torch.Tensor, write: torch.Tensor) -> bool:
        """For a step where one request decodes alone: False leaves the step to the paged read.
        When `appending` is set after it, the caller must empty the step's read index."""
        held = self._positions
        self.appending = (
            self._returned  # so `_request`, `_blocks` and `_positions` are the last step's
            and self._table.get(self._request or "") is self._blocks
            and held is not None
            and torch.equal(read[:-1], held)  # what it held, and one token more
        )
        if not self.appending:
            self.forget()
            found = _owner(cache, int(write[0]))
            if found is None:
                return False
            self._table, self._request = found
            self._blocks = self._table[self._request]
        self._positions = read.clone()  # transformers reuses the read index's storage
        self.length = read.numel()
        self._in_step, self._returned = True, False
        return True

    def end_of_call(self) -> None:
        """After each model call (a forward hook): a lone step that returned can be appended to."""
        self._returned, self._in_step = self._in_step, False

    def forget(self) -> None:
        """Drops the buffers: the next lone step copies from the cache again."""
        self._keys.clear()
        self._values.clear()
        self._table = {}
        self._request = self._blocks = self._positions = None
        self._in_step = self._returned = False

    def attend(
        self,
        module: Any,
        query: torch.Tensor,  # [1, heads, 1, head_dim]
        key: torch.Tensor,  # [1, kv_heads, length or 1 (appending), head_dim]
        value: torch.Tensor,
        scaling: float | None,
        gqa: bool,
    ) -> torch.Tensor:  # [1, 1, heads, head_dim]
        length = self.length
        if self.appending:
            keys, values = self._room(module, length)
            keys[:, :, length - 1 : length] = key
            values[:, :, length - 1 : length] = value
        else:  # the first step: the cache's read of every key
            keys, values = self._fresh(key, length), self._fresh(value, length)
            self._keys[module], self._values[module] = keys, values
        out = scaled_dot_product_attention(
            query, keys[:, :, :length], values[:, :, :length], scale=scaling, enable_gqa=gqa
        )
        return out.transpose(1, 2)

    @staticmethod
    def _fresh(states: torch.Tensor, length: int) -> torch.Tensor:
        """A buffer holding `states` (its first `length` keys) with room for `_HEADROOM` more."""
        kv_heads, head_dim = states.shape[1], states.shape[3]
        buffer = states.new_empty((1, kv_heads, length + _HEADROOM, head_dim))
        buffer[:, :, :length] = states[:, :, :length]
        return buffer

    def _room(self, module: Any, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._keys[module], self._values[module]
        if keys.shape[2] < length:
            keys, values = self._fresh(keys, length - 1), self._fresh(values, length - 1)
            self._keys[module], self._values[module] = keys, values
        return keys, values
