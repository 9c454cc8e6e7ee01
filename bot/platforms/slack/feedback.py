"""👍/👎 on a Slack answer: the buttons on its final message and the actions they send.

The buttons carry the stored answer's id as their value; a press arrives as a `block_actions`
interaction (verified like every request, acknowledged at once, within Slack's 3 s), and the
voter alone is thanked through the interaction's response URL (an ephemeral message: the channel
sees nothing).
"""

from __future__ import annotations

import logging
from typing import Any

from slack_bolt.async_app import AsyncApp
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.context.respond.async_respond import AsyncRespond

from bot.conversation import ConversationKey, Vote
from bot.platforms.frontdoor import error_reply
from bot.service import SupportService, User

logger = logging.getLogger(__name__)

VOTE_UP = "sb_vote_up"
VOTE_DOWN = "sb_vote_down"
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
        "elements": [button(VOTE_UP, "👍"), button(VOTE_DOWN, "👎")],
    }


def text_blocks(view: str, *, markdown: bool) -> list[dict[str, Any]]:
    """A message's text as blocks (a message with blocks shows them, not its `text`)."""
    if markdown:
        return [{"type": "markdown", "text": view}]
    chunks = [view[i : i + SECTION_LIMIT] for i in range(0, len(view), SECTION_LIMIT)] or [" "]
    return [{"type": "section", "text": {"type": "mrkdwn", "text": c}} for c in chunks]


class Feedback:
    """The listeners for the vote buttons."""

    def __init__(self, service: SupportService, platform: str) -> None:
        self.service = service
        self.platform = platform

    def register(self, app: AsyncApp) -> None:
        for action_id in _VOTES:
            app.action(action_id)(self._on_vote)

    async def _on_vote(self, ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond) -> None:
        await ack()
        action = (body.get("actions") or [{}])[0]
        user_id = str((body.get("user") or {}).get("id") or "")
        team = str((body.get("team") or {}).get("id") or (body.get("user") or {}).get("team_id"))
        channel = str((body.get("channel") or {}).get("id") or "")
        key = ConversationKey(self.platform, team, channel)
        try:
            reply = await self.service.feedback(
                key, str(action.get("value") or ""), User(user_id), _VOTES[action["action_id"]]
            )
        except Exception as exc:
            reply = error_reply(
                "Sorry, your vote could not be recorded. Please try again.",
                "vote in %s failed",
                key.describe(),
                exc=exc,
            )
        await respond(text=reply, response_type="ephemeral", replace_original=False)
