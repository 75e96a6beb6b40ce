"""The CIM server of a real ``thinvisor host serve``, read by real clients: pywbem,
pywbemcli and Debian's wbemcli (sblim)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from pywbem import WBEMConnection, WBEMServer

from .agentenv import PASSWORD, TestAgent

pytestmark = pytest.mark.functional

PYWBEMCLI = Path(__file__).resolve().parents[2] / ".venv-tools" / "bin" / "pywbemcli"


def client_env() -> dict[str, str]:
    # requests prefers these over the CA file a client is given.
    return {
        k: v for k, v in os.environ.items() if k not in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
    }


def connection(agent: TestAgent, namespace: str = "root/cimv2") -> WBEMConnection:
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        os.environ.pop(var, None)
    return WBEMConnection(
        agent.cim_url,
        ("admin", PASSWORD),
        default_namespace=namespace,
        ca_certs=str(agent.cert),
        timeout=60,
    )


def test_pywbem_sees_the_interop_namespace_and_the_profiles(agent: TestAgent) -> None:
    server = WBEMServer(connection(agent))
    assert server.interop_ns == "root/interop"
    assert {"root/interop", "root/cimv2"} <= set(server.namespaces)
    names = {p["RegisteredName"] for p in server.profiles}
    assert {"Base Server", "System Virtualization", "Virtual System"} <= names
    base = server.get_selected_profiles(registered_org="DMTF", registered_name="Base Server")
    host = server.get_central_instances(base[0].path, "CIM_ComputerSystem")
    assert len(host) == 1


def test_pywbemcli_enumerates_and_gets(agent: TestAgent) -> None:
    assert PYWBEMCLI.exists(), "make deps installs pywbemcli into .venv-tools"
    base = [
        str(PYWBEMCLI),
        "-s",
        agent.cim_url,
        "-u",
        "admin",
        "-p",
        PASSWORD,
        "--ca-certs",
        str(agent.cert),
        "-d",
        "root/cimv2",
        "-o",
        "simple",
    ]
    classes = subprocess.run(
        [*base, "class", "enumerate", "--names-only", "--di"],
        capture_output=True,
        check=False,
        text=True,
        env=client_env(),
        timeout=120,
    )
    assert classes.returncode == 0, classes.stderr
    assert "TV_ComputerSystem" in classes.stdout
    instances = subprocess.run(
        [*base, "instance", "enumerate", "CIM_ComputerSystem"],
        capture_output=True,
        check=False,
        text=True,
        env=client_env(),
        timeout=120,
    )
    assert instances.returncode == 0, instances.stderr
    assert "TV_ComputerSystem" in instances.stdout


def test_sblim_wbemcli_enumerates_and_gets(agent: TestAgent) -> None:
    assert shutil.which("wbemcli"), "make deps installs sblim-wbemcli"
    url = f"https://admin:{PASSWORD}@127.0.0.1:{agent.cim_port}/root/cimv2"
    names = subprocess.run(
        ["wbemcli", "-noverify", "ein", f"{url}:CIM_ComputerSystem"],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    assert names.returncode == 0, names.stderr
    first = names.stdout.strip().splitlines()[0]
    assert "TV_ComputerSystem" in first
    # wbemcli prints host:port/namespace:Class.keys; get that instance back.
    path = first.split("/", 1)[1]
    got = subprocess.run(
        [
            "wbemcli",
            "-noverify",
            "gi",
            f"https://admin:{PASSWORD}@127.0.0.1:{agent.cim_port}/{path}",
        ],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    assert got.returncode == 0, got.stderr
    assert "EnabledState" in got.stdout
