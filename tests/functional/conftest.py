"""Fixtures for functional tests: real QEMU guests booting the appliance under TCG."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from thinvisor.appliance import Appliance, build_appliance

from .agentenv import TestAgent
from .hostenv import TestHost
from .netenv import NetAgent, NetNamespace

CACHE_ENV = "THINVISOR_TEST_CACHE"
DEFAULT_TEST_CACHE = Path("/var/cache/thinvisor-test")


@pytest.fixture(scope="session")
def appliance_cache() -> Path:
    """The cache directory the test session builds the appliance into."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_TEST_CACHE)


@pytest.fixture(scope="session")
def appliance(appliance_cache: Path) -> Appliance:
    """The quick-start appliance, built once per session (reused across sessions)."""
    return build_appliance(appliance_cache)


@pytest.fixture
def host(appliance: Appliance) -> Iterator[TestHost]:
    """A throwaway thinvisor host; every QEMU it started is ended afterwards."""
    h = TestHost(appliance)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def agent(host: TestHost) -> Iterator[TestAgent]:
    """A real ``thinvisor host serve`` on that host, ended afterwards."""
    a = TestAgent(host)
    try:
        a.start()
        yield a
    finally:
        a.close()


@pytest.fixture
def sampling_agent(host: TestHost) -> Iterator[TestAgent]:
    """A running agent that samples statistics every second instead of every 20."""
    a = TestAgent(host)
    with host.config_file.open("a") as f:
        f.write("[stats]\ninterval_s = 1\n")
    try:
        a.start()
        yield a
    finally:
        a.close()


@pytest.fixture
def netns() -> Iterator[NetNamespace]:
    """A network namespace of the test's own; what runs in it is killed afterwards."""
    ns = NetNamespace()
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture
def net_agent(host: TestHost, netns: NetNamespace) -> Iterator[NetAgent]:
    """A real agent whose VM networking (bridges, TAPs, dnsmasq, QEMU) lives in ``netns``."""
    a = NetAgent(host, netns)
    try:
        a.start()
        yield a
    finally:
        a.close()
