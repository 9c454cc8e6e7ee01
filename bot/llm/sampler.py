"""How the batching engine picks each request's next token: greedy rows by argmax, sampling rows
by temperature, top-k and top-p over their top-k candidates only, and never a NaN.

transformers' continuous batching applies one processor chain to every row and samples every row
when `do_sample` is set, so greedy had to be top_k=1 (a full-vocabulary sort per token) and a
tiny temperature turned a row into inf/NaN, which failed the whole batch. Here the engine runs
with `do_sample=False` (transformers takes the argmax of what this processor returns) and this
processor only marks, for each sampling row, the token it drew: that token's score becomes +inf,
so the argmax is the draw. Greedy rows are left alone, so they are exactly `generate`'s argmax.

Per-request values travel as three tensors: temperature (0 for greedy), top_k, top_p. On a CPU the
rows that sample and their largest top_k are known on the host before each step, so a batch of
greedy requests does no work here at all. On a GPU (CUDA graphs, async batching) the step must be
branch-free: every row computes a draw over the largest allowed top_k and greedy rows keep their
argmax through `torch.where`.

torch and transformers are imported at module level: the engine imports this module only when it
starts a model.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessorList,
)
from transformers.generation.logits_process import LogitsProcessorList

from bot.sampling import SPECS

_TEMPERATURE, _TOP_K, _TOP_P = range(3)
MAX_TOP_K = int(SPECS["top_k"].upper(0))  # the contract's bound: candidates never exceed it


class RequestSampler(ContinuousBatchingLogitsProcessorList):
    """The engine's one logits processor; `request_kwargs` says what each request passes."""

    def __init__(self, *, branch_free: bool) -> None:
        super().__init__(LogitsProcessorList())
        self.tensors_required = 3
        self.supported_keys = {"temperature": float, "top_k": int, "top_p": float}
        self.ignored_keys = set()
        self.do_processing = True
        self.branch_free = branch_free
        # Host-side facts about the batch being prepared (CPU path only).
        self._sampling_rows: list[int] = []
        self._k = 1

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        # Padding rows (CUDA graphs) are greedy: temperature 0, top_k 1, top_p 1.
        int32_tensor[_TEMPERATURE].copy_(torch.zeros(1, dtype=torch.float32).view(torch.int32))
        int32_tensor[_TOP_K].fill_(1)
        int32_tensor[_TOP_P].copy_(torch.ones(1, dtype=torch.float32).view(torch.int32))

    def prepare_tensor_args(self, requests_in_batch: list[Any], arg_storage: torch.Tensor) -> Any:
        # Logits exist only for requests that get a token this step, in batch order.
        kwargs = [r.state.logit_processor_kwargs for r in requests_in_batch if r.has_new_token]
        temperatures = [float(k.get("temperature", 0.0)) for k in kwargs]
        top_ks = [int(k.get("top_k", 1)) for k in kwargs]
        self._sampling_rows = [i for i, t in enumerate(temperatures) if t > 0]
        self._k = max((top_ks[i] for i in self._sampling_rows), default=1)
        if not self._sampling_rows and not self.branch_free:
            return arg_storage  # an all-greedy step reads no argument (see __call__)
        top_ps = [float(k.get("top_p", 1.0)) for k in kwargs]
        n = len(kwargs)
        device = arg_storage.device
        floats = torch.tensor([temperatures, top_ps], dtype=torch.float32).view(torch.int32)
        arg_storage[_TEMPERATURE, :n] = floats[0].to(device)
        arg_storage[_TOP_K, :n] = torch.tensor(top_ks, dtype=torch.int32).to(device)
        arg_storage[_TOP_P, :n] = floats[1].to(device)
        return arg_storage

    def __call__(self, input_ids: Any, scores: torch.Tensor, logits_processor_args: Any) -> Any:
        args = logits_processor_args[:, : scores.size(0)]
        if self.branch_free:
            return self._mark_all(scores, args)
        if not self._sampling_rows:
            return scores  # all greedy: transformers' argmax is the answer
        rows = torch.tensor(self._sampling_rows, device=scores.device)
        sub = scores.index_select(0, rows)
        k = min(self._k, scores.size(-1))
        tokens = _draw(sub, args.index_select(1, rows), k)
        scores[rows, tokens] = float("inf")
        return scores

    @staticmethod
    def _mark_all(scores: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
        greedy = args[_TEMPERATURE].view(torch.float32) <= 0
        drawn = _draw(scores, args, min(MAX_TOP_K, scores.size(-1)))
        tokens = torch.where(greedy, scores.argmax(dim=-1), drawn)
        return scores.scatter(1, tokens.unsqueeze(-1), float("inf"))


def _draw(scores: torch.Tensor, args: torch.Tensor, k: int) -> torch.Tensor:
    """One token id per row, drawn as transformers' sampling would: temperature, then top-k,
    then top-p, on the k best candidates. Non-finite values become a zero chance, so a row
    always yields a token (its best candidate at worst)."""
    temperature = args[_TEMPERATURE].view(torch.float32)
    top_k = args[_TOP_K]
    top_p = args[_TOP_P].view(torch.float32)
    values, ids = scores.topk(k, dim=-1)  # best first
    # Greedy rows (temperature 0) still flow through here on the branch-free path: divide by 1.
    safe = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    logits = values / safe.unsqueeze(-1)
    rank = torch.arange(k, device=scores.device)
    logits = logits.masked_fill(rank >= top_k.unsqueeze(-1), float("-inf"))
    probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    # top-p keeps a candidate while the mass ranked above it is below p (the best always stays).
    above = probs.cumsum(dim=-1) - probs
    keep = (above < top_p.unsqueeze(-1)) | (rank == 0)
    probs = torch.nan_to_num(probs * keep, nan=0.0, posinf=0.0)
    # Exponential race: argmax(p / E), E ~ Exp(1), draws index i with probability p_i / sum(p);
    # unlike multinomial it needs no normalised input and never raises.
    # (E is kept above 0: 0/0 would be NaN, which argmax would pick.)
    race = probs / torch.empty_like(probs).exponential_().clamp_min_(1e-30)
    pick = race.argmax(dim=-1, keepdim=True)
    return ids.gather(1, pick).squeeze(-1)
