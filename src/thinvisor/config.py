"""The host's configuration: one TOML file, ``/etc/thinvisor/host.toml`` by default.

``THINVISOR_CONFIG`` (or the CLI's ``--config``) names another file. A missing default
file means the defaults below, so a fresh host works with no configuration at all.

Datastores come from two places: host.toml's ``[[datastores]]`` (``HostConfig.datastores``,
fixed while the agent runs) and those added at runtime, kept in
``<state_dir>/datastores.toml`` (see ``thinvisor.storage.registry``). ``all_datastores()``
is both, host.toml's first; ``datastore(name)`` looks a name up in both. The added ones
are read from their file on every call, so every process of the host (the agent, a local
CLI command) sees a datastore as soon as it was added.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, ValidationError, field_validator

from thinvisor.errors import InvalidConfig, NotFound
from thinvisor.model.base import StrictModel
from thinvisor.model.vm import check_name, invalid_argument

DEFAULT_CONFIG = Path("/etc/thinvisor/host.toml")
CONFIG_ENV = "THINVISOR_CONFIG"
# The datastores added at runtime, in the state directory.
ADDED_DATASTORES = "datastores.toml"

ConfigT = TypeVar("ConfigT", bound=StrictModel)

Accel = Literal["auto", "kvm", "tcg"]


class DatastoreConfig(StrictModel):
    name: str
    path: Path

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError("must be an absolute path")
        return value


class AddedDatastores(StrictModel):
    """What ``<state_dir>/datastores.toml`` holds: the datastores added at runtime."""

    datastores: list[DatastoreConfig] = Field(default_factory=list)


def load_added_datastores(path: Path) -> list[DatastoreConfig]:
    """The datastores recorded in ``path``; none when it does not exist yet."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidConfig(f"{path}: {exc}") from exc
    try:
        return AddedDatastores.model_validate(data).datastores
    except ValidationError as exc:
        raise InvalidConfig(f"{path}: {invalid_argument(exc)}") from None


def _default_datastores() -> list[DatastoreConfig]:
    return [DatastoreConfig(name="local", path=Path("/var/lib/thinvisor/datastores/local"))]


class ApiConfig(StrictModel):
    """The host agent's REST API (``thinvisor host serve``)."""

    listen: str = "0.0.0.0"
    port: int = Field(default=8443, ge=1, le=65535)
    tls: bool = True
    # The operator's own certificate and key; a self-signed pair is made on first start.
    cert_file: Path | None = None
    key_file: Path | None = None
    upload_max_bytes: int = Field(default=64 << 30, gt=0)


class CimConfig(StrictModel):
    """The host agent's CIM-XML (WBEM) server: ``/cimom``, HTTPS, Basic authentication."""

    enabled: bool = True
    port: int = Field(default=5989, ge=1, le=65535)
    # Plain HTTP (the WBEM port 5988) only when an operator asks for it.
    http_port: int | None = Field(default=None, ge=1, le=65535)


class NetworkHostConfig(StrictModel):
    """Where the VMs' networking lives."""

    # A network namespace (a name under /run/netns, or a path such as /proc/PID/ns/net)
    # in which switches, TAPs, dnsmasq and QEMU run, while the agent's API stays
    # reachable in the namespace it was started in. Unset: the host's own namespace.
    namespace: str | None = None


class MemoryConfig(StrictModel):
    """Memory overcommit: page sharing (KSM) and the balloon policy (``thinvisor.host.memory``)."""

    # Turn KSM on at agent start, scanning pages_to_scan pages every sleep_millisecs ms
    # (the kernel's defaults: 100 every 20 ms). What was there is remembered, to restore.
    ksm: bool = True
    ksm_pages_to_scan: int = Field(default=100, ge=1, le=100_000)
    ksm_sleep_millisecs: int = Field(default=20, ge=1, le=60_000)
    # Balloons take memory back from VMs once the host's available memory falls below
    # this; unset, 6 % of the host's memory (about where ESXi starts ballooning).
    low_water_mib: int | None = Field(default=None, ge=0)
    # At most this part of a VM's memory is taken back (ESXi's Mem.CtlMaxPercent).
    balloon_max_percent: int = Field(default=65, ge=0, le=100)
    rebalance_interval_s: float = Field(default=10.0, gt=0)

    def low_water(self, host_total_mib: int) -> int:
        """The low-water mark in MiB on a host with ``host_total_mib`` of memory."""
        return self.low_water_mib if self.low_water_mib is not None else host_total_mib * 6 // 100


class IsolationConfig(StrictModel):
    """How each VM's QEMU is locked down (``thinvisor.host.isolation``)."""

    # Off: QEMU runs as root and sees the whole host (for debugging only).
    enabled: bool = True
    # The unprivileged system user (and group) QEMU runs as; made when missing.
    user: str = "thinvisor-qemu"
    # Each VM's QEMU its own uid from uid_base up (the user's group kept): one VM's
    # QEMU can then neither signal, trace nor read another's.
    per_vm_users: bool = False
    uid_base: int = Field(default=1_900_000, ge=1000, le=2**31 - 70_000)
    # QEMU in a mount namespace where only the VM's own files exist.
    mount_namespace: bool = True


