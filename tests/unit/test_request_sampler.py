"""RequestSampler (bot/llm/sampler.py) on a CPU: a step of greedy requests costs nothing beyond
transformers' argmax, and a sampling request beside them is drawn for."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from bot.llm.sampler import RequestSampler  # noqa: E402


def batch(*settings: dict[str, float]) -> list[SimpleNamespace]:
    """Requests as transformers hands them to `prepare_tensor_args`: one token due each."""
    return [
        SimpleNamespace(has_new_token=True, state=SimpleNamespace(logit_processor_kwargs=kw))
        for kw in settings
    ]


GREEDY = {"temperature": 0.0, "top_k": 1, "top_p": 1.0}
HOT = {"temperature": 1.0, "top_k": 5, "top_p": 1.0}


def test_a_greedy_step_writes_no_arguments_and_leaves_the_scores_to_the_argmax():
    sampler = RequestSampler(branch_free=False)
    storage = torch.full((3, 4), 7, dtype=torch.int32)
    args = sampler.prepare_tensor_args(batch(GREEDY, GREEDY), storage)
    assert torch.equal(storage, torch.full((3, 4), 7, dtype=torch.int32))  # nothing built
    scores = torch.randn(2, 10)
    assert sampler(None, scores.clone(), args).equal(scores)


def test_a_sampling_request_beside_greedy_ones_is_drawn_for_and_the_greedy_ones_are_not():
    sampler = RequestSampler(branch_free=False)
    storage = torch.zeros((3, 4), dtype=torch.int32)
    args = sampler.prepare_tensor_args(batch(GREEDY, GREEDY), storage)  # a greedy step first
    args = sampler.prepare_tensor_args(batch(GREEDY, HOT), storage)
    assert args[1, :2].tolist() == [1, 5]  # top_k of each row
    scores = torch.randn(2, 10)
    marked = sampler(None, scores.clone(), args)
    assert marked[0].equal(scores[0])  # the greedy row keeps its scores
    drawn = int(marked[1].argmax())
    assert marked[1, drawn] == float("inf")
    assert drawn in scores[1].topk(5).indices.tolist()  # one of its top-k candidates
