"""Debian packages for the appliance: resolve versions, download, unpack.

Nothing is installed on the host: ``apt-get download`` fetches a ``.deb`` into a work
directory and ``dpkg-deb -x`` unpacks it there.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from thinvisor.errors import ApplianceBuildError

log = logging.getLogger(__name__)

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
_KERNEL_PACKAGE = re.compile(r"linux-image-\d[\w.+~-]*-cloud-amd64")


@dataclass(frozen=True)
class Package:
    name: str
    version: str

    @property
    def spec(self) -> str:
        return f"{self.name}={self.version}"


def run_tool(argv: list[str], *, cwd: Path | None = None) -> str:
    """Run a packaging tool; its failure becomes an ApplianceBuildError."""
    log.debug("running %s", " ".join(argv))
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=True)
    except FileNotFoundError as exc:
        raise ApplianceBuildError(f"{argv[0]} is not installed") from exc
    except subprocess.CalledProcessError as exc:
        raise ApplianceBuildError(f"{' '.join(argv[:2])} failed: {_reason(exc.stderr)}") from exc
    for line in done.stderr.splitlines():
        log.debug("%s: %s", argv[0], line)
    return done.stdout


def _reason(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")]
    return (errors or lines or ["no message"])[-1]


def resolve_packages() -> tuple[Package, Package]:
    """The kernel package the cloud metapackage points to, and busybox-static, with the
    candidate versions apt would fetch. Reads apt's lists only; no network."""
    depends = run_tool(["apt-cache", "depends", "--important", KERNEL_METAPACKAGE])
    names = [
        line.split(":", 1)[1].strip()
        for line in depends.splitlines()
        if line.strip().startswith(("Depends:", "|Depends:"))
    ]
    kernels = [name for name in names if _KERNEL_PACKAGE.fullmatch(name)]
    if not kernels:
        raise ApplianceBuildError(f"{KERNEL_METAPACKAGE} does not depend on a kernel image")
    versions = _candidates([kernels[0], BUSYBOX_PACKAGE])
    return Package(kernels[0], versions[kernels[0]]), Package(
        BUSYBOX_PACKAGE, versions[BUSYBOX_PACKAGE]
    )


def _candidates(names: list[str]) -> dict[str, str]:
    policy = run_tool(["apt-cache", "policy", *names])
    found: dict[str, str] = {}
    current = ""
    for line in policy.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = line[:-1]
        elif line.strip().startswith("Candidate:"):
            found[current] = line.split(":", 1)[1].strip()
    for name in names:
        if found.get(name, "(none)") == "(none)":
            raise ApplianceBuildError(f"apt has no candidate version of {name}")
    return found


def update_lists() -> None:
    run_tool(["apt-get", "update", "-q"])


def download(packages: list[Package], dest: Path) -> dict[str, Path]:
    """Fetch the exact versions into ``dest``; maps package name to its ``.deb``."""
    argv = ["apt-get", "download", "-q"]
    if os.geteuid() == 0:
        # apt's _apt sandbox user cannot write into our private work directory.
        argv += ["-o", "APT::Sandbox::User=root"]
    run_tool([*argv, *(p.spec for p in packages)], cwd=dest)
    debs: dict[str, Path] = {}
    for package in packages:
        matches = sorted(dest.glob(f"{package.name}_*.deb"))
        if len(matches) != 1:
            raise ApplianceBuildError(f"apt-get download left no single .deb for {package.name}")
        debs[package.name] = matches[0]
    return debs


def unpack(deb: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    run_tool(["dpkg-deb", "-x", str(deb), str(dest)])
    return dest
