"""VM cgroups on this host's real cgroups: a busy process held to its CPU quota.

Each test works under a parent cgroup of its own, removed afterwards with everything in
it; the processes a test starts are killed by pid before that.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from thinvisor.errors import InvalidArgument
from thinvisor.host.engine.cgroups import (
    CgroupLayout,
    CgroupSettings,
    CgroupsUnavailable,
    VmCgroup,
    detect_layout,
    remove_stale,
)

pytestmark = [
    pytest.mark.functional,
    pytest.mark.skipif(os.geteuid() != 0, reason="cgroups are made by root"),
]

BUSY = "while True: pass"
MEASURE_S = 3.0
Start = Callable[[list[str]], "subprocess.Popen[bytes]"]


@pytest.fixture
def layout() -> CgroupLayout:
    try:
        return detect_layout()
    except CgroupsUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def parent(layout: CgroupLayout) -> Iterator[str]:
    name = f"thinvisor-test-{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        _remove_parent(layout, name)


def _remove_parent(layout: CgroupLayout, parent: str) -> None:
    vm_ids = {
        d.name
        for h in layout.hierarchies()
        if (h / parent).is_dir()
        for d in (h / parent).iterdir()
        if d.is_dir()
    }
    for vm_id in vm_ids:
        VmCgroup(layout, vm_id, parent).remove()
    for h in layout.hierarchies():
        if (h / parent).is_dir():
            (h / parent).rmdir()


@pytest.fixture
def start(parent: str) -> Iterator[Start]:
    """Start a child process; each one is killed and reaped before the cgroups go."""
    children: list[subprocess.Popen[bytes]] = []

    def run(argv: list[str]) -> subprocess.Popen[bytes]:
        children.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL))
        return children[-1]

    try:
        yield run
    finally:
        for child in children:
            child.kill()
            child.wait()


def _cpu_share(cg: VmCgroup, seconds: float) -> float:
    """The cores the cgroup used over ``seconds``, from its own accounting."""
    before, t0 = cg.usage(), time.monotonic()
    time.sleep(seconds)
    after, t1 = cg.usage(), time.monotonic()
    return (after.cpu_ns - before.cpu_ns) / ((t1 - t0) * 1e9)


def _memory_limit(cg: VmCgroup) -> str:
    name = "memory.max" if cg.layout.version == 2 else "memory.limit_in_bytes"
    return (cg.path("memory") / name).read_text().strip()


def test_a_busy_process_is_held_to_its_quota(
    layout: CgroupLayout, parent: str, start: Start
) -> None:
    cg = VmCgroup(layout, str(uuid.uuid4()), parent)
    cg.create()
    child = start([sys.executable, "-c", BUSY])
    cg.attach(child.pid)
    assert cg.pids() == {child.pid}

    # Applied to the running process's cgroup.
    cg.apply(CgroupSettings(cpu_quota_cores=0.2, memory_max_bytes=256 << 20, pids_max=64))
    throttled = cg.usage().throttled_count
    share = _cpu_share(cg, MEASURE_S)
    assert 0.10 <= share <= 0.35, f"{share:.0%} of a core with a quota of 20%"
    assert cg.usage().throttled_count > throttled

    assert _memory_limit(cg) == str(256 << 20)
    cg.apply(CgroupSettings(cpu_quota_cores=None, memory_max_bytes=None))
    unlimited = _memory_limit(cg)
    assert unlimited == "max" or int(unlimited) >= 1 << 62

    child.send_signal(signal.SIGKILL)
    child.wait()
    cg.remove()
    assert not cg.exists()
    assert not any(d.exists() for d in cg.dirs())


def test_a_launcher_enters_the_cgroup_before_exec(layout: CgroupLayout, parent: str) -> None:
    cg = VmCgroup(layout, str(uuid.uuid4()), parent)
    cg.create()
    # As process.spawn would: the shell writes its pid, then execs the program.
    script = 'for f in "$@"; do echo $$ > "$f" || exit 1; done; exec "$0" -c "$PROGRAM"'
    program = "print(open('/proc/self/cgroup').read())"
    files = [str(f) for f in cg.procs_files()]
    env = {**os.environ, "PROGRAM": program}
    done = subprocess.run(
        ["sh", "-c", script, sys.executable, *files],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    lines = [line.split(":", 2) for line in done.stdout.split()]
    if layout.version == 2:
        paths = [path for _, controllers, path in lines if not controllers]
    else:
        paths = [path for _, c, path in lines if layout.controllers & set(c.split(","))]
    assert len(paths) == len(cg.dirs())
    assert all(path.endswith(f"/{parent}/{cg.vm_id}") for path in paths), done.stdout
    cg.remove()
    assert not cg.exists()


def test_the_kernel_refusing_a_value_names_the_field(layout: CgroupLayout, parent: str) -> None:
    cg = VmCgroup(layout, str(uuid.uuid4()), parent)
    cg.create()
    with pytest.raises(InvalidArgument) as caught:
        cg.apply(CgroupSettings(cpu_quota_cores=1e12))
    assert caught.value.field == "cpu_quota_cores"
    assert str(cg.path("cpu")) in str(caught.value)


def test_stale_cgroups_are_removed(layout: CgroupLayout, parent: str) -> None:
    running, gone = (VmCgroup(layout, str(uuid.uuid4()), parent) for _ in range(2))
    running.create()
    gone.create()
    assert remove_stale(layout, {running.vm_id}, parent) == [gone.vm_id]
    assert running.exists()
    assert not gone.exists()
