"""Markdown → Slack mrkdwn (bot/platforms/slack_mrkdwn.py), as the update path sends it."""

from __future__ import annotations

import pytest

from bot.platforms.slack.mrkdwn import ZWSP, defuse, to_mrkdwn


@pytest.mark.parametrize(
    ("markdown", "mrkdwn"),
    [
        ("**bold**, *italic*, _also_, ~~gone~~", "*bold*, _italic_, _also_, ~gone~"),
        ("# Title\n\ntext", "*Title*\n\ntext"),
        ("# **Bold** title", "*Bold title*"),
        ("- one\n- two\n  - nested", "• one\n• two\n    • nested"),
        ("3. three\n4. four", "3. three\n4. four"),
        ("> quoted\n> twice", "> quoted\n> twice"),
        ("[docs](https://x.test/a?b=1&c=2)", "<https://x.test/a?b=1&amp;c=2|docs>"),
        ("[relative](/path) and <https://auto.test>", "relative and <https://auto.test>"),
        ("a < b & c > d", "a &lt; b &amp; c &gt; d"),
        ("3 * 4 * 5", "3 * 4 * 5"),
    ],
)
def test_markdown_renders_as_mrkdwn(markdown, mrkdwn):
    assert to_mrkdwn(markdown) == mrkdwn


def test_code_is_left_alone_except_for_slacks_escapes():
    markdown = "Run `a*b*c`:\n\n```python\nif x < 1 and **kw:\n    pass\n```"
    assert to_mrkdwn(markdown) == "Run `a*b*c`:\n\n```\nif x &lt; 1 and **kw:\n    pass\n```"


def test_korean_styles_get_a_zero_width_space_where_slack_needs_a_boundary():
    assert to_mrkdwn("**주문번호**를 알려주세요") == f"*주문번호*{ZWSP}를 알려주세요"
    assert to_mrkdwn("배송은**빠르게**진행") == f"배송은{ZWSP}*빠르게*{ZWSP}진행"
    # Spaces and punctuation already are boundaries: nothing is added.
    assert to_mrkdwn("이것은 **굵은** 글씨, *기울임*.") == "이것은 *굵은* 글씨, _기울임_."


def test_model_output_cannot_mention_or_broadcast():
    assert to_mrkdwn("<!channel> hi <@U123>") == "&lt;!channel&gt; hi &lt;@U123&gt;"


def test_streamed_markdown_is_defused_without_breaking_prefixes():
    assert defuse("hi <!channel> and <@U1>, a<b") == f"hi <{ZWSP}!channel> and <{ZWSP}@U1>, a<b"
    assert defuse(defuse("<!here>")) == defuse("<!here>")
    assert defuse("text <!here>").startswith(defuse("text <"))
