"""The host's hardware in root/cimv2: CPU (DSP1022), System Memory (DSP1026), Sensors
(DSP1009), Fan (DSP1013) and Power Supply (DSP1015) profiles.

What the host has is read from ``/proc`` and ``/sys`` (both roots injectable, so tests
use a fake tree): processors from ``/proc/cpuinfo``, memory from ``/proc/meminfo``,
temperature and fan sensors from ``/sys/class/hwmon`` and ``/sys/class/thermal``, fans
from hwmon and power supplies from ``/sys/class/power_supply``. Every device is part of
the host (``TV_SystemDevice``); a fan's tachometer is associated with its fan
(``TV_AssociatedSensor``).
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pywbem import CIMInstance, CIMInstanceName

from thinvisor.cim.provider import CIMV2, CimContext, InstanceProvider
from thinvisor.cim.providers.base import (
    HOST_CLASS,
    FunctionProvider,
    host_name,
    host_path,
    make_instance,
)

PROCESSOR = "TV_Processor"
MEMORY = "TV_Memory"
SENSOR = "TV_NumericSensor"
FAN = "TV_Fan"
POWER_SUPPLY = "TV_PowerSupply"

# CIM value maps used below.
_ENABLED, _OK_HEALTH, _OK_STATUS = 2, 5, 2
_DEGRADED, _CRITICAL = 10, 25
_TEMPERATURE, _TACHOMETER = 2, 5  # SensorType
_DEGREES_C, _RPM = 2, 19  # BaseUnits
_PAGE = 4096


@dataclass(frozen=True)
class Cpu:
    index: int
    model: str
    mhz: int | None
    max_mhz: int | None


@dataclass(frozen=True)
class Sensor:
    """A numeric reading in ``unit_modifier`` powers of ten of its base unit."""

    device_id: str
    label: str
    kind: int  # SensorType
    reading: int
    unit_modifier: int
    critical: int | None = None
    maximum: int | None = None
    fan: str | None = None  # the DeviceID of the fan a tachometer measures

    @property
    def health(self) -> int:
        if self.critical is not None and self.reading >= self.critical:
            return _CRITICAL
        if self.maximum is not None and self.reading >= self.maximum:
            return _DEGRADED
        return _OK_HEALTH


@dataclass(frozen=True)
class PowerSupply:
    device_id: str
    label: str
    online: bool | None


@dataclass(frozen=True)
class Hardware:
    """What the host has, as of one scan."""

    cpus: list[Cpu]
    memory_bytes: int
    sensors: list[Sensor] = field(default_factory=list)
    fans: list[Sensor] = field(default_factory=list)  # a fan, known by its tachometer
    power_supplies: list[PowerSupply] = field(default_factory=list)


def scan(sys_root: Path = Path("/sys"), proc_root: Path = Path("/proc")) -> Hardware:
    """Read the host's hardware from ``proc_root`` and ``sys_root``."""
    sensors = [*_hwmon_sensors(sys_root), *_thermal_sensors(sys_root)]
    return Hardware(
        cpus=_cpus(proc_root, sys_root),
        memory_bytes=_memory_bytes(proc_root),
        sensors=sensors,
        fans=[s for s in sensors if s.fan is not None],
        power_supplies=_power_supplies(sys_root),
    )


# Reading /proc and /sys


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


def _cpus(proc_root: Path, sys_root: Path) -> list[Cpu]:
    blocks = [b for b in (_read(proc_root / "cpuinfo") or "").split("\n\n") if b.strip()]
    cpus: list[Cpu] = []
    for block in blocks:
        info = dict(_field(line) for line in block.splitlines() if ":" in line)
        if "processor" not in info or not info["processor"].isdigit():
            continue
        index = int(info["processor"])
        model = info.get("model name") or info.get("cpu model") or info.get("uarch") or "CPU"
        mhz = _float_int(info.get("cpu MHz"))
        cpus.append(Cpu(index, model, mhz, _max_mhz(sys_root, index, model) or mhz))
    if not cpus:  # no /proc/cpuinfo: count them at least
        cpus = [Cpu(i, "CPU", None, None) for i in range(os.cpu_count() or 1)]
    return cpus


def _field(line: str) -> tuple[str, str]:
    key, _, value = line.partition(":")
    return key.strip(), value.strip()


def _float_int(text: str | None) -> int | None:
    try:
        return None if text is None else round(float(text))
    except ValueError:
        return None


def _max_mhz(sys_root: Path, index: int, model: str) -> int | None:
    khz = _read_int(sys_root / f"devices/system/cpu/cpu{index}/cpufreq/cpuinfo_max_freq")
    if khz:
        return khz // 1000
    m = re.search(r"@ *(\d+(?:\.\d+)?) *GHz", model)
    return round(float(m.group(1)) * 1000) if m else None


