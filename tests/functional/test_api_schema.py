"""schemathesis against the schema a real agent serves: no 5xx, no response that breaks
the schema. Bounded, so that it stays under a minute."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .agentenv import PASSWORD
from .netenv import NetAgent

pytestmark = pytest.mark.functional

SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))


def test_schemathesis_finds_no_server_error_and_no_schema_violation(net_agent: NetAgent) -> None:
    # Its switches (bridges, NAT, dnsmasq) land in the test's own network namespace.
    agent = net_agent
    with agent.client(None) as c:
        login = c.post("/auth/login", json={"user": "admin", "password": PASSWORD})
        token = login.json()["token"]
    # One VM for the operations on /vms/{vm} to find.
    agent.host.create("vm1", start=False)
    run = subprocess.run(
        [
            SCHEMATHESIS,
            "run",
            f"{agent.base}/openapi.json",
            "--checks",
            "not_a_server_error,response_schema_conformance,content_type_conformance",
            "--header",
            f"Authorization: Bearer {token}",
            "--tls-verify",
            str(agent.cert),
            "--max-examples",
            "10",
            "--seed",
            "20261128",
            "--workers",
            "1",
            "--request-timeout",
            "60",
            "--max-time",
            "30",
            "--exclude-path",
            "/api/v1/host/shutdown",
            "--suppress-health-check",
            "all",
        ],
        cwd=agent.host.root,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
