"""What a user is told when no backend answered, by the typed reason the chain gives: what
happened and what they (or an operator) can do. Pure wording, shared by every platform."""

from __future__ import annotations

from bot.llm.base import BackendTimeout, BackendUnavailable, RateLimited, RequestRejected
from bot.llm.chain import CircuitOpen, NoBackendAvailable


def no_backend_message(exc: NoBackendAvailable) -> tuple[str, str]:
    """(message, metrics reason) for a question no backend answered. A request-specific refusal
    says most (another try elsewhere would not help); otherwise the last backend tried speaks."""
    causes = exc.causes
    if not causes:
        return (
            "No model is configured: the local model is disabled (LLM_MODEL=none) and the GPT "
            "fallback (OPENAI_API_KEY) is not set. An operator must set one of them; "
            "`supportbot doctor` checks the configuration.",
            "not_configured",
        )
    rejected = [c for c in causes if isinstance(c, RequestRejected)]
    cause = next((c for c in rejected if c.too_long), rejected[0] if rejected else causes[-1])
    if isinstance(cause, RequestRejected) and cause.too_long:
        return (
            "Your question and this conversation's history are too long for the model. "
            "Shorten the question, clear the history with `/llm-settings forget`, "
            "or lower max_new_tokens with /llm-settings.",
            "too_long",
        )
    if isinstance(cause, RequestRejected):
        return (
            "The model refused this question as an invalid request. Please rephrase it; "
            "if it keeps happening, tell an operator the error id.",
            "rejected",
        )
    if isinstance(cause, RateLimited):
        return (
            "The model is rate-limited right now (too many requests). "
            "Please ask again in a minute.",
            "rate_limited",
        )
    if isinstance(cause, BackendTimeout):
        return (
            "The model took too long to answer, so I stopped waiting. "
            "Please try again in a minute.",
            "timeout",
        )
    if isinstance(cause, CircuitOpen):
        return (
            "The model has failed several times just now, so I'm giving it a short rest. "
            "Please ask again in a minute.",
            "circuit_open",
        )
    if all(isinstance(c, BackendUnavailable) for c in causes):
        # Each reason names its backend, why, and what to do (e.g. the hub did not answer).
        reasons = "; ".join(str(c).rstrip(".") for c in causes)
        return f"No model is available to answer: {reasons}.", "no_backend"
    return (
        "Sorry, the model failed while answering. Please try again in a minute; if it keeps "
        "failing, an operator can run `supportbot doctor`.",
        "failed",
    )
