"""The host's virtual switches on disk: ``<state_dir>/network.toml``.

Every change is validated as a whole and written atomically; a refused change leaves
the file as it was. The store knows nothing about netlink: it records what should exist.
"""

from __future__ import annotations

import threading
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from thinvisor.errors import AlreadyExists, InvalidArgument, InvalidConfig, NotFound
from thinvisor.fs import atomic_write
from thinvisor.model.vm import validate
from thinvisor.network.model import NetworkConfig, PortGroupSpec, SwitchSpec


class NetworkStore:
    """Load and change the switch configuration kept in one TOML file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def load(self) -> NetworkConfig:
        """The stored configuration; empty when the file does not exist yet."""
        try:
            data = tomllib.loads(self.path.read_text())
        except FileNotFoundError:
            return NetworkConfig()
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise InvalidConfig(f"{self.path}: {exc}") from exc
        try:
            return validate(NetworkConfig, data)
        except InvalidArgument as exc:
            raise InvalidConfig(f"{self.path}: {exc}") from exc

    def save(self, config: NetworkConfig) -> None:
        """Write ``config`` atomically (temporary file, fsync, rename)."""
        data = config.model_dump(mode="json", exclude_none=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, tomli_w.dumps(data))

    def switches(self) -> list[SwitchSpec]:
        return self.load().switches

    def get(self, name: str) -> SwitchSpec:
        """The switch called ``name``; ``NotFound`` when there is none."""
        switch = self.load().switch(name)
        if switch is None:
            raise NotFound(f"switch {name!r} not found")
        return switch

    def add_switch(self, spec: SwitchSpec | dict[str, Any]) -> SwitchSpec:
        """Record a new switch; refuse a taken name, bridge or uplink."""
        with self._lock:
            config = self.load()
            new = spec if isinstance(spec, SwitchSpec) else validate(SwitchSpec, spec)
            if config.switch(new.name) is not None:
                raise AlreadyExists(f"switch {new.name!r} already exists")
            raw = config.model_dump(mode="json")
            raw["switches"].append(new.model_dump(mode="json"))
            self.save(validate(NetworkConfig, raw))
            return new

    @staticmethod
    def check_new_switch(config: NetworkConfig, spec: SwitchSpec) -> None:
        """Refuse ``spec`` if adding it to ``config`` would break a host-wide rule
        (unique bridges, uplinks and port group names), without saving anything."""
        taken = [g.name for g in spec.port_groups if config.port_group(g.name) is not None]
        if taken:
            raise AlreadyExists(f"port group {taken[0]!r} already exists on this host")
        raw = config.model_dump(mode="json")
        raw["switches"].append(spec.model_dump(mode="json"))
        validate(NetworkConfig, raw)

    def set_port_group_vlan(self, name: str, vlan: int) -> PortGroupSpec:
        """Change the VLAN id of the port group ``name``."""
        with self._lock:
            config = self.load()
            found = config.port_group(name)
            if found is None:
                raise NotFound(f"port group {name!r} not found")
            switch, group = found
            raw = switch.model_dump(mode="json")
            raw["port_groups"] = [
                {**g, "vlan": vlan} if g["name"] == name else g for g in raw["port_groups"]
            ]
            updated = validate(SwitchSpec, raw)
            config.switches = [updated if s.name == switch.name else s for s in config.switches]
            self.save(config)
            return updated.port_group(name) or group

    def remove_switch(self, name: str) -> SwitchSpec:
        """Forget a switch. Whether ports still use it is the caller's check."""
        with self._lock:
            config = self.load()
            switch = config.switch(name)
            if switch is None:
                raise NotFound(f"switch {name!r} not found")
            config.switches = [s for s in config.switches if s.name != name]
            self.save(config)
            return switch

    def add_port_group(self, switch: str, group: PortGroupSpec | dict[str, Any]) -> PortGroupSpec:
        """Add a port group to ``switch``; refuse a name the switch already has."""
        with self._lock:
            config = self.load()
            spec = self._switch(config, switch)
            new = group if isinstance(group, PortGroupSpec) else validate(PortGroupSpec, group)
            taken = config.port_group(new.name)
            if taken is not None:
                raise AlreadyExists(f"port group {new.name!r} already exists on {taken[0].name!r}")
            raw = spec.model_dump(mode="json")
            raw["port_groups"].append(new.model_dump(mode="json"))
            updated = validate(SwitchSpec, raw)
            config.switches = [updated if s.name == switch else s for s in config.switches]
            self.save(config)
            return new

    def remove_port_group(self, switch: str, name: str) -> PortGroupSpec:
        """Remove a port group. Whether NICs still use it is the caller's check."""
        with self._lock:
            config = self.load()
            spec = self._switch(config, switch)
            group = spec.port_group(name)
            if group is None:
                raise NotFound(f"port group {name!r} not found on switch {switch!r}")
            spec.port_groups = [p for p in spec.port_groups if p.name != name]
            self.save(config)
            return group

    @staticmethod
    def _switch(config: NetworkConfig, name: str) -> SwitchSpec:
        switch = config.switch(name)
        if switch is None:
            raise NotFound(f"switch {name!r} not found")
        return switch
