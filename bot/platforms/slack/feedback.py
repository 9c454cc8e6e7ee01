"""👍/👎 and "Ask a human" on a Slack answer: the buttons on its final message and the actions
they send, and "Resolved" on the hand-off message.

The buttons carry the stored answer's id as their value; a press arrives as a `block_actions`
interaction (verified like every request, acknowledged at once, within Slack's 3 s), and the
presser alone is answered through the interaction's response URL (ephemeral: the channel sees
nothing). A hand-off is a message in the thread that mentions SLACK_HANDOFF_TO, with the question
and a summary; its "Resolved" button replaces it with who resolved it.
"""

from __future__ import annotations

import logging
from typing import Any

from slack_bolt.async_app import AsyncApp
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.context.respond.async_respond import AsyncRespond
from slack_sdk.web.async_client import AsyncWebClient

from bot.conversation import ConversationKey, Vote
from bot.handoff import HANDOFF_GONE
from bot.platforms.frontdoor import error_reply
from bot.platforms.slack.mrkdwn import escape
from bot.service import SupportService, User

logger = logging.getLogger(__name__)

VOTE_UP = "sb_vote_up"
VOTE_DOWN = "sb_vote_down"
HANDOFF = "sb_handoff"
RESOLVED = "sb_resolved"
_VOTES: dict[str, Vote] = {VOTE_UP: "up", VOTE_DOWN: "down"}
SECTION_LIMIT = 3000  # Slack's limit on a section block's text


def controls(answer_id: str) -> dict[str, Any]:
    """The actions block under an answer."""

    def button(action_id: str, label: str) -> dict[str, Any]:
        return {
            "type": "button",
            "action_id": action_id,
            "value": answer_id,
            "text": {"type": "plain_text", "text": label, "emoji": True},
        }

    return {
        "type": "actions",
        "block_id": f"sb_feedback:{answer_id}",
        "elements": [
            button(VOTE_UP, "👍"), button(VOTE_DOWN, "👎"), button(HANDOFF, "Ask a human")
        ],
    }  # fmt: skip


def mentions(ids: tuple[str, ...]) -> str:
    """Slack mentions for user ids and user-group (S…) ids."""
    return " ".join(f"<!subteam^{i}>" if i.startswith("S") else f"<@{i}>" for i in ids)


def handoff_message(ids: tuple[str, ...], asked_by: str, question: str, summary: str | None,
                    thread: str) -> tuple[str, list[dict[str, Any]]]:  # fmt: skip
    """The hand-off's text and blocks (with the "Resolved" button)."""
    who = mentions(ids)
    lines = [
        f"{who + ' ' if who else ''}<@{asked_by}> asked for a human in this thread.",
        f"*Question:* {escape(question)}",
        f"*Summary:* {escape(summary)}" if summary else "_(No summary: no model could write one.)_",
        "I'll stay out of this thread until someone presses Resolved.",
    ]
    text = "\n".join(lines)
    resolved = {
        "type": "button", "action_id": RESOLVED, "value": thread, "style": "primary",
        "text": {"type": "plain_text", "text": "Resolved"},
    }  # fmt: skip
    return text, [*text_blocks(text, markdown=False), {"type": "actions", "elements": [resolved]}]


def text_blocks(view: str, *, markdown: bool) -> list[dict[str, Any]]:
    """A message's text as blocks (a message with blocks shows them, not its `text`)."""
    if markdown:
        return [{"type": "markdown", "text": view}]
    chunks = [view[i : i + SECTION_LIMIT] for i in range(0, len(view), SECTION_LIMIT)] or [" "]
    return [{"type": "section", "text": {"type": "mrkdwn", "text": c}} for c in chunks]


class Feedback:
    """The listeners for the vote buttons."""

    def __init__(
        self, service: SupportService, platform: str, handoff_to: tuple[str, ...] = ()
    ) -> None:
        self.service = service
        self.platform = platform
        self.handoff_to = handoff_to

    def register(self, app: AsyncApp) -> None:
        for action_id in _VOTES:
            app.action(action_id)(self._on_vote)
        app.action(HANDOFF)(self._on_handoff)
        app.action(RESOLVED)(self._on_resolved)

    async def _on_handoff(
        self, ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, client: AsyncWebClient
    ) -> None:
        await ack()
        key, user_id, value = self._where(body)
        try:
            handoff = await self.service.handoff(key, value)
            if handoff is None:
                reply = HANDOFF_GONE
            else:
                assert key.thread is not None
                text, blocks = handoff_message(
                    self.handoff_to, user_id, handoff.question, handoff.summary, key.thread
                )
                await client.chat_postMessage(
                    channel=key.channel, thread_ts=key.thread, text=text, blocks=blocks
                )
                reply = "I've asked a human to take over this thread."
        except Exception as exc:
            reply = error_reply(
                "Sorry, I couldn't hand this off. Please try again, or mention the team.",
                "hand-off in %s failed",
                key.describe(),
                exc=exc,
            )
        await respond(text=reply, response_type="ephemeral", replace_original=False)

    async def _on_resolved(
        self, ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond
    ) -> None:
        await ack()
        key, user_id, _ = self._where(body)
        try:
            await self.service.resolve(key)
        except Exception as exc:
            reply = error_reply(
                "Sorry, I couldn't mark this resolved. Please try again.",
                "resolving the hand-off in %s failed",
                key.describe(),
                exc=exc,
            )
            await respond(text=reply, response_type="ephemeral", replace_original=False)
            return
        await respond(
            text=f"✅ Resolved by <@{user_id}>. I'll answer in this thread again.",
            replace_original=True,
        )

    def _where(self, body: dict[str, Any]) -> tuple[ConversationKey, str, str]:
        """The pressed message's thread, who pressed, and the button's value."""
        user = body.get("user") or {}
        team = str((body.get("team") or {}).get("id") or user.get("team_id") or "")
        message = body.get("message") or {}
        container = body.get("container") or {}
        thread = str(
            message.get("thread_ts") or container.get("thread_ts") or message.get("ts") or ""
        )
        channel = str((body.get("channel") or {}).get("id") or container.get("channel_id") or "")
        value = str(((body.get("actions") or [{}])[0]).get("value") or "")
        key = ConversationKey(self.platform, team, channel, thread or None)
        return key, str(user.get("id") or ""), value

    async def _on_vote(self, ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond) -> None:
        await ack()
        key, user_id, answer_id = self._where(body)
        action_id = str(((body.get("actions") or [{}])[0]).get("action_id"))
        try:
            reply = await self.service.feedback(key, answer_id, User(user_id), _VOTES[action_id])
        except Exception as exc:
            reply = error_reply(
                "Sorry, your vote could not be recorded. Please try again.",
                "vote in %s failed",
                key.describe(),
                exc=exc,
            )
        await respond(text=reply, response_type="ephemeral", replace_original=False)
