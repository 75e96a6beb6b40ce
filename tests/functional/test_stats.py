"""Performance statistics of a real agent sampling every second: a guest spinning on a
busy loop shows through REST, /metrics and the CLI (local and logged in), and the day
roll-ups survive an agent restart."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .agentenv import TestAgent
from .hostenv import TestHost
from .test_api import create_appliance_vm, read_until, ws
from .test_cli_remote import Cli, log_in

pytestmark = pytest.mark.functional


@pytest.fixture
def agent(sampling_agent: TestAgent) -> TestAgent:
    return sampling_agent


def vm_latest(c: httpx.Client, vm: str) -> dict[str, Any]:
    answer = c.get(f"/vms/{vm}/stats")
    assert answer.status_code == 200, answer.text
    latest: dict[str, Any] = answer.json()["latest"]
    return latest


def wait_cpu(c: httpx.Client, vm: str, above: float, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    latest = vm_latest(c, vm)
    while time.monotonic() < deadline:
        latest = vm_latest(c, vm)
        if (latest["cpu_percent"] or 0) > above:
            return latest
        time.sleep(0.5)
    raise AssertionError(f"the VM's CPU never went above {above}%: {latest}")


def scrape(agent: TestAgent) -> dict[tuple[str, str], float]:
    """``(metric, vm)`` -> value for the VM metrics, ``(metric, "")`` for the host's."""
    with agent.client() as c:
        answer = c.get(f"https://127.0.0.1:{agent.port}/metrics")
    assert answer.status_code == 200, answer.text
    return {
        (s.name, s.labels.get("vm", "")): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
        if "device" not in s.labels
    }


def test_a_busy_guest_shows_in_rest_metrics_and_cli(agent: TestAgent, host: TestHost) -> None:
    with agent.client() as c:
        create_appliance_vm(agent, c, "busy", vcpus=1)
        assert c.post("/vms/busy/start").status_code == 200
        host.wait_ready("busy")
        idle = 100.0
        for _ in range(3):  # past the boot: the quietest of a few idle samples
            time.sleep(1)
            idle = min(idle, vm_latest(c, "busy")["cpu_percent"] or 100.0)
        assert idle < 30, idle

        with ws(agent, "/vms/busy/console/serial") as conn:
            conn.send(b"while :; do :; done &\n")
            conn.send(b"echo spin-$((6*7))\n")
            read_until(conn, b"spin-42")
        busy = wait_cpu(c, "busy", max(50.0, idle + 25))
        assert busy["memory_resident_bytes"] > 64 << 20
        assert busy["qmp"] and "cdrom0" in busy["disks"]
        series = c.get("/vms/busy/stats").json()["series"]
        assert len(series["timestamps"]) >= 5
        assert max(v or 0 for v in series["values"]["cpu_percent"]) > 50

        first, t0 = scrape(agent), time.monotonic()
        time.sleep(2.5)
        second, t1 = scrape(agent), time.monotonic()
        key = ("thinvisor_vm_cpu_seconds_total", "busy")
        assert (second[key] - first[key]) / (t1 - t0) > 0.5  # in cores
        assert second["thinvisor_vm_cpu_usage_ratio", "busy"] > 0.3
        assert second["thinvisor_host_vms_running", ""] == 1
        assert second["thinvisor_host_memory_total_bytes", ""] > 0
        with httpx.Client(verify=agent.ssl_context()) as anonymous:
            assert anonymous.get(f"https://127.0.0.1:{agent.port}/metrics").status_code == 401

        host_stats = c.get("/host/stats").json()
        assert host_stats["latest"]["vms_running"] == 1
        assert host_stats["latest"]["cpu_percent"] > 20  # one of two cores spins
        assert c.get("/vms/busy/stats", params={"range": "hour"}).status_code == 422

    # Locally the command measures for itself, over a second, while the agent samples too.
    local = json.loads(host.cli("vm", "stats", "busy", "--json").stdout)
    assert local["cpu_percent"] > idle + 25
    cli = Cli(host)  # logged in: the agent's latest samples
    log_in(cli, agent)
    remote = json.loads(cli("vm", "stats", "busy", "--json").stdout)
    assert remote["cpu_percent"] > idle + 25 and remote["pid"] == local["pid"]
    assert "1" in cli("host", "stats").stdout.split("vms running")[1]
    assert cli.error("vm", "stats", "ghost") == "vm 'ghost' does not exist"

    agent.stop()  # the half-filled 5-minute interval goes to disk
    assert (agent.state_dir / "stats" / "host.json").exists()
    assert (agent.state_dir / "stats" / "vms" / "busy.json").exists()
    agent.start()
    with agent.client() as c:
        day = c.get("/vms/busy/stats", params={"range": "day"}).json()
        assert day["interval_s"] == 300 and day["series"]["timestamps"]
        assert max(v or 0 for v in day["series"]["values"]["cpu_percent"]) > 20
        assert c.get("/host/stats", params={"range": "day"}).json()["series"]["timestamps"]