def _memory_bytes(proc_root: Path) -> int:
    for line in (_read(proc_root / "meminfo") or "").splitlines():
        key, value = _field(line)
        if key == "MemTotal" and value.split()[0].isdigit():
            return int(value.split()[0]) * 1024
    return 0


def _hwmon_sensors(sys_root: Path) -> list[Sensor]:
    found: list[Sensor] = []
    for chip in sorted((sys_root / "class/hwmon").glob("hwmon*")):
        chip_name = _read(chip / "name") or chip.name
        for path in sorted(chip.glob("*_input"), key=_natural):
            m = re.fullmatch(r"(temp|fan)(\d+)_input", path.name)
            reading = _read_int(path)
            if m is None or reading is None:
                continue
            prefix = f"{m.group(1)}{m.group(2)}"
            label = _read(chip / f"{prefix}_label") or f"{chip_name} {prefix}"
            device_id = f"hwmon:{chip.name}:{prefix}"
            if m.group(1) == "temp":
                crit = _read_int(chip / f"{prefix}_crit")
                top = _read_int(chip / f"{prefix}_max")
                found.append(Sensor(device_id, label, _TEMPERATURE, reading, -3, crit, top))
            else:
                fan = f"fan:{chip.name}:{prefix}"
                found.append(Sensor(device_id, label, _TACHOMETER, reading, 0, fan=fan))
    return found


