"""deploy/slack-app-manifest.yml stays in step with what the app listens to."""

from __future__ import annotations

import yaml  # type: ignore[import-untyped]  # comes with transformers; no stubs

from bot.platforms.slack.app import EVENTS_PATH
from bot.sampling import COMMAND
from tests.conftest import repo_root


def test_manifest_subscribes_to_what_the_app_handles_with_the_scopes_it_needs():
    manifest = yaml.safe_load((repo_root() / "deploy" / "slack-app-manifest.yml").read_text())
    events = set(manifest["settings"]["event_subscriptions"]["bot_events"])
    assert events == {"app_mention", "message.im", "message.channels", "message.groups",
                      "message.mpim"}  # fmt: skip
    scopes = set(manifest["oauth_config"]["scopes"]["bot"])
    assert {"app_mentions:read", "chat:write", "commands", "im:history"} <= scopes
    assert {"channels:history", "groups:history", "mpim:history"} <= scopes
    [command] = manifest["features"]["slash_commands"]
    assert command["command"] == COMMAND
    urls = [
        command["url"],
        manifest["settings"]["event_subscriptions"]["request_url"],
        manifest["settings"]["interactivity"]["request_url"],
    ]
    assert all(url.endswith(EVENTS_PATH) for url in urls)
