"""``python -m bench [power] [boot] [api] [density] [migration] [--rounds N]``: run the
benchmarks named (all of them when none is), in that order, and write the report
(``bench.report``).

A benchmark that fails is reported as failed and the others still run; the command then
exits with status 1. Ctrl-C or SIGTERM stops the run: every benchmark cleans up after
itself on the way out, and no report is written.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import thinvisor
from bench import report
from bench.harness import DEFAULT_ROUNDS, Comparison
from thinvisor.config import HostConfig
from thinvisor.host.engine.accel import choose_accel
from thinvisor.host.hostinfo import host_facts

BENCHMARKS = ("power", "boot", "api", "density", "migration")
REPO = Path(__file__).resolve().parent.parent


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark thinvisor against QEMU started by hand and libvirt.",
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(BENCHMARKS)}"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=DEFAULT_ROUNDS,
        help=f"recorded rounds after the warm-up (default {DEFAULT_ROUNDS})",
    )
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}: choose from {', '.join(BENCHMARKS)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    # Always in the canonical order, each once.
    args.names = [n for n in BENCHMARKS if n in args.names] or list(BENCHMARKS)
    return args


@dataclass
class Log:
    """Progress lines on stdout, each with the time since the run started."""

    started: float

    def __call__(self, line: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f} s] {line}", flush=True)


def _command_output(*argv: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    except OSError:
        return "not installed"
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else "unknown"


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.partition("=")[2].strip('"')
    except OSError:
        pass
    return platform.system()


def _thinvisor_version() -> str:
    commit = _command_output("git", "-C", str(REPO), "describe", "--always", "--dirty")
    return f"{thinvisor.__version__} ({commit})"


def _libvirt_version() -> str:
    daemon = _command_output("libvirtd", "--version")
    try:
        import libvirt

        major, rest = divmod(libvirt.getVersion(), 1_000_000)
        python = f"libvirt-python {major}.{rest // 1000}.{rest % 1000}"
    except ImportError:
        python = "libvirt-python not installed"
    return f"{daemon}; {python}"


def describe_machine() -> dict[str, Any]:
    """What the figures were measured on."""
    facts = host_facts()
    accel = choose_accel(HostConfig().accel)
    return {
        "cpu_model": facts.cpu_model,
        "cores": facts.cpus,
        "memory_mib": facts.memory_total_mib,
        "os": _os_name(),
        "kernel": f"{platform.release()} {platform.version()}",
        "qemu": _command_output(HostConfig().qemu_binary, "--version"),
        "libvirt": _libvirt_version(),
        "thinvisor": _thinvisor_version(),
        "accelerator": {"name": accel.name, "reason": accel.reason},
        "python": platform.python_version(),
    }


def as_dict(item: Comparison | dict[str, Any]) -> dict[str, Any]:
    return item.to_dict() if isinstance(item, Comparison) else item


def run_one(name: str, log: Callable[[str], None], rounds: int) -> list[dict[str, Any]]:
    module = importlib.import_module(f"bench.{name}")
    return [as_dict(item) for item in module.run(log, rounds)]


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # clean up as on Ctrl-C
    started = time.monotonic()
    now = datetime.now(UTC)
    log = Log(started)
    log(f"benchmarks: {', '.join(args.names)}; {args.rounds} rounds after a warm-up")
    run: dict[str, Any] = {
        "id": now.strftime("%Y%m%dT%H%M%SZ"),
        "started": now.strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "rounds": args.rounds,
        "machine": describe_machine(),
        "benchmarks": {},
        "errors": {},
    }
    log(f"machine: {run['machine']['cpu_model']}, {run['machine']['cores']} cores, "
        f"{run['machine']['accelerator']['name']}")  # fmt: skip
    for name in args.names:
        log(f"== {name}")
        began = time.monotonic()
        try:
            results = run_one(name, log, args.rounds)
        except Exception as exc:
            traceback.print_exc()
            run["errors"][name] = f"{type(exc).__name__}: {exc}"
            log(f"== {name} failed: {run['errors'][name]}")
            continue
        run["benchmarks"][name] = {"duration_s": time.monotonic() - began, "results": results}
        log(f"== {name} done in {time.monotonic() - began:.0f} s")
    run["duration_s"] = time.monotonic() - started
    for path in report.write(run):
        log(f"wrote {os.path.relpath(path)}")
    return 1 if run["errors"] else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: no report written", file=sys.stderr)
        sys.exit(130)
