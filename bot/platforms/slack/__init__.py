"""Slack: bolt app and transport (app), events and /llm-settings (events), the answer's sink
(sink), Markdown → mrkdwn (mrkdwn). Each only translates between Slack and the front door."""
