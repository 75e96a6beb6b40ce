"""Performance statistics: ``/host/stats`` and ``/vms/{vm}/stats`` under ``/api/v1``, and
``/metrics`` (Prometheus' text exposition) beside it, all from the agent's sampler."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, cast

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from thinvisor.api.auth import agent_of, require
from thinvisor.api.errors import ERROR_RESPONSES, error_response
from thinvisor.auth import Permission, User
from thinvisor.host.stats import (
    DISK_COUNTERS,
    NIC_COUNTERS,
    RANGES,
    HostStats,
    StatsRange,
    StatsSampler,
    VmStats,
)

router = APIRouter(tags=["statistics"], responses=ERROR_RESPONSES)
metrics_router = APIRouter()

Reader = Annotated[User, Depends(require(Permission.READ))]
RangeQuery = Annotated[
    str,
    Query(
        alias="range",
        description="realtime: every sample of the last hour; day: 5-minute averages",
        json_schema_extra={"enum": list(RANGES)},
    ),
]


def _bad_range(value: str) -> JSONResponse | None:
    # 422 rather than the 400 of a malformed request: the request is well formed, but
    # asks for a range the agent does not keep.
    if value in RANGES:
        return None
    message = f"range: must be one of {', '.join(RANGES)}, not {value!r}"
    return error_response(422, "invalid_argument", message)


def _sampler(request: Request) -> StatsSampler:
    return agent_of(request).stats


@router.get("/host/stats", response_model=HostStats)
async def host_stats(
    request: Request, user: Reader, range_: RangeQuery = "realtime"
) -> HostStats | JSONResponse:
    """The host's CPU, memory, KSM and ballooning: the latest sample and a series."""
    if (bad := _bad_range(range_)) is not None:
        return bad
    return _sampler(request).host_stats(cast(StatsRange, range_))


@router.get("/vms/{vm}/stats", response_model=VmStats)
async def vm_stats(
    vm: str, request: Request, user: Reader, range_: RangeQuery = "realtime"
) -> VmStats | JSONResponse:
    """A VM's CPU, CPU ready, memory, disk and network: the latest sample and a series."""
    if (bad := _bad_range(range_)) is not None:
        return bad
    name = agent_of(request).service.resolve(vm)
    return await _sampler(request).vm_stats(name, cast(StatsRange, range_))


@metrics_router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, user: Reader) -> Response:
    """The latest samples in Prometheus' exposition format (text, or OpenMetrics when
    the scraper asks for it)."""
    registry = CollectorRegistry()
    registry.register(StatsCollector(_sampler(request)))
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(registry), media_type=content_type)


class StatsCollector:
    """A Prometheus collector that reports the sampler's latest samples."""

    def __init__(self, sampler: StatsSampler):
        self.sampler = sampler

    def collect(self) -> Iterator[Metric]:
        yield from self._vm_metrics()
        yield from self._host_metrics()

    def _vm_metrics(self) -> Iterator[Metric]:
        vm = ["vm"]
        cpu = CounterMetricFamily(
            "thinvisor_vm_cpu_seconds", "CPU time of the VM's QEMU process", labels=vm
        )
        usage = GaugeMetricFamily(
            "thinvisor_vm_cpu_usage_ratio",
            "CPU used between the last two samples, in cores",
            labels=vm,
        )
        ready = CounterMetricFamily(
            "thinvisor_vm_cpu_ready_seconds",
            "Time the VM's QEMU threads waited runnable for a CPU",
            labels=vm,
        )
        resident = GaugeMetricFamily(
            "thinvisor_vm_memory_resident_bytes", "Resident memory of QEMU", labels=vm
        )
        shared = GaugeMetricFamily(
            "thinvisor_vm_memory_shared_bytes", "Memory of the VM merged by KSM", labels=vm
        )
        ballooned = GaugeMetricFamily(
            "thinvisor_vm_memory_ballooned_bytes",
            "Memory taken back from the guest by its balloon",
            labels=vm,
        )
        dev = ["vm", "device"]
        disk = {
            c: CounterMetricFamily(f"thinvisor_vm_disk_{c}", f"Disk {_words(c)}", labels=dev)
            for c in DISK_COUNTERS
        }
        net = {
            c: CounterMetricFamily(
                f"thinvisor_vm_network_{_net_name(c)}",
                f"Network {_words(c)} as the guest sees it",
                labels=dev,
            )
            for c in NIC_COUNTERS
        }
        for name, s in sorted(self.sampler.latest_vms.items()):
            cpu.add_metric([name], s.cpu_seconds)
            if s.cpu_percent is not None:
                usage.add_metric([name], s.cpu_percent / 100)
            ready.add_metric([name], s.cpu_ready_seconds)
            resident.add_metric([name], s.memory_resident_bytes)
            shared.add_metric([name], s.memory_shared_bytes)
            if s.memory_ballooned_bytes is not None:
                ballooned.add_metric([name], s.memory_ballooned_bytes)
            for device, d in sorted(s.disks.items()):
                for c in DISK_COUNTERS:
                    disk[c].add_metric([name, device], getattr(d, c))
            for device, n in sorted(s.nics.items()):
                for c in NIC_COUNTERS:
                    net[c].add_metric([name, device], getattr(n, c))
        yield from (cpu, usage, ready, resident, shared, ballooned)
        yield from disk.values()
        yield from net.values()

    def _host_metrics(self) -> Iterator[Metric]:
        host = self.sampler.latest_host
        if host is None:
            return
        gauges: list[tuple[str, str, float | None]] = [
            ("cpus", "CPUs of the host", host.cpus),
            ("cpu_usage_ratio", "Share of all host CPUs in use", _ratio(host.cpu_percent)),
            ("memory_total_bytes", "Memory of the host", host.memory_total_bytes),
            ("memory_used_bytes", "Memory in use (total less available)", host.memory_used_bytes),
            ("memory_available_bytes", "Memory available", host.memory_available_bytes),
            ("ksm_pages_sharing", "Pages that KSM merged away", host.ksm_pages_sharing),
            ("ksm_pages_shared", "Pages KSM keeps for the merged ones", host.ksm_pages_shared),
            ("memory_ballooned_bytes", "Memory in balloons", host.memory_ballooned_bytes),
            ("vms_running", "VMs running", host.vms_running),
        ]
        for name, text, value in gauges:
            if value is not None:
                yield GaugeMetricFamily(f"thinvisor_host_{name}", text, value=value)


def _ratio(percent: float | None) -> float | None:
    return None if percent is None else percent / 100


def _words(counter: str) -> str:
    return counter.replace("_", " ").replace("ops", "operations")


def _net_name(counter: str) -> str:
    """``rx_bytes`` -> ``receive_bytes``, in node_exporter's words."""
    direction, _, unit = counter.partition("_")
    return f"{'receive' if direction == 'rx' else 'transmit'}_{unit}"
