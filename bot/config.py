"""Settings: the one place that reads the environment (and `.env`).

Every variable of the contract in ../shared/DESIGN.md is a field here. A few extensions (marked
"extension") add knobs the contract leaves open, such as the operator maximum for max_new_tokens.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from bot.sampling import SPECS, SamplingSettings, check_collection

DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly, concise support assistant for this team. Answer from what you know, "
    "say so when you are not sure, and suggest who or what could help next."
)
DEFAULT_MODEL = "LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct"

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class ConfigError(Exception):
    """An invalid or missing setting; str() is one line naming the variable, never a secret."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        validate_default=True,
        env_ignore_empty=True,  # `FOO=` in .env means unset, not an empty value
    )

    # Storage
    redis_url: SecretStr | None = None  # may embed a password
    data_dir: Path = Path("./data")

    # Local model
    llm_model: str = DEFAULT_MODEL
    llm_device: str = "auto"
    llm_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    llm_base_url: str | None = None
    llm_api_key: SecretStr | None = None  # extension: key for LLM_BASE_URL, if it needs one
    llm_trust_remote_code: bool = False
    llm_context_tokens: int | None = Field(default=None, ge=256)  # extension: override context
    llm_timeout_seconds: float = Field(default=60.0, gt=0)  # extension: wait for first text
    # extension: "batching" serves every channel at once; "simple" is one at a time (debugging)
    llm_engine: Literal["batching", "simple"] = "batching"
    # extension: the batching engine's attention on a GPU (bot/llm/attention.py): auto = flash
    # when installed or pre-fetched, flash = may also fetch the kernel from the Hub, sdpa = never
    llm_attention: Literal["auto", "flash", "sdpa"] = "auto"
    llm_max_queue: int = Field(default=64, ge=1)  # extension: questions in the engine at once
    # extension: a question past LLM_MAX_QUEUE goes to GPT ("gpt") or is told to wait ("tell")
    llm_overflow: Literal["gpt", "tell"] = "gpt"

    # GPT fallback
    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    openai_model: str = "gpt-4o-mini"
    openai_context_tokens: int = Field(default=128_000, ge=256)  # extension
    openai_timeout_seconds: float = Field(default=60.0, gt=0)  # extension
    openai_max_retries: int = Field(default=2, ge=0, le=10)  # extension

    # Conversation
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    # The sampling defaults: defaults and ranges from the one table, bot.sampling.SPECS.
    llm_temperature: float = float(SPECS["temperature"].default)
    llm_top_k: int = int(SPECS["top_k"].default)
    llm_top_p: float = float(SPECS["top_p"].default)
    llm_max_new_tokens: int = int(SPECS["max_new_tokens"].default)
    llm_max_new_tokens_limit: int = Field(default=4096, ge=1)  # extension: operator maximum
    llm_do_sample: bool = bool(SPECS["do_sample"].default)
    history_max_messages: int = Field(default=40, ge=2, le=1000)
    history_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=60)
    history_scope: Literal["channel", "thread"] = "channel"
    # extension: days answers, votes and question counts are kept for `supportbot report`
    report_retention_days: int = Field(default=30, ge=1, le=3650)

    # Slack
    slack_bot_token: SecretStr | None = None
    slack_signing_secret: SecretStr | None = None
    slack_app_token: SecretStr | None = None
    slack_api_url: str = "https://slack.com/api/"
    slack_settings_admins: str | None = None  # comma/space separated user ids
    slack_handoff_to: str | None = None  # user ids (U…) and/or user-group ids (S…), comma separated

    # Discord
    discord_token: SecretStr | None = None
    discord_settings_role: str | None = None
    discord_handoff_role: str | None = None  # the role (id) mentioned by a hand-off
    discord_guild_id: int | None = None
    discord_shard_count: int | None = Field(default=None, ge=1)
    discord_shard_ids: str | None = None  # comma separated

    # Knowledge base
    kb_embed_model: str = "intfloat/multilingual-e5-small"
    kb_mode: Literal["off", "prefer", "strict"] = "prefer"
    kb_collection: str = "default"
    kb_top_k: int = Field(default=4, ge=1, le=50)
    # extension: cosine similarity from which a passage is relevant (unset: by model family)
    kb_min_similarity: float | None = Field(default=None, ge=-1, le=1)

    # Operations
    log_format: Literal["text", "json"] = "text"
    port: int = Field(default=3000, ge=1, le=65535)
    # extension: on SIGTERM, how long answers in progress may finish before they are cut (with a
    # notice to the user); the deploy files stop the process only after this and some margin
    shutdown_grace_seconds: float = Field(default=20.0, gt=0, le=600)
    # extension: an event's claim is a lease this long, renewed every third of it while the answer
    # is produced; when a replica dies mid-answer, another answers the event's next delivery
    # once it has run out (Slack re-delivers after about 1 min and 5 min)
    event_lease_seconds: float = Field(default=30.0, ge=1, le=300)

    @field_validator("llm_temperature", "llm_top_k", "llm_top_p", "llm_do_sample")
    @classmethod
    def _sampling(cls, value: float | bool, info: ValidationInfo) -> float | bool:
        spec = SPECS[str(info.field_name).removeprefix("llm_")]
        if not spec.accepts(value, limit=0):  # these keys' ranges do not depend on the limit
            raise ValueError(f"must be {spec.valid_range(0)}")
        return value

    @field_validator("llm_device")
    @classmethod
    def _device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE.match(value):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("llm_model", "openai_model")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("llm_base_url", "openai_base_url", "slack_api_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.strip()

    @field_validator("system_prompt")
    @classmethod
    def _persona(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("kb_collection")
    @classmethod
    def _collection(cls, value: str) -> str:
        return check_collection(value.strip())

    @field_validator("kb_embed_model")
    @classmethod
    def _embed_model(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a model id, a local directory, or none")
        return value.strip()

    @field_validator("discord_shard_ids")
    @classmethod
    def _shard_ids(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", value):
            raise ValueError("must be comma-separated shard numbers, e.g. 0,1")
        return value

    @model_validator(mode="after")
    def _max_new_tokens_within_limit(self) -> Settings:
        if self.llm_max_new_tokens < 1:
            raise ValueError("LLM_MAX_NEW_TOKENS must be at least 1")
        if self.llm_max_new_tokens > self.llm_max_new_tokens_limit:
            raise ValueError(
                f"LLM_MAX_NEW_TOKENS ({self.llm_max_new_tokens}) must not exceed "
                f"LLM_MAX_NEW_TOKENS_LIMIT ({self.llm_max_new_tokens_limit})"
            )
        return self

    # Derived values -------------------------------------------------------------------------

    @property
    def local_model_enabled(self) -> bool:
        return self.llm_model.lower() != "none"

    @property
    def kb_embed_enabled(self) -> bool:
        return self.kb_embed_model.lower() != "none"

    @property
    def default_sampling(self) -> SamplingSettings:
        return SamplingSettings(
            temperature=self.llm_temperature,
            top_k=self.llm_top_k,
            top_p=self.llm_top_p,
            max_new_tokens=self.llm_max_new_tokens,
            do_sample=self.llm_do_sample,
        )

    def secret_values(self) -> list[str]:
        """Every secret's value, for the log redaction filter: each SecretStr setting, and the
        password inside REDIS_URL on its own (it may be logged apart from the URL)."""
        values = [getattr(self, name) for name in type(self).model_fields]
        secrets = [v.get_secret_value() for v in values if isinstance(v, SecretStr)]
        if self.redis_url is not None:
            with contextlib.suppress(ValueError):  # an unparsable URL has no password to find
                password = urlsplit(self.redis_url.get_secret_value()).password
                if password:
                    secrets += [password, unquote(password)]
        return [s for s in secrets if s]

    @property
    def slack_handoff_ids(self) -> tuple[str, ...]:
        raw = self.slack_handoff_to or ""
        return tuple(part for part in re.split(r"[\s,]+", raw) if part)

    @property
    def slack_admin_ids(self) -> frozenset[str]:
        raw = self.slack_settings_admins or ""
        return frozenset(part for part in re.split(r"[\s,]+", raw) if part)


def load_settings(**overrides: object) -> Settings:
    """Read the environment; raise ConfigError with one line naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    # Only the first problem, as one line; pydantic's own text would echo the input value,
    # which may be a secret.
    error = exc.errors(include_input=False, include_url=False)[0]
    field = str(error["loc"][0]).upper() if error["loc"] else ""
    message = str(error["msg"]).removeprefix("Value error, ")
    if not field:
        return f"invalid configuration: {message}"
    return f"invalid configuration: {field}: {message}"
