"""The center's configuration: ``/etc/thinvisor/center.toml``.

``THINVISOR_CENTER_CONFIG`` (or the CLI's ``--config``) names another file. A missing
default file means the defaults below: a center answers on port 9443 with its inventory in
SQLite under its state directory, with nothing to install.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from thinvisor.config import config_file, load_toml_config
from thinvisor.model.base import StrictModel

DEFAULT_CENTER_CONFIG = Path("/etc/thinvisor/center.toml")
CENTER_CONFIG_ENV = "THINVISOR_CENTER_CONFIG"


class CenterApiConfig(StrictModel):
    """The center's REST API (``thinvisor center serve``)."""

    listen: str = "0.0.0.0"
    port: int = Field(default=9443, ge=1, le=65535)
    tls: bool = True
    # The operator's own certificate and key; a self-signed pair is made on first start.
    cert_file: Path | None = None
    key_file: Path | None = None


class DatabaseConfig(StrictModel):
    # A SQLAlchemy URL: ``postgresql://user:password@db/thinvisor`` for production.
    # Unset: SQLite in the state directory (``inventory.db``).
    url: str | None = None


class SyncConfig(StrictModel):
    """How the center follows its hosts (``thinvisor.center.sync``)."""

    # A full inventory snapshot of every host this often, besides its events.
    refresh_interval_s: float = Field(default=60.0, gt=0)
    # Each host is asked whether it answers this often; one that does not within
    # ping_timeout_s is marked disconnected (its VMs unknown, nothing deleted).
    ping_interval_s: float = Field(default=5.0, gt=0)
    ping_timeout_s: float = Field(default=5.0, gt=0)
    # A disconnected host is tried again after 1 s, then twice as long each time up to this.
    reconnect_max_s: float = Field(default=10.0, gt=0)


class HaConfig(StrictModel):
    """How the center watches the hosts of clusters with HA (``thinvisor.center.ha``)."""

    # Each host of such a cluster gets the center's heartbeat this often, and failed
    # hosts are looked for as often.
    check_interval_s: float = Field(default=1.0, gt=0, le=60)
    # A heartbeat that gets no answer within this counts as not heard.
    heartbeat_timeout_s: float = Field(default=5.0, gt=0)


class CenterConfig(StrictModel):
    # The center's own state: users and tokens, events, TLS, the secrets key, SQLite.
    state_dir: Path = Path("/var/lib/thinvisor-center")
    api: CenterApiConfig = Field(default_factory=CenterApiConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    ha: HaConfig = Field(default_factory=HaConfig)

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.state_dir / 'inventory.db'}"


def center_config_path(explicit: Path | None = None) -> Path:
    """The center configuration's file: ``explicit``, else ``$THINVISOR_CENTER_CONFIG``,
    else the default."""
    return config_file(explicit, CENTER_CONFIG_ENV, DEFAULT_CENTER_CONFIG)


def load_center_config(explicit: Path | None = None) -> CenterConfig:
    """Read the center's configuration; defaults when the default file does not exist."""
    return load_toml_config(CenterConfig, center_config_path(explicit), DEFAULT_CENTER_CONFIG)