def _natural(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _thermal_sensors(sys_root: Path) -> list[Sensor]:
    found: list[Sensor] = []
    for zone in sorted((sys_root / "class/thermal").glob("thermal_zone*"), key=_natural):
        reading = _read_int(zone / "temp")
        if reading is None:
            continue
        label = f"{_read(zone / 'type') or 'thermal'} ({zone.name})"
        found.append(Sensor(f"thermal:{zone.name}", label, _TEMPERATURE, reading, -3, _trip(zone)))
    return found


def _trip(zone: Path) -> int | None:
    """The zone's critical trip temperature, if it has one."""
    for kind in sorted(zone.glob("trip_point_*_type")):
        if _read(kind) == "critical":
            return _read_int(zone / kind.name.replace("_type", "_temp"))
    return None


def _power_supplies(sys_root: Path) -> list[PowerSupply]:
    found: list[PowerSupply] = []
    for supply in sorted((sys_root / "class/power_supply").glob("*")):
        if _read(supply / "type") not in ("Mains", "UPS"):
            continue  # batteries are not power supplies (CIM_Battery)
        online = _read_int(supply / "online")
        found.append(
            PowerSupply(f"psu:{supply.name}", supply.name, None if online is None else online == 1)
        )
    return found


# Instances


def _device(
    ctx: CimContext, classname: str, device_id: str, properties: dict[str, Any]
) -> CIMInstance:
    keys = dict(device_path(classname, device_id).keybindings)
    common = {"EnabledState": _ENABLED, "RequestedState": 12, "OperationalStatus": [_OK_STATUS]}
    return make_instance(ctx.repository, classname, {**common, **keys, **properties}, CIMV2)


def _processor(ctx: CimContext, cpu: Cpu) -> CIMInstance:
    return _device(
        ctx,
        PROCESSOR,
        f"cpu{cpu.index}",
        {
            "ElementName": f"CPU {cpu.index}: {cpu.model}",
            "Name": cpu.model,
            "CurrentClockSpeed": cpu.mhz,
            "MaxClockSpeed": cpu.max_mhz,
            "HealthState": _OK_HEALTH,
            "CPUStatus": 1,  # CPU Enabled
        },
    )


def _memory(ctx: CimContext, size: int) -> CIMInstance:
    blocks = size // _PAGE
    return _device(
        ctx,
        MEMORY,
        "memory",
        {
            "ElementName": "System memory",
            "BlockSize": _PAGE,
            "NumberOfBlocks": blocks,
            "ConsumableBlocks": blocks,
            "Volatile": True,
            "Access": 3,  # Read/Write
            "Primordial": True,
            "HealthState": _OK_HEALTH,
        },
    )


def _sensor(ctx: CimContext, sensor: Sensor) -> CIMInstance:
    unit = _DEGREES_C if sensor.kind == _TEMPERATURE else _RPM
    health = sensor.health
    return _device(
        ctx,
        SENSOR,
        sensor.device_id,
        {
            "ElementName": sensor.label,
            "SensorType": sensor.kind,
            "BaseUnits": unit,
            "UnitModifier": sensor.unit_modifier,
            "RateUnits": 0,  # None
            "CurrentReading": sensor.reading,
            "UpperThresholdCritical": sensor.critical,
            "UpperThresholdNonCritical": sensor.maximum,
            "SupportedThresholds": _thresholds(sensor),
            "HealthState": health,
            "OperationalStatus": [_OK_STATUS if health == _OK_HEALTH else 3],  # 3: Degraded
            "PossibleStates": ["Normal", "Upper Non-Critical", "Upper Critical", "Unknown"],
            "CurrentState": _state(health),
        },
    )


def _thresholds(sensor: Sensor) -> list[int]:
    # SupportedThresholds: 1 UpperThresholdNonCritical, 2 UpperThresholdCritical
    return [n for n, v in ((1, sensor.maximum), (2, sensor.critical)) if v is not None]


def _state(health: int) -> str:
    return {_OK_HEALTH: "Normal", _DEGRADED: "Upper Non-Critical"}.get(health, "Upper Critical")


def _fan(ctx: CimContext, tach: Sensor) -> CIMInstance:
    assert tach.fan is not None
    return _device(
        ctx,
        FAN,
        tach.fan,
        {
            "ElementName": tach.label,
            "VariableSpeed": True,
            "ActiveCooling": True,
            "HealthState": _OK_HEALTH if tach.reading > 0 else _DEGRADED,
        },
    )


def _power_supply(ctx: CimContext, psu: PowerSupply) -> CIMInstance:
    health = 0 if psu.online is None else _OK_HEALTH if psu.online else _DEGRADED
    return _device(
        ctx,
        POWER_SUPPLY,
        psu.device_id,
        {"ElementName": psu.label, "HealthState": health, "IsSwitchingSupply": True},
    )


def device_path(classname: str, device_id: str) -> CIMInstanceName:
    """The path of one of the host's devices."""
    keys = {
        "SystemCreationClassName": HOST_CLASS,
        "SystemName": host_name(),
        "CreationClassName": classname,
        "DeviceID": device_id,
    }
    return CIMInstanceName(classname, keys, namespace=CIMV2)


class HostHardware:
    """The providers of the host's devices, over one injectable sysfs and procfs."""

    def __init__(self, sys_root: Path = Path("/sys"), proc_root: Path = Path("/proc")) -> None:
        self.sys_root = sys_root
        self.proc_root = proc_root

    async def hardware(self) -> Hardware:
        # sysfs reads are quick, but they are file I/O: keep them off the event loop.
        return await asyncio.to_thread(scan, self.sys_root, self.proc_root)

    async def processors(self, ctx: CimContext) -> list[CIMInstance]:
        return [_processor(ctx, cpu) for cpu in (await self.hardware()).cpus]

    async def memory(self, ctx: CimContext) -> list[CIMInstance]:
        return [_memory(ctx, (await self.hardware()).memory_bytes)]

    async def sensors(self, ctx: CimContext) -> list[CIMInstance]:
        return [_sensor(ctx, s) for s in (await self.hardware()).sensors]

    async def fans(self, ctx: CimContext) -> list[CIMInstance]:
        return [_fan(ctx, s) for s in (await self.hardware()).fans]

    async def power_supplies(self, ctx: CimContext) -> list[CIMInstance]:
        return [_power_supply(ctx, p) for p in (await self.hardware()).power_supplies]

    async def devices(self, ctx: CimContext) -> list[CIMInstance]:
        """Every device of the host, in one scan."""
        hw = await self.hardware()
        return [
            *(_processor(ctx, c) for c in hw.cpus),
            _memory(ctx, hw.memory_bytes),
            *(_sensor(ctx, s) for s in hw.sensors),
            *(_fan(ctx, s) for s in hw.fans),
            *(_power_supply(ctx, p) for p in hw.power_supplies),
        ]

    async def system_devices(self, ctx: CimContext) -> list[CIMInstance]:
        host = host_path()
        return [
            make_instance(
                ctx.repository,
                "TV_SystemDevice",
                {"GroupComponent": host, "PartComponent": device.path},
            )
            for device in await self.devices(ctx)
        ]

    async def associated_sensors(self, ctx: CimContext) -> list[CIMInstance]:
        found: list[CIMInstance] = []
        for tach in (await self.hardware()).fans:
            sensor, fan = device_path(SENSOR, tach.device_id), device_path(FAN, str(tach.fan))
            found.append(
                make_instance(
                    ctx.repository,
                    "TV_AssociatedSensor",
                    {"Antecedent": sensor, "Dependent": fan},
                )
            )
        return found

    def providers(self) -> list[InstanceProvider]:
        return [
            FunctionProvider(PROCESSOR, CIMV2, self.processors),
            FunctionProvider(MEMORY, CIMV2, self.memory),
            FunctionProvider(SENSOR, CIMV2, self.sensors),
            FunctionProvider(FAN, CIMV2, self.fans),
            FunctionProvider(POWER_SUPPLY, CIMV2, self.power_supplies),
            FunctionProvider("TV_SystemDevice", CIMV2, self.system_devices),
            FunctionProvider("TV_AssociatedSensor", CIMV2, self.associated_sensors),
        ]


def providers(
    sys_root: Path = Path("/sys"), proc_root: Path = Path("/proc")
) -> list[InstanceProvider]:
    """The host hardware's providers (the host itself is listed by the provider of
    ``TV_ComputerSystem``: see ``base.host_system``)."""
    return HostHardware(sys_root, proc_root).providers()
