"""Node settings: one typed object, read from AGORA_* environment variables; CLI flags override."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from agoranet.core.identity import KEY_FILE


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AGORA_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".agora")
    log_json: bool = False
    # A kubo (IPFS) daemon's RPC address, e.g. http://127.0.0.1:5001: blocks are also put to and read from it.
    kubo_rpc: str | None = None
    # The go-libp2p daemon for --discovery libp2p; default: the one in an installed hivemind wheel, or on PATH.
    p2pd: Path | None = None

    @property
    def key_path(self) -> Path:
        return self.home / KEY_FILE
