"""Discord: the client (client), the /llm-settings application command (command), the answer's
sink (sink). Each only translates between Discord and the front door."""
