"""Discord: the client (client), the /llm-settings application command (command), the answer's
sink (sink). Each only translates between Discord and the front door."""

from bot.platforms.discord.client import SupportBot, build_client, shard_config

__all__ = ["SupportBot", "build_client", "shard_config"]
