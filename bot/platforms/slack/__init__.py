"""Slack: bolt app and transport (app), events and /llm-settings (events), the answer's sink
(sink), Markdown → mrkdwn (mrkdwn). Each only translates between Slack and the front door."""

from bot.platforms.slack.app import (
    DEFAULT_API_URL,
    EVENTS_PATH,
    SlackApp,
    StartError,
    check_app_token,
    check_credentials,
    identify,
    web_client,
)

__all__ = [
    "DEFAULT_API_URL",
    "EVENTS_PATH",
    "SlackApp",
    "StartError",
    "check_app_token",
    "check_credentials",
    "identify",
    "web_client",
]
