"""The management APIs with 1,000 defined VMs: defining them, listing them, reading one,
many clients at once, and the same listing over CIM.

The VMs are the appliance booted from a kernel and initrd that lie once in the datastore
(``images/``): 64 MiB, one vCPU, no disks, each one small
``vm.toml`` and bootable, as a libvirt domain is one XML pointing at shared files.
``appliance: true`` would copy the kernel and initrd (16 MB) into every VM's directory
and time the disk, not the API.

thinvisor is asked through its REST API as its own CLI asks (an API token, HTTPS,
HTTP/1.1 keep-alive) and through CIM-XML with pywbem; libvirt through libvirt-python on
its unix socket, when libvirtd can be started (``bench.api_libvirt``).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from bench.api_load import Reader, cpu_percent, latency, rate, read_samples_ms, samples_ms
from bench.api_thinvisor import ThinvisorApi, basic_client, cim_connection, cim_enumerate
from bench.harness import Comparison, Round, alternate
from bench.hosts import ThinvisorHost

DEFINED = 1000
WARM_DEFINES = 20  # defined and deleted again before the measured blocks
IDLE_SECONDS = 2.0  # the management processes' CPU use, idle, per round and contender
LIST_SAMPLES = 10  # listings of all VMs per round and contender
GET_SAMPLES = 100  # reads of one VM per round and contender
BASIC_SAMPLES = 10  # reads with HTTP Basic per round (thinvisor only)
HEALTH_SAMPLES = 20  # requests that do nothing: the floor under every other figure
CIM_SAMPLES = 1  # CIM enumerations per round (thinvisor only)
CLIENTS = 8
RATE_SECONDS = 3.0


class Contender(Protocol):
    """What each side offers the benchmark: the same five operations on VMs by name."""

    def define(self, name: str) -> None: ...

    def delete(self, name: str) -> None: ...

    def list_all(self) -> int: ...

    def read(self, name: str) -> object: ...

    def reader(self) -> Reader: ...

    def manager_pids(self) -> list[int]: ...


def run(log: Callable[[str], None], rounds: int) -> list[Comparison]:
    """Every API figure, thinvisor against libvirt where libvirtd runs."""
    with contextlib.ExitStack() as stack:
        log("api: starting a thinvisor host")
        host = stack.enter_context(ThinvisorHost("api"))
        host.start()
        contenders: dict[str, Contender] = {
            "thinvisor": stack.enter_context(contextlib.closing(ThinvisorApi(host)))
        }
        peer, peer_note = open_peer(stack, log)
        if peer is not None:
            contenders["libvirt"] = peer
        names = [f"vm{n:04d}" for n in range(DEFINED)]
        results = define_all(contenders, names, log, rounds)
        results += read_all(contenders, host, names, log, rounds)
        annotate_peer(results, peer_note)
        return results


def open_peer(stack: contextlib.ExitStack, log: Callable[[str], None]) -> tuple[Any, str]:
    """libvirt's side, closed with ``stack``, or None and why there is none."""
    try:
        from bench import api_libvirt
    except ImportError as exc:
        return None, f"no libvirt peer: {exc}"
    try:
        peer = api_libvirt.open_api(stack, log)
    except api_libvirt.Unavailable as exc:
        return None, f"no libvirt peer: {exc}"
    return peer, api_libvirt.NOTE


def annotate_peer(results: list[Comparison], note: str) -> None:
    """How the peer was asked, on each comparison it is in; or, without a peer, why not
    (once)."""
    with_peer = [c for c in results if len(c.series) > 1]
    for comparison in with_peer or results[:1]:
        comparison.notes.append(note)


# Defining


