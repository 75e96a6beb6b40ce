"""Base Metrics (DSP1053): the host's and the VMs' performance statistics over CIM.

The figures are the agent's ``StatsSampler``'s latest samples, the same the REST API
and ``/metrics`` serve; nothing is measured here.

Conventions:

- One ``TV_BaseMetricDefinition`` per figure in ``METRICS``: Id ``thinvisor:vm:<figure>``
  for the figures of a VM, ``thinvisor:host:<figure>`` for the host's, the figure being
  the sample's field (``cpu_percent``, ``net_rx_bytes_per_s``). Every metric is
  continuous, a Gauge (rates are computed between two samples: they go up and down),
  gathered Periodically (every ``[stats] interval_s``). The rates and CPU percentages
  apply to the sampling interval (TimeScope Interval), the memory figures to the moment
  of the sample (Point). A VM's CPU is a percentage of one host core, the host's of all
  its CPUs.
- ``TV_MetricDefForME`` joins each VM's ``TV_ComputerSystem`` (every VM with a valid
  configuration, running or not) to the VM definitions and the host's to the host's,
  MetricCollectionEnabled 2 (Enabled): the sampler samples every VM that runs.
- One ``TV_BaseMetricValue`` per figure of the latest sample of the host and of each VM
  whose QEMU runs (running or paused): InstanceID ``thinvisor:<vm uuid>:metric:<figure>``
  (``thinvisor:host:metric:<figure>``), MeasuredElementName the VM's name (the host's),
  TimeStamp the sample's time, Duration the sampling interval (none for Point metrics, as
  CIM_BaseMetricValue.Duration says), MetricValue the figure as a decimal string,
  Volatile true: the same instance carries the next sample. A stopped or suspended VM
  has no values, nor has a figure the sample does not know (a rate on the first look at
  a QEMU process, a balloon the VM lacks, disk figures while QMP was busy): MetricValue
  is Required.
- ``TV_MetricInstance`` joins each definition to its values, ``TV_MetricForME`` each
  ``TV_ComputerSystem`` to its values.
- One ``TV_MetricService``, hosted by the host (``TV_HostedService``), manages every
  definition (``TV_ServiceAffectsElement``, ElementEffects 5 Manages), as
  CIM_MetricService asks. Its methods are not implemented: collection is always on.
- DSP1053's central instances are the definitions; System Virtualization references it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pywbem import CIMDateTime, CIMInstance, CIMInstanceName

from thinvisor.cim.provider import CIMV2, CimContext, InstanceProvider
from thinvisor.cim.providers.base import (
    FunctionProvider,
    host_name,
    host_path,
    make_association,
    make_instance,
    vm_path,
)
from thinvisor.cim.providers.interop import SYSTEM_VIRTUALIZATION, Profile, ProfileSupport
from thinvisor.cim.providers.virtualization import valid_vms
from thinvisor.host.state import PowerState
from thinvisor.host.stats import HostSample, StatsSampler, VmSample

BASE_METRICS = Profile("DSP1053", "Base Metrics", "1.0.1")

DEFINITION_CLASS = "TV_BaseMetricDefinition"
VALUE_CLASS = "TV_BaseMetricValue"
SERVICE_CLASS = "TV_MetricService"
SERVICE_NAME = "thinvisor metric service"

VM, HOST = "vm", "host"
# CIM_BaseMetricDefinition value maps
REAL64, UINT64 = 5, 13  # DataType
SUMMABLE, NON_SUMMABLE = 2, 3  # Calculable
GAUGE = 4  # ChangeType
POINT, INTERVAL = 2, 3  # TimeScope
PERIODIC = 3  # GatheringType
ENABLED = 2  # CIM_MetricDefForME.MetricCollectionEnabled
MANAGES = 5  # CIM_ServiceAffectsElement.ElementEffects
# The states in which a VM's QEMU runs, and the sampler samples it.
_LIVE_STATES = frozenset({PowerState.RUNNING.value, PowerState.PAUSED.value})


@dataclass(frozen=True)
class Kind:
    """What sort of figure a metric is: its units (as people and as DSP0004 write them),
    its CIM data type and its time scope."""

    units: str
    programmatic_units: str | None
    data_type: int
    time_scope: int


PERCENT = Kind("Percent", "percent", REAL64, INTERVAL)
BYTES = Kind("Bytes", "byte", UINT64, POINT)
RATE = Kind("Bytes per second", "byte / second", REAL64, INTERVAL)
PAGES = Kind("Pages", None, UINT64, POINT)


@dataclass(frozen=True)
class Metric:
    """A figure of the samples of VMs (``VmSample``) or of the host (``HostSample``)."""

    element: str  # VM or HOST
    figure: str  # the sample's field
    name: str
    description: str
    kind: Kind
    calculable: int = SUMMABLE

    @property
    def id(self) -> str:
        return f"thinvisor:{self.element}:{self.figure}"


METRICS: tuple[Metric, ...] = (
    Metric(VM, "cpu_percent", "CPU used", "CPU time of QEMU, in percent of one host core",
           PERCENT),
    Metric(VM, "cpu_ready_percent", "CPU ready",
           "Time QEMU's threads waited runnable, in percent of one host core", PERCENT),
    Metric(VM, "memory_resident_bytes", "Memory resident", "Resident memory of QEMU", BYTES),
    Metric(VM, "memory_shared_bytes", "Memory shared", "Memory of the VM that KSM merged",
           BYTES),
    Metric(VM, "memory_ballooned_bytes", "Memory ballooned",
           "Memory taken back from the guest by its balloon", BYTES),
    Metric(VM, "disk_read_bytes_per_s", "Disk read rate", "Bytes read from all the VM's disks",
           RATE),
    Metric(VM, "disk_write_bytes_per_s", "Disk write rate",
           "Bytes written to all the VM's disks", RATE),
    Metric(VM, "net_rx_bytes_per_s", "Network receive rate",
           "Bytes the guest received on its NICs (those with a TAP)", RATE),
    Metric(VM, "net_tx_bytes_per_s", "Network transmit rate",
           "Bytes the guest sent on its NICs (those with a TAP)", RATE),
    Metric(HOST, "cpu_percent", "Host CPU used", "CPU time in use, in percent of all the CPUs",
           PERCENT, NON_SUMMABLE),
    Metric(HOST, "memory_used_bytes", "Host memory used", "Memory in use: total less available",
           BYTES),
    Metric(HOST, "memory_available_bytes", "Host memory available",
           "Memory available without swapping (MemAvailable)", BYTES),
    Metric(HOST, "ksm_pages_sharing", "Host KSM sharing",
           "Pages KSM merged away: the memory KSM saves", PAGES),
)  # fmt: skip


def metrics_of(element: str) -> list[Metric]:
    """The metrics of VMs (``VM``) or of the host (``HOST``)."""
    return [m for m in METRICS if m.element == element]


# Paths


def definition_path(metric: Metric, namespace: str = CIMV2) -> CIMInstanceName:
    return CIMInstanceName(DEFINITION_CLASS, {"Id": metric.id}, namespace=namespace)


def value_iid(element_id: str, metric: Metric) -> str:
    """A value's InstanceID: ``element_id`` is the VM's UUID or ``host``."""
    return f"thinvisor:{element_id}:metric:{metric.figure}"


def value_path(element_id: str, metric: Metric, namespace: str = CIMV2) -> CIMInstanceName:
    keys = {"InstanceID": value_iid(element_id, metric)}
    return CIMInstanceName(VALUE_CLASS, keys, namespace=namespace)


def service_path(namespace: str = CIMV2) -> CIMInstanceName:
    keys = {
        "SystemCreationClassName": "TV_ComputerSystem",
        "SystemName": host_name(),
        "CreationClassName": SERVICE_CLASS,
        "Name": SERVICE_NAME,
    }
    return CIMInstanceName(SERVICE_CLASS, keys, namespace=namespace)


# What the sampler knows


@dataclass(frozen=True)
class Measured:
    """A system and its latest sample: the host, or a VM whose QEMU runs."""

    element_id: str  # the VM's UUID, or HOST
    name: str
    path: CIMInstanceName
    metrics: list[Metric]
    sample: VmSample | HostSample
    interval_s: float


def sampler_of(ctx: CimContext) -> StatsSampler | None:
    return None if ctx.agent is None else ctx.agent.stats


async def systems(ctx: CimContext) -> list[tuple[CIMInstanceName, list[Metric]]]:
    """Every system metrics are defined for, with those metrics: the host and every VM
    with a valid configuration."""
    found = [(host_path(ctx.namespace), metrics_of(HOST))]
    vms = [] if ctx.agent is None else await valid_vms(ctx)
    found.extend((vm_path(spec.uuid, ctx.namespace), metrics_of(VM)) for _, spec in vms)
    return found


async def measured(ctx: CimContext) -> list[Measured]:
    """The host and the live VMs that have a sample."""
    sampler = sampler_of(ctx)
    if sampler is None:
        return []
    interval = sampler.interval_s
    found = []
    if sampler.latest_host is not None:
        host, metrics = host_path(ctx.namespace), metrics_of(HOST)
        found.append(Measured(HOST, host_name(), host, metrics, sampler.latest_host, interval))
    for info, spec in await valid_vms(ctx):
        sample = sampler.latest_vms.get(info.name)
        if sample is not None and info.state in _LIVE_STATES:
            vm, metrics = vm_path(spec.uuid, ctx.namespace), metrics_of(VM)
            found.append(Measured(spec.uuid, spec.name, vm, metrics, sample, interval))
    return found


def metric_value(sample: VmSample | HostSample, metric: Metric) -> str | None:
    """The figure as MetricValue writes it; None when the sample does not know it."""
    value = getattr(sample, metric.figure)
    if value is None:
        return None
    if metric.kind.data_type == UINT64:
        return str(int(value))
    return f"{float(value):.2f}"


# Instances


def definition(ctx: CimContext, metric: Metric) -> CIMInstance:
    return make_instance(
        ctx.repository,
        DEFINITION_CLASS,
        {
            "Id": metric.id,
            "Name": metric.name,
            "ElementName": metric.name,
            "Description": metric.description,
            "DataType": metric.kind.data_type,
            "Calculable": metric.calculable,
            "Units": metric.kind.units,
            "ProgrammaticUnits": metric.kind.programmatic_units,
            "IsContinuous": True,
            "ChangeType": GAUGE,
            "TimeScope": metric.kind.time_scope,
            "GatheringType": PERIODIC,
        },
        ctx.namespace,
    )


def value(ctx: CimContext, system: Measured, metric: Metric, text: str) -> CIMInstance:
    stamp = datetime.fromtimestamp(system.sample.time, UTC)
    # CIM_BaseMetricValue.Duration: none for a value that applies to a point in time.
    duration = None
    if metric.kind.time_scope == INTERVAL:
        duration = CIMDateTime(timedelta(seconds=system.interval_s))
    return make_instance(
        ctx.repository,
        VALUE_CLASS,
        {
            "InstanceID": value_iid(system.element_id, metric),
            "ElementName": f"{metric.name} of {system.name}",
            "MetricDefinitionId": metric.id,
            "MeasuredElementName": system.name,
            "TimeStamp": CIMDateTime(stamp),
            "Duration": duration,
            "MetricValue": text,
            "Volatile": True,
        },
        ctx.namespace,
    )


@dataclass(frozen=True)
class _Value:
    """A value instance, with the system and the metric it belongs to."""

    system: Measured
    metric: Metric
    instance: CIMInstance


async def _values(ctx: CimContext) -> list[_Value]:
    found = []
    for system in await measured(ctx):
        for metric in system.metrics:
            text = metric_value(system.sample, metric)
            if text is not None:
                found.append(_Value(system, metric, value(ctx, system, metric, text)))
    return found


def _assoc(ctx: CimContext, classname: str, **refs: CIMInstanceName) -> CIMInstance:
    return make_association(ctx.repository, classname, ctx.namespace, **refs)


async def _definitions(ctx: CimContext) -> list[CIMInstance]:
    return [definition(ctx, metric) for metric in METRICS]


async def _value_instances(ctx: CimContext) -> list[CIMInstance]:
    return [v.instance for v in await _values(ctx)]


async def _definitions_for_systems(ctx: CimContext) -> list[CIMInstance]:
    return [
        make_instance(
            ctx.repository,
            "TV_MetricDefForME",
            {
                "Antecedent": system,
                "Dependent": definition_path(metric, ctx.namespace),
                "MetricCollectionEnabled": ENABLED,
            },
            ctx.namespace,
        )
        for system, metrics in await systems(ctx)
        for metric in metrics
    ]


async def _metric_instances(ctx: CimContext) -> list[CIMInstance]:
    return [
        _assoc(
            ctx,
            "TV_MetricInstance",
            Antecedent=definition_path(v.metric, ctx.namespace),
            Dependent=v.instance.path,
        )
        for v in await _values(ctx)
    ]


async def _metrics_for_systems(ctx: CimContext) -> list[CIMInstance]:
    return [
        _assoc(ctx, "TV_MetricForME", Antecedent=v.system.path, Dependent=v.instance.path)
        for v in await _values(ctx)
    ]


async def _services(ctx: CimContext) -> list[CIMInstance]:
    props = {
        **service_path(ctx.namespace).keybindings,
        "ElementName": SERVICE_NAME,
        "Caption": SERVICE_NAME,
        "Description": "Samples the performance of the host and its virtual machines",
        "EnabledState": 2,  # Enabled
        "RequestedState": 12,  # Not Applicable
        "EnabledDefault": 2,
        "HealthState": 5,  # OK
        "OperationalStatus": [2],  # OK
        "Started": True,
    }
    return [make_instance(ctx.repository, SERVICE_CLASS, props, ctx.namespace)]


async def _managed_definitions(ctx: CimContext) -> list[CIMInstance]:
    service = service_path(ctx.namespace)
    return [
        make_instance(
            ctx.repository,
            "TV_ServiceAffectsElement",
            {
                "AffectingElement": service,
                "AffectedElement": definition_path(metric, ctx.namespace),
                "ElementEffects": [MANAGES],
            },
            ctx.namespace,
        )
        for metric in METRICS
    ]


async def _hosted_service(ctx: CimContext) -> list[CIMInstance]:
    refs = {"Antecedent": host_path(ctx.namespace), "Dependent": service_path(ctx.namespace)}
    return [_assoc(ctx, "TV_HostedService", **refs)]


# Registration


async def _central_definitions(ctx: CimContext) -> list[CIMInstanceName]:
    return [definition_path(metric, CIMV2) for metric in METRICS]


def profiles() -> list[ProfileSupport]:
    """Base Metrics, for Profile Registration; System Virtualization scopes it."""
    return [ProfileSupport(BASE_METRICS, _central_definitions, SYSTEM_VIRTUALIZATION)]


def providers() -> list[InstanceProvider]:
    """The providers of the classes only this module has instances of."""
    functions: dict[str, Callable[[CimContext], Awaitable[list[CIMInstance]]]] = {
        DEFINITION_CLASS: _definitions,
        VALUE_CLASS: _value_instances,
        SERVICE_CLASS: _services,
        "TV_MetricDefForME": _definitions_for_systems,
        "TV_MetricInstance": _metric_instances,
        "TV_MetricForME": _metrics_for_systems,
        "TV_ServiceAffectsElement": _managed_definitions,
    }
    return [FunctionProvider(name, CIMV2, build) for name, build in functions.items()]


def extensions() -> list[InstanceProvider]:
    """This module's instances of classes that ``virtualization`` provides."""
    return [FunctionProvider("TV_HostedService", CIMV2, _hosted_service)]