class StatsConfig(StrictModel):
    """Performance statistics (``thinvisor.host.stats``)."""

    # Seconds between two samples (vCenter's real-time charts: 20).
    interval_s: float = Field(default=20.0, gt=0, le=300)


class MigrationConfig(StrictModel):
    """Live migration's own listener (``thinvisor.host.migration``): TLS with the agent's
    certificate, one-time tokens that the center hands out."""

    # None: the API's listen address.
    listen: str | None = None
    # vMotion's port; 0: any free one (each incoming migration says which).
    port: int = Field(default=8000, ge=0, le=65535)


class ReservationConfig(StrictModel):
    """What the host keeps for itself: VMs' reservations share the rest (admission control)."""

    host_cpu_mhz: int = Field(default=0, ge=0)
    host_memory_mib: int = Field(default=1024, ge=0)


class HaConfig(StrictModel):
    """High availability's host side (``thinvisor.host.ha``): this host's heartbeat on
    every datastore, which the center and the other hosts read to tell whether it lives."""

    # Seconds between two heartbeat writes; a write taking longer counts as failed.
    heartbeat_interval_s: float = Field(default=1.0, ge=0.1, le=60)


class HostConfig(StrictModel):
    """Where things live and how VMs are run on this host."""

    accel: Accel = "auto"
    qemu_binary: str = "qemu-system-x86_64"
    qemu_img_binary: str = "qemu-img"
    run_dir: Path = Path("/run/thinvisor")
    cache_dir: Path = Path("/var/cache/thinvisor")
    # The agent's own state: users and tokens, the event log, its TLS certificate.
    state_dir: Path = Path("/var/lib/thinvisor")
    datastores: list[DatastoreConfig] = Field(default_factory=_default_datastores)
    shutdown_timeout_s: float = Field(default=60.0, gt=0)
    # Autostart: seconds between one VM's start and the next, as ESXi's startDelay.
    autostart_delay_s: float = Field(default=10.0, ge=0)
    api: ApiConfig = Field(default_factory=ApiConfig)
    cim: CimConfig = Field(default_factory=CimConfig)
    network: NetworkHostConfig = Field(default_factory=NetworkHostConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    reservations: ReservationConfig = Field(default_factory=ReservationConfig)
    stats: StatsConfig = Field(default_factory=StatsConfig)
    isolation: IsolationConfig = Field(default_factory=IsolationConfig)
    migration: MigrationConfig = Field(default_factory=MigrationConfig)
    ha: HaConfig = Field(default_factory=HaConfig)

    @field_validator("datastores")
    @classmethod
    def _datastores(cls, value: list[DatastoreConfig]) -> list[DatastoreConfig]:
        if not value:
            raise ValueError("at least one datastore is needed")
        names = [d.name for d in value]
        if len(set(names)) != len(names):
            raise ValueError("datastore names must be unique")
        return value

    @property
    def default_datastore(self) -> DatastoreConfig:
        return self.datastores[0]

    @property
    def added_datastores_file(self) -> Path:
        return self.state_dir / ADDED_DATASTORES

    def added_datastores(self) -> list[DatastoreConfig]:
        """The datastores added at runtime (read from their file now), less any whose
        name host.toml has taken since."""
        taken = {d.name for d in self.datastores}
        return [d for d in load_added_datastores(self.added_datastores_file) if d.name not in taken]

    def all_datastores(self) -> list[DatastoreConfig]:
        """host.toml's datastores, then the added ones."""
        return [*self.datastores, *self.added_datastores()]

    def datastore(self, name: str | None) -> DatastoreConfig:
        """A datastore of either kind by name; the default one (host.toml's first) for None."""
        if name is None:
            return self.default_datastore
        for ds in self.all_datastores():
            if ds.name == name:
                return ds
        raise NotFound(f"datastore {name!r} does not exist")


def config_path(explicit: Path | None = None) -> Path:
    """The host configuration's file: ``explicit``, else ``$THINVISOR_CONFIG``, else the
    default."""
    return config_file(explicit, CONFIG_ENV, DEFAULT_CONFIG)


def load_config(explicit: Path | None = None) -> HostConfig:
    """Read the host configuration; defaults when the default file does not exist."""
    return load_toml_config(HostConfig, config_path(explicit), DEFAULT_CONFIG)


def config_file(explicit: Path | None, env: str, default: Path) -> Path:
    """A configuration file: ``explicit``, else the one the variable ``env`` names, else
    ``default``."""
    if explicit is not None:
        return explicit
    named = os.environ.get(env)
    return Path(named) if named else default


def load_toml_config(model: type[ConfigT], path: Path, default: Path) -> ConfigT:
    """The ``model`` a TOML file holds; the model's defaults when ``path`` is the
    ``default`` file and it does not exist."""
    if not path.exists():
        if path == default:
            return model()
        raise InvalidConfig(f"config: {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidConfig(f"config: cannot read {path}: {exc}") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidConfig(f"config: {path}: {invalid_argument(exc)}") from None