def blocks_of(names: Sequence[str], count: int) -> list[list[str]]:
    size = -(-len(names) // count)
    return [list(names[i : i + size]) for i in range(0, len(names), size)]


def define_all(
    contenders: dict[str, Contender],
    names: Sequence[str],
    log: Callable[[str], None],
    rounds: int,
) -> list[Comparison]:
    """Define the VMs in ``rounds`` blocks, the contenders in turn block by block."""
    per_vm = Comparison(
        f"define one VM ({len(names):,} in {rounds} blocks, one client)", "define_ms", "ms"
    )
    total = Comparison(f"define {len(names):,} VMs (one client)", "define_total_s", "s")
    warm = [f"warm{n:02d}" for n in range(WARM_DEFINES)]
    blocks = [warm, *blocks_of(names, rounds)]
    spent: dict[str, float] = {}
    log(f"api: defining {len(names)} VMs in {rounds} blocks per contender")
    alternate(
        {c: definer(api, blocks, spent, c) for c, api in contenders.items()},
        {"define_ms": per_vm},
        rounds=len(blocks) - 1,
        warmup=1,
        log=log,
    )
    for name, api in contenders.items():
        for vm in warm:
            api.delete(vm)
        total.add(name, spent[name])
        count = api.list_all()
        if count != len(names):
            raise RuntimeError(f"{name}: {count} VMs defined, not {len(names)}")
    per_vm.notes.append(
        "round n is the mean over the n-th block of VMs, defined one request after "
        "another while the earlier blocks exist; thinvisor: POST /vms, then GET "
        f"/tasks/{{id}} every 10 ms until the task ends; warm-up: {WARM_DEFINES} VMs defined "
        "and deleted again"
    )
    total.notes.append("the sum of the blocks")
    return [per_vm, total]


def definer(api: Contender, blocks: list[list[str]], spent: dict[str, float], name: str) -> Round:
    """A round that defines the next block; the first (the warm-up) is not counted."""
    todo: Iterator[tuple[int, list[str]]] = iter(enumerate(blocks))
    spent[name] = 0.0

    def one() -> dict[str, float]:
        index, block = next(todo)
        started = time.perf_counter()
        for vm in block:
            api.define(vm)
        seconds = time.perf_counter() - started
        if index > 0:
            spent[name] += seconds
        return {"define_ms": seconds * 1000 / len(block)}

    return one


# Reading


COMPARISONS = {
    "idle_cpu": ("management processes' CPU use while idle", "% of a core"),
    "list_ms_median": ("list all VMs: median", "ms"),
    "list_ms_p99": ("list all VMs: p99", "ms"),
    "get_ms_median": ("read one VM: median", "ms"),
    "get_ms_p99": ("read one VM: p99", "ms"),
    "rps": (f"read one VM, {CLIENTS} concurrent clients (higher is better)", "requests/s"),
    "basic_ms_median": ("read one VM with HTTP Basic auth: median", "ms"),
    "health_ms_median": ("GET /health (no authentication, no work): median", "ms"),
    "cim_enum_s": ("CIM EnumerateInstances TV_ComputerSystem: median", "s"),
}


def read_all(
    contenders: dict[str, Contender],
    host: ThinvisorHost,
    names: Sequence[str],
    log: Callable[[str], None],
    rounds: int,
) -> list[Comparison]:
    """Latency of listing and reading, the rate of 8 clients, CIM: round after round."""
    comparisons = {m: Comparison(t, m, u) for m, (t, u) in COMPARISONS.items()}
    pooled: dict[tuple[str, str], list[float]] = {}
    plays: dict[str, Round] = {c: reading(c, api, names, pooled) for c, api in contenders.items()}
    with basic_client(host) as basic, contextlib.closing(cim_connection(host)) as cim:
        plays["thinvisor"] = with_extras(plays["thinvisor"], thinvisor_extras(basic, cim, names))
        log(f"api: reading, {rounds} rounds after a warm-up")
        alternate(plays, comparisons, rounds=rounds, warmup=1, log=log)
    annotate(comparisons, pooled, len(names))
    return list(comparisons.values())


def reading(
    contender: str, api: Contender, names: Sequence[str], pooled: dict[tuple[str, str], list[float]]
) -> Round:
    seeds = iter(range(1_000_000))

    def one() -> dict[str, float]:
        idle = cpu_percent(api.manager_pids(), IDLE_SECONDS)
        listed = samples_ms(api.list_all, LIST_SAMPLES)
        read = read_samples_ms(api.read, names, GET_SAMPLES, next(seeds))
        pooled.setdefault((contender, "list"), []).extend(listed)
        pooled.setdefault((contender, "get"), []).extend(read)
        values = {"idle_cpu": idle} | latency("list_ms", listed) | latency("get_ms", read)
        values["rps"] = rate(api.reader, names, CLIENTS, RATE_SECONDS)
        return values

    return one


def thinvisor_extras(basic: Any, cim: Any, names: Sequence[str]) -> Round:
    """What only thinvisor offers: HTTP Basic on every request, and CIM."""

    def get_basic(name: str) -> None:
        basic.get(f"/vms/{name}").raise_for_status()

    def get_health() -> None:
        basic.get("/health").raise_for_status()

    def one() -> dict[str, float]:
        with_basic = read_samples_ms(get_basic, names, BASIC_SAMPLES, seed=0)
        health = samples_ms(get_health, HEALTH_SAMPLES)
        enumerated = []
        for _ in range(CIM_SAMPLES):
            started = time.perf_counter()
            count = cim_enumerate(cim)
            enumerated.append(time.perf_counter() - started)
            if count != len(names) + 1:
                raise RuntimeError(f"CIM enumerated {count} systems, not {len(names) + 1}")
        return {
            "basic_ms_median": statistics.median(with_basic),
            "health_ms_median": statistics.median(health),
            "cim_enum_s": statistics.median(enumerated),
        }

    return one


def with_extras(main: Round, extra: Round) -> Round:
    return lambda: main() | extra()


def annotate(
    comparisons: dict[str, Comparison], pooled: dict[tuple[str, str], list[float]], defined: int
) -> None:
    """Say what each figure is, and add the p99 over all rounds' samples together."""
    for (contender, kind), values in sorted(pooled.items()):
        target = comparisons[f"{kind}_ms_p99"]
        target.notes.append(
            f"{contender}: p99 over all {len(values)} samples of all rounds "
            f"{statistics.quantiles(values, n=100, method='inclusive')[98]:.1f} ms"
        )
    listing = (
        f"{defined:,} VMs, {LIST_SAMPLES} listings per round; thinvisor: GET /vms (name, "
        "power state and whole spec of each VM)"
    )
    reading_one = (
        f"{GET_SAMPLES} reads per round of VMs picked at random; thinvisor: GET /vms/{{vm}} "
        "(power state and spec)"
    )
    for metric in ("list_ms_median", "list_ms_p99"):
        comparisons[metric].notes.append(listing)
    for metric in ("get_ms_median", "get_ms_p99"):
        comparisons[metric].notes.append(reading_one)
    comparisons["idle_cpu"].notes.append(
        f"over {IDLE_SECONDS:g} s before each round's requests, {defined:,} VMs defined, none "
        "running; thinvisor: the agent; libvirt: libvirtd + virtlogd"
    )
    comparisons["rps"].notes.append(
        f"{CLIENTS} threads of one client process for {RATE_SECONDS:g} s, each with its own "
        "connection, reading VMs picked at random back to back; the clients share the "
        "machine's 2 cores with the server"
    )
    comparisons["basic_ms_median"].notes.append(
        f"{BASIC_SAMPLES} reads per round; the agent verifies the password's argon2id hash "
        "on every request: clients should trade it for a token (POST /auth/login)"
    )
    comparisons["health_ms_median"].notes.append(
        f"{HEALTH_SAMPLES} per round on a kept-alive connection: what every request costs "
        "before any work (TLS, HTTP, the event loop, TCP on loopback)"
    )
    comparisons["cim_enum_s"].notes.append(
        f"pywbem over HTTPS with HTTP Basic, {CIM_SAMPLES} per round; {defined + 1:,} "
        "instances (the host and every VM); no peer (libvirt has no CIM server)"
    )
