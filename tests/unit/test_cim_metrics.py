"""Base Metrics (DSP1053) over CIM, answered by the real dispatcher and the real providers
over a fake agent: its VMs are plain data, its sampler a plain object holding the latest
samples.

The compiled schema comes from the shared test cache, as in ``test_cim_schema``.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from pywbem import (
    CIM_ERR_NOT_FOUND,
    CIMClassName,
    CIMDateTime,
    CIMError,
    CIMInstance,
    CIMInstanceName,
)

from thinvisor.auth import Role
from thinvisor.auth.users import User
from thinvisor.cim import schema
from thinvisor.cim.operations import Dispatcher
from thinvisor.cim.provider import CIMV2, INTEROP, CimContext
from thinvisor.cim.providers import default_registry, interop, metrics
from thinvisor.cim.providers.base import host_name, host_path, vm_path
from thinvisor.cim.providers.metrics import (
    HOST,
    METRICS,
    VM,
    definition_path,
    metric_value,
    metrics_of,
    service_path,
    value_iid,
    value_path,
)
from thinvisor.cim.schema import ClassRepository
from thinvisor.errors import NotFound
from thinvisor.host.engine.paths import VmPaths
from thinvisor.host.service import VmInfo
from thinvisor.host.stats import HostSample, VmSample
from thinvisor.host.tasks import TaskManager
from thinvisor.model.vm import VmSpec

TEST_CACHE = Path(os.environ.get("THINVISOR_TEST_CACHE") or "/var/cache/thinvisor-test")
ADMIN = User("admin", Role.ADMIN, datetime.now(UTC))

WEB_UUID = "6f1c3a52-8d4e-4c1b-9a55-0b3f1d2e7a10"
DB_UUID = "0a9e5c1d-2b3f-4e6a-8c7d-1e2f3a4b5c6d"
NEW_UUID = "7b2d4f6e-1a3c-4e5f-8a9b-0c1d2e3f4a5b"
SAMPLED = datetime(2026, 11, 28, 10, 0, 5, tzinfo=UTC)
INTERVAL_S = 20.0


@pytest.fixture(scope="module")
def repository() -> ClassRepository:
    return schema.load_repository(TEST_CACHE)


# A fake agent: its VMs and its sampler's latest samples


class FakeNetwork:
    async def list_switches(self) -> list[dict[str, Any]]:
        return []


class FakeService:
    def __init__(self, vms: list[VmInfo]) -> None:
        self.vms = vms
        self.network = FakeNetwork()

    async def list_vms(self) -> list[VmInfo]:
        return self.vms

    def resolve(self, ref: str) -> str:
        for vm in self.vms:
            if ref in (vm.name, vm.spec and vm.spec.uuid):
                return vm.name
        raise NotFound(f"vm {ref!r} does not exist")


@dataclass
class FakeSampler:
    """What the providers read of a ``StatsSampler``."""

    latest_vms: dict[str, VmSample] = field(default_factory=dict)
    latest_host: HostSample | None = None
    interval_s: float = INTERVAL_S


class FakeAgent:
    def __init__(self, service: FakeService, stats: FakeSampler) -> None:
        self.service = service
        self.stats = stats
        self.tasks = TaskManager()


def vm(tmp: Path, name: str, uuid: str, state: str) -> VmInfo:
    spec = VmSpec(name=name, uuid=uuid)
    return VmInfo(name, "local", state, spec, VmPaths(tmp / name, tmp / "run" / name))


def vm_sample(**figures: Any) -> VmSample:
    values: dict[str, Any] = {
        "time": SAMPLED.timestamp(),
        "pid": 4242,
        "cpu_seconds": 12.5,
        "cpu_percent": 42.125,
        "cpu_ready_seconds": 0.5,
        "cpu_ready_percent": 1.5,
        "memory_resident_bytes": 80 << 20,
        "memory_shared_bytes": 4 << 20,
        "memory_ballooned_bytes": 16 << 20,
        "disk_read_bytes_per_s": 1024.0,
        "disk_write_bytes_per_s": 2048.5,
        "disk_read_ops_per_s": 2.0,
        "disk_write_ops_per_s": 4.0,
        "net_rx_bytes_per_s": 300.0,
        "net_tx_bytes_per_s": 150.25,
        "net_rx_packets_per_s": 3.0,
        "net_tx_packets_per_s": 2.0,
        "qmp": True,
        "disks": {},
        "nics": {},
    }
    return VmSample(**{**values, **figures})


def host_sample() -> HostSample:
    return HostSample(
        time=SAMPLED.timestamp(),
        cpus=2,
        cpu_percent=37.5,
        memory_total_bytes=8 << 30,
        memory_used_bytes=3 << 30,
        memory_available_bytes=5 << 30,
        ksm_pages_sharing=1234,
        ksm_pages_shared=56,
        memory_ballooned_bytes=16 << 20,
        vms_running=2,
    )


@pytest.fixture
def host(tmp_path: Path) -> FakeAgent:
    """``web`` runs and was sampled (without a balloon figure); ``db`` stopped after its
    last sample; ``new`` runs but has not been sampled yet."""
    vms = [
        vm(tmp_path, "web", WEB_UUID, "running"),
        vm(tmp_path, "db", DB_UUID, "stopped"),
        vm(tmp_path, "new", NEW_UUID, "running"),
    ]
    samples = {"web": vm_sample(memory_ballooned_bytes=None), "db": vm_sample()}
    return FakeAgent(FakeService(vms), FakeSampler(samples, host_sample()))


def call(repository: ClassRepository, agent: FakeAgent, operation: str, **params: Any) -> Any:
    namespace = params.pop("namespace", CIMV2)
    ctx = CimContext(cast(Any, agent), ADMIN, repository, namespace)
    return asyncio.run(Dispatcher(repository, default_registry()).intrinsic(ctx, operation, params))


def enumerate_instances(
    repository: ClassRepository, agent: FakeAgent, classname: str, **more: Any
) -> list[CIMInstance]:
    found: list[CIMInstance] = call(
        repository, agent, "EnumerateInstances", ClassName=CIMClassName(classname), **more
    )
    return found


def associators(
    repository: ClassRepository, agent: FakeAgent, path: CIMInstanceName, assoc: str, **more: Any
) -> list[CIMInstance]:
    found: list[CIMInstance] = call(
        repository, agent, "Associators", ObjectName=path, AssocClass=CIMClassName(assoc), **more
    )
    return found


def references(
    repository: ClassRepository, agent: FakeAgent, path: CIMInstanceName, assoc: str
) -> list[CIMInstance]:
    found: list[CIMInstance] = call(
        repository, agent, "References", ObjectName=path, ResultClass=CIMClassName(assoc)
    )
    return found


def by_iid(instances: list[CIMInstance]) -> dict[str, CIMInstance]:
    return {str(i["InstanceID"]): i for i in instances}


def metric(element: str, figure: str) -> metrics.Metric:
    [found] = [m for m in METRICS if (m.element, m.figure) == (element, figure)]
    return found


# Definitions


def test_each_sampled_figure_has_a_definition(repository: ClassRepository, host: FakeAgent) -> None:
    found = {d["Id"]: d for d in enumerate_instances(repository, host, "CIM_BaseMetricDefinition")}
    assert len(found) == len(METRICS) == 13
    assert {m.figure for m in metrics_of(VM)} == {
        "cpu_percent",
        "cpu_ready_percent",
        "memory_resident_bytes",
        "memory_shared_bytes",
        "memory_ballooned_bytes",
        "disk_read_bytes_per_s",
        "disk_write_bytes_per_s",
        "net_rx_bytes_per_s",
        "net_tx_bytes_per_s",
    }
    assert {m.figure for m in metrics_of(HOST)} == {
        "cpu_percent",
        "memory_used_bytes",
        "memory_available_bytes",
        "ksm_pages_sharing",
    }
    cpu = found["thinvisor:vm:cpu_percent"]
    assert cpu.classname == "TV_BaseMetricDefinition"
    assert cpu.path == definition_path(metric(VM, "cpu_percent"))
    assert (cpu["Name"], cpu["Units"]) == ("CPU used", "Percent")
    assert cpu["ProgrammaticUnits"] == "percent"
    assert (cpu["DataType"], cpu["TimeScope"]) == (5, 3)  # real64, Interval
    resident = found["thinvisor:vm:memory_resident_bytes"]
    assert (resident["DataType"], resident["TimeScope"], resident["Units"]) == (13, 2, "Bytes")
    assert found["thinvisor:vm:net_rx_bytes_per_s"]["ProgrammaticUnits"] == "byte / second"
    for d in found.values():
        assert d["IsContinuous"] is True
        assert (d["ChangeType"], d["GatheringType"]) == (4, 3)  # Gauge, Periodic
        assert d["Name"] and d["Description"] and d["Calculable"] in (2, 3)


def test_every_figure_is_a_field_of_its_sample() -> None:
    for m in METRICS:
        model = VmSample if m.element == VM else HostSample
        assert m.figure in model.model_fields, m.id


def test_definitions_apply_to_the_host_and_to_every_vm(
    repository: ClassRepository, host: FakeAgent
) -> None:
    vm_ids = {m.id for m in metrics_of(VM)}
    for uuid in (WEB_UUID, DB_UUID, NEW_UUID):  # running or not
        found = associators(repository, host, vm_path(uuid), "CIM_MetricDefForME")
        assert {d["Id"] for d in found} == vm_ids
    found = associators(repository, host, host_path(), "CIM_MetricDefForME")
    assert {d["Id"] for d in found} == {m.id for m in metrics_of(HOST)}
    cpu = definition_path(metric(VM, "cpu_percent"))
    systems = associators(repository, host, cpu, "CIM_MetricDefForME")
    assert {s["Name"] for s in systems} == {WEB_UUID, DB_UUID, NEW_UUID}
    refs = references(repository, host, cpu, "CIM_MetricDefForME")
    assert {r["MetricCollectionEnabled"] for r in refs} == {2}


# Values


def test_values_are_the_latest_samples_of_the_host_and_the_running_vms(
    repository: ClassRepository, host: FakeAgent
) -> None:
    found = by_iid(enumerate_instances(repository, host, "CIM_BaseMetricValue"))
    web = {value_iid(WEB_UUID, m) for m in metrics_of(VM) if m.figure != "memory_ballooned_bytes"}
    assert set(found) == web | {value_iid(HOST, m) for m in metrics_of(HOST)}

    cpu = found[f"thinvisor:{WEB_UUID}:metric:cpu_percent"]
    assert cpu.classname == "TV_BaseMetricValue"
    assert cpu.path == value_path(WEB_UUID, metric(VM, "cpu_percent"))
    assert cpu["MetricDefinitionId"] == "thinvisor:vm:cpu_percent"
    assert (cpu["MetricValue"], cpu["MeasuredElementName"]) == ("42.12", "web")
    assert cpu["TimeStamp"] == CIMDateTime(SAMPLED)
    assert cpu["Duration"] == CIMDateTime(timedelta(seconds=INTERVAL_S))
    assert cpu["Volatile"] is True
    resident = found[f"thinvisor:{WEB_UUID}:metric:memory_resident_bytes"]
    assert resident["MetricValue"] == str(80 << 20)
    assert resident["Duration"] is None  # a Point metric
    assert found[f"thinvisor:{WEB_UUID}:metric:disk_write_bytes_per_s"]["MetricValue"] == "2048.50"

    host_cpu = found["thinvisor:host:metric:cpu_percent"]
    assert (host_cpu["MetricValue"], host_cpu["MeasuredElementName"]) == ("37.50", host_name())
    assert host_cpu["MetricDefinitionId"] == "thinvisor:host:cpu_percent"
    assert found["thinvisor:host:metric:ksm_pages_sharing"]["MetricValue"] == "1234"


def test_a_vm_that_does_not_run_has_no_values(repository: ClassRepository, host: FakeAgent) -> None:
    assert associators(repository, host, vm_path(DB_UUID), "CIM_MetricForME") == []
    assert associators(repository, host, vm_path(NEW_UUID), "CIM_MetricForME") == []
    with pytest.raises(CIMError) as exc:
        call(
            repository,
            host,
            "GetInstance",
            InstanceName=value_path(DB_UUID, metric(VM, "cpu_percent")),
        )
    assert exc.value.status_code == CIM_ERR_NOT_FOUND


def test_a_paused_vm_keeps_its_values(
    repository: ClassRepository, host: FakeAgent, tmp_path: Path
) -> None:
    host.service.vms[0] = vm(tmp_path, "web", WEB_UUID, "paused")
    assert associators(repository, host, vm_path(WEB_UUID), "CIM_MetricForME")


def test_values_are_reached_from_their_systems_and_definitions(
    repository: ClassRepository, host: FakeAgent
) -> None:
    web = associators(repository, host, vm_path(WEB_UUID), "CIM_MetricForME")
    assert {v["MetricDefinitionId"] for v in web} == {
        m.id for m in metrics_of(VM) if m.figure != "memory_ballooned_bytes"
    }
    assert {v["MeasuredElementName"] for v in web} == {"web"}
    [system] = associators(repository, host, web[0].path, "CIM_MetricForME")
    assert system.path == vm_path(WEB_UUID)

    on_host = associators(repository, host, host_path(), "CIM_MetricForME")
    assert {v["MetricDefinitionId"] for v in on_host} == {m.id for m in metrics_of(HOST)}

    cpu = definition_path(metric(VM, "cpu_percent"))
    [value] = associators(repository, host, cpu, "CIM_MetricInstance")
    assert value["InstanceID"] == f"thinvisor:{WEB_UUID}:metric:cpu_percent"
    [back] = associators(repository, host, value.path, "CIM_MetricInstance")
    assert back["Id"] == "thinvisor:vm:cpu_percent"


def test_before_the_first_sample_there_are_definitions_but_no_values(
    repository: ClassRepository, host: FakeAgent
) -> None:
    host.stats = FakeSampler()
    assert enumerate_instances(repository, host, "CIM_BaseMetricValue") == []
    assert enumerate_instances(repository, host, "CIM_MetricForME") == []
    assert enumerate_instances(repository, host, "CIM_MetricInstance") == []
    assert len(enumerate_instances(repository, host, "CIM_BaseMetricDefinition")) == len(METRICS)


def test_every_instance_is_found_by_its_path(repository: ClassRepository, host: FakeAgent) -> None:
    for classname in (
        "TV_BaseMetricDefinition",
        "TV_BaseMetricValue",
        "TV_MetricService",
        "TV_MetricDefForME",
        "TV_MetricInstance",
        "TV_MetricForME",
    ):
        for inst in enumerate_instances(repository, host, classname):
            got = call(repository, host, "GetInstance", InstanceName=inst.path)
            assert got.path == inst.path


@pytest.mark.parametrize(
    ("element", "figure", "sample", "text"),
    [
        (VM, "cpu_percent", vm_sample(cpu_percent=0.004), "0.00"),
        (VM, "cpu_percent", vm_sample(cpu_percent=None), None),
        (VM, "memory_shared_bytes", vm_sample(memory_shared_bytes=0), "0"),
        (VM, "net_tx_bytes_per_s", vm_sample(net_tx_bytes_per_s=1e9 / 3), "333333333.33"),
        (HOST, "memory_available_bytes", host_sample(), str(5 << 30)),
    ],
)
def test_metric_values_are_decimal_strings(
    element: str, figure: str, sample: VmSample | HostSample, text: str | None
) -> None:
    assert metric_value(sample, metric(element, figure)) == text


# The service


def test_the_metric_service_is_hosted_and_manages_every_definition(
    repository: ClassRepository, host: FakeAgent
) -> None:
    [service] = associators(
        repository,
        host,
        host_path(),
        "CIM_HostedService",
        ResultClass=CIMClassName("CIM_MetricService"),
    )
    assert service.classname == "TV_MetricService"
    assert service.path == service_path()
    assert (service["Started"], service["EnabledState"]) == (True, 2)
    managed = associators(repository, host, service.path, "CIM_ServiceAffectsElement")
    assert {d["Id"] for d in managed} == {m.id for m in METRICS}
    refs = references(repository, host, service.path, "CIM_ServiceAffectsElement")
    assert {tuple(r["ElementEffects"]) for r in refs} == {(5,)}  # Manages


# Profile Registration


def test_the_profile_is_registered_with_the_definitions_as_central_instances(
    repository: ClassRepository, host: FakeAgent
) -> None:
    profile = metrics.BASE_METRICS
    [registered] = [
        p
        for p in enumerate_instances(repository, host, "TV_RegisteredProfile", namespace=INTEROP)
        if p["RegisteredName"] == "Base Metrics"
    ]
    assert registered.path["InstanceID"] == profile.instance_id == "thinvisor:DSP1053"
    assert (registered["RegisteredOrganization"], registered["RegisteredVersion"]) == (2, "1.0.1")
    centrals = call(
        repository,
        host,
        "AssociatorNames",
        ObjectName=profile.path,
        AssocClass=CIMClassName("CIM_ElementConformsToProfile"),
        namespace=INTEROP,
    )
    assert {c.classname for c in centrals} == {"TV_BaseMetricDefinition"}
    assert {c["Id"] for c in centrals} == {m.id for m in METRICS}
    [scoping] = call(
        repository,
        host,
        "AssociatorNames",
        ObjectName=profile.path,
        AssocClass=CIMClassName("CIM_ReferencedProfile"),
        ResultRole="Dependent",
        namespace=INTEROP,
    )
    assert scoping["InstanceID"] == interop.SYSTEM_VIRTUALIZATION.instance_id
