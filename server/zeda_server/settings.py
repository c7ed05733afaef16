"""Server settings: defaults < YAML file (``ZEDA_CONFIG_FILE``) < ``ZEDA_*`` environment < CLI flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from zeda_core.routing import ZERO_EXPERT_BIAS_LIMIT
from zeda_server.compute_dial import parse_tiers

DEFAULT_MODEL = "models/tiny-zeda"


class ServerSettings(BaseSettings):
    """Everything ``zeda serve`` can be told. CLI flags arrive as init arguments (highest priority)."""

    model_config = SettingsConfigDict(env_prefix="ZEDA_", extra="forbid")

    model: str = DEFAULT_MODEL
    served_model_name: str | None = None
    backend: Literal["torch", "sglang"] = "torch"
    device: str = "cpu"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    moe_backend: Literal["auto", "torch", "triton"] = "auto"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_key: SecretStr | None = None
    admin_key: SecretStr | None = None
    max_batch: int = Field(default=32, ge=1)
    max_queue: int = Field(default=256, ge=1)
    max_tokens_cap: int = Field(default=1024, ge=1)
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    max_total_tokens: int | None = Field(default=None, ge=1)
    shutdown_timeout: float = Field(default=30.0, ge=0)
    request_timeout: float | None = Field(default=None, gt=0)
    tp_size: int = Field(default=1, ge=1)
    sglang_args: list[str] = []
    cors_origins: list[str] = []
    trust_remote_code: bool = False
    capture_db: Path | None = None
    capture_completions: bool = False
    capture_max_rows: int = Field(default=100_000, ge=1)
    capture_max_age_days: float = Field(default=30.0, gt=0)
    capture_max_mb: int = Field(default=1024, ge=1)
    compute_tiers: str = ""
    target_zero_expert_ratio: float | None = Field(default=None, ge=0.0, le=1.0)
    adaptive_compute: Literal["off", "queue"] = "off"
    adaptive_queue_depth: int = Field(default=8, ge=1)
    adaptive_max_offset: float = Field(default=1.0, gt=0.0, le=ZERO_EXPERT_BIAS_LIMIT)
    zero_ratio_window_tokens: int = Field(default=2048, ge=16)

    @field_validator("compute_tiers")
    @classmethod
    def _tiers_parse(cls, value: str) -> str:
        parse_tiers(value)
        return value

    @property
    def tiers(self) -> dict[str, float]:
        """Named request offsets (``compute_tier``), logits."""
        return parse_tiers(self.compute_tiers)

    @field_validator("served_model_name", "api_key", "admin_key", "capture_db", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """``ZEDA_API_KEY=`` (as compose files pass unset variables) means no key, not the empty key."""
        return None if isinstance(value, str) and not value.strip() else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        config_file = os.environ.get("ZEDA_CONFIG_FILE")
        if config_file:
            sources += (YamlConfigSettingsSource(settings_cls, yaml_file=Path(config_file)),)
        return sources

    @property
    def model_name(self) -> str:
        """The id clients send as ``model`` (the checkpoint's directory name by default)."""
        return self.served_model_name or Path(self.model.rstrip("/")).name
