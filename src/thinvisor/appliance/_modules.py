"""Kernel modules from an unpacked Debian kernel package: find, resolve, order.

Debian's package may not ship ``modules.dep``, so dependencies come from each module's
``.modinfo`` ELF section (``depends=`` and ``softdep=pre:``), read here without kmod.
"""

from __future__ import annotations

import gzip
import lzma
import struct
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from thinvisor.errors import ApplianceBuildError

_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def module_name(filename: str) -> str:
    """``virtio-rng.ko.xz`` -> ``virtio_rng``: the kernel treats ``-`` and ``_`` alike."""
    for suffix in _SUFFIXES:
        if filename.endswith(suffix):
            filename = filename[: -len(suffix)]
            break
    return filename.replace("-", "_")


def parse_modinfo(elf: bytes) -> dict[str, list[str]]:
    """The ``key=value`` strings of an ELF object's ``.modinfo`` section."""
    section = _elf_section(elf, b".modinfo")
    info: dict[str, list[str]] = {}
    for item in section.split(b"\0"):
        key, sep, value = item.decode("utf-8", "replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


def _elf_section(elf: bytes, wanted: bytes) -> bytes:
    if elf[:4] != b"\x7fELF" or elf[4] not in (1, 2) or elf[5] not in (1, 2):
        raise ValueError("not an ELF object")
    end = "<" if elf[5] == 1 else ">"
    if elf[4] == 2:  # ELF64: e_shoff, then e_shentsize/e_shnum/e_shstrndx; Elf64_Shdr
        (shoff,) = struct.unpack_from(end + "Q", elf, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", elf, 0x3A)
        shdr = end + "IIQQQQ"
    else:
        (shoff,) = struct.unpack_from(end + "I", elf, 0x20)
        shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", elf, 0x2E)
        shdr = end + "IIIIII"
    # (sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size)
    headers = [struct.unpack_from(shdr, elf, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx]
    names = elf[strtab[4] : strtab[4] + strtab[5]]
    for header in headers:
        if names[header[0] : names.index(b"\0", header[0])] == wanted:
            return elf[header[4] : header[4] + header[5]]
    raise ValueError(f"no {wanted.decode()} section")


def read_module(path: Path) -> bytes:
    """A module's ELF bytes, decompressed if the package ships it compressed."""
    try:
        if path.name.endswith(".ko.xz"):
            return lzma.decompress(path.read_bytes())
        if path.name.endswith(".ko.gz"):
            return gzip.decompress(path.read_bytes())
        if path.name.endswith(".ko.zst"):
            # No zstd in the standard library before Python 3.14.
            done = subprocess.run(["zstd", "-dcq", str(path)], capture_output=True, check=True)
            return done.stdout
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ApplianceBuildError(f"cannot read {path.name}: {exc.strerror}") from exc
    except (OSError, lzma.LZMAError, subprocess.CalledProcessError) as exc:
        raise ApplianceBuildError(f"cannot decompress {path.name}: {exc}") from exc


@dataclass(frozen=True)
class KernelModule:
    name: str
    relpath: str  # under lib/modules/<release>/, without the compression suffix
    data: bytes
    depends: tuple[str, ...]
    softdeps: tuple[str, ...]  # "pre:" soft dependencies


@dataclass(frozen=True)
class ModuleSelection:
    """The outcome of resolving the modules the appliance asks for."""

    modules: tuple[KernelModule, ...]  # in load order
    builtin: tuple[str, ...]  # asked for, but built into the kernel
    missing: tuple[str, ...]  # optional, and neither a module nor built in


class ModuleTree:
    """The modules of one kernel release, as unpacked from its package."""

    def __init__(self, moddir: Path, extra_builtin: Iterable[str] = ()) -> None:
        self.moddir = moddir
        self.files = _index(moddir)
        self.builtin = _builtin(moddir) | frozenset(extra_builtin)

    def select(self, required: Sequence[str], optional: Sequence[str]) -> ModuleSelection:
        """The wanted modules that exist as modules, with every dependency, in load order."""
        builtin, missing, roots = [], [], []
        for name in (*required, *optional):
            if name in self.files:
                roots.append(name)
            elif name in self.builtin:
                builtin.append(name)
            elif name in required:
                raise ApplianceBuildError(f"kernel module {name} is neither a module nor built in")
            else:
                missing.append(name)
        loaded: dict[str, KernelModule] = {}
        self._load_closure(roots, loaded)
        order = load_order(roots, {n: (*m.softdeps, *m.depends) for n, m in loaded.items()})
        return ModuleSelection(tuple(loaded[n] for n in order), tuple(builtin), tuple(missing))

    def _load_closure(self, names: Iterable[str], loaded: dict[str, KernelModule]) -> None:
        for name in names:
            if name in loaded:
                continue
            module = self._read(name)
            loaded[name] = module
            for dep in module.depends:
                if dep not in self.files and dep not in self.builtin:
                    raise ApplianceBuildError(f"kernel module {name} depends on missing {dep}")
            wanted = (*module.depends, *module.softdeps)
            self._load_closure([d for d in wanted if d in self.files], loaded)

    def _read(self, name: str) -> KernelModule:
        path = self.files[name]
        data = read_module(path)
        try:
            info = parse_modinfo(data)
        except (ValueError, struct.error, IndexError) as exc:
            raise ApplianceBuildError(f"kernel module {path.name}: {exc}") from exc
        depends = tuple(d for v in info.get("depends", []) for d in v.split(",") if d)
        softdeps = tuple(d for d in _soft_pre(info.get("softdep", [])) if d in self.files)
        relpath = path.relative_to(self.moddir).as_posix()
        relpath = relpath[: relpath.rindex(".ko")] + ".ko"
        return KernelModule(name, relpath, data, depends, softdeps)


def load_order(roots: Sequence[str], depends: Mapping[str, Sequence[str]]) -> list[str]:
    """Every module reachable from ``roots``, each after all of its dependencies.

    Deterministic: roots in the order given, dependencies by name. A name absent from
    ``depends`` has no dependencies (built in, or outside the selection).
    """
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = " -> ".join((*chain[chain.index(name) :], name))
            raise ApplianceBuildError(f"kernel module dependency cycle: {cycle}")
        state[name] = "visiting"
        for dep in sorted(set(depends.get(name, ()))):
            if dep in depends:
                visit(dep, (*chain, name))
        state[name] = "done"
        order.append(name)

    for root in roots:
        visit(root, ())
    return order


def _soft_pre(values: Iterable[str]) -> list[str]:
    names: list[str] = []
    for value in values:
        section = ""
        for word in value.split():
            if word.endswith(":"):
                section = word
            elif section == "pre:":
                names.append(word.replace("-", "_"))
    return names


def _index(moddir: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted((moddir / "kernel").rglob("*.ko*")):
        if path.name.endswith(_SUFFIXES):
            files.setdefault(module_name(path.name), path)
    if not files:
        raise ApplianceBuildError(f"no kernel modules under {moddir}")
    return files


def _builtin(moddir: Path) -> frozenset[str]:
    try:
        lines = (moddir / "modules.builtin").read_text().split()
    except OSError:
        return frozenset()
    return frozenset(module_name(line.rpartition("/")[2]) for line in lines)
