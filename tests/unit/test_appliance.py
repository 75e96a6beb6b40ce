"""The appliance's pure parts: the cpio writer, modinfo parsing, module ordering, cache."""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import random
import stat
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import thinvisor.appliance
from thinvisor.appliance import _build, _debian, _initramfs, _kernel
from thinvisor.appliance._cache import FORMAT, Appliance, load_build
from thinvisor.appliance._cpio import CpioArchive, CpioEntry, write_newc
from thinvisor.appliance._modules import (
    KernelModule,
    ModuleTree,
    load_order,
    module_name,
    parse_modinfo,
)
from thinvisor.errors import ApplianceBuildError


def make_module(**modinfo: str) -> bytes:
    """A minimal ELF64 relocatable object holding only a ``.modinfo`` section."""
    info = b"".join(f"{key}={value}".encode() + b"\0" for key, value in modinfo.items())
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    info_at = 64
    shstr_at = info_at + len(info)
    shoff = (shstr_at + len(shstrtab) + 7) & ~7
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    body = header + info + shstrtab
    body += bytes(shoff - len(body))
    sections = [
        struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        struct.pack("<IIQQQQIIQQ", 1, 1, 2, 0, info_at, len(info), 0, 0, 1, 0),
        struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, shstr_at, len(shstrtab), 0, 0, 1, 0),
    ]
    return body + b"".join(sections)


def cpio_list(archive: bytes, *, verbose: bool = False) -> list[str]:
    done = subprocess.run(
        ["cpio", "-t", "--quiet", *(["-v"] if verbose else [])],
        input=archive,
        capture_output=True,
        check=True,
    )
    return done.stdout.decode().splitlines()


def sample_archive() -> CpioArchive:
    archive = CpioArchive()
    archive.add_file("bin/busybox", b"\x7fELF" + bytes(range(256)) * 5, 0o755)
    archive.add_symlink("bin/sh", "busybox")
    archive.add_dir("tmp", 0o1777)
    archive.add_char_device("dev/console", 5, 1)
    archive.add_file("etc/odd", b"abc")  # 3 bytes: data needs padding
    archive.add_file("init", b"#!/bin/sh\n", 0o755)
    return archive


def test_public_api() -> None:
    assert sorted(thinvisor.appliance.__all__) == ["Appliance", "build_appliance", "find_appliance"]


# --- cpio ---------------------------------------------------------------------------------


def test_cpio_lists_every_entry_sorted_with_parents() -> None:
    names = cpio_list(sample_archive().to_bytes())
    assert names == [
        "bin", "bin/busybox", "bin/sh", "dev", "dev/console", "etc", "etc/odd", "init", "tmp",
    ]  # fmt: skip


def test_cpio_round_trips_through_the_cpio_tool(tmp_path: Path) -> None:
    archive = sample_archive()
    archive.add_file("etc/empty", b"")
    subprocess.run(
        ["cpio", "-i", "--quiet", "-d", "--no-absolute-filenames", "--nonmatching", "dev/*"],
        input=archive.to_bytes(),
        cwd=tmp_path,
        check=True,
    )
    assert (tmp_path / "bin/busybox").read_bytes() == b"\x7fELF" + bytes(range(256)) * 5
    assert stat.S_IMODE((tmp_path / "bin/busybox").stat().st_mode) == 0o755
    assert (tmp_path / "bin/sh").readlink() == Path("busybox")
    assert (tmp_path / "etc/odd").read_bytes() == b"abc"
    assert (tmp_path / "etc/empty").read_bytes() == b""
    assert stat.S_IMODE((tmp_path / "tmp").stat().st_mode) == 0o1777


def test_cpio_device_nodes_and_fixed_metadata() -> None:
    listing = cpio_list(sample_archive().to_bytes(), verbose=True)
    console = next(line for line in listing if line.endswith("dev/console"))
    assert console.startswith("crw-------")
    assert "5,   1" in console or "5, 1" in console
    assert all(" root     root " in line for line in listing)
    assert all(" 1970 " in line for line in listing)


def test_cpio_is_deterministic_whatever_the_insertion_order() -> None:
    forward = sample_archive()
    backward = CpioArchive()
    for entry in reversed(forward.entries()):
        backward.add(entry)
    assert forward.to_bytes() == backward.to_bytes()
    assert _initramfs.compress(forward) == _initramfs.compress(backward)


def test_cpio_layout_is_newc_aligned() -> None:
    data = write_newc([CpioEntry("a", stat.S_IFREG | 0o644, b"xyz")])
    assert data.startswith(b"070701")
    assert len(data) % 4 == 0
    assert data.index(b"070701", 6) % 4 == 0  # the trailer starts aligned
    assert data.endswith(b"TRAILER!!!\0\0\0\0")


@pytest.mark.parametrize("path", ["", "/", "../etc", "a/../../b"])
def test_cpio_rejects_bad_paths(path: str) -> None:
    with pytest.raises(ValueError):
        CpioArchive().add_file(path, b"")


# --- modules ------------------------------------------------------------------------------


def test_parse_modinfo_reads_the_elf_section() -> None:
    info = parse_modinfo(make_module(name="sr_mod", depends="scsi_mod,cdrom", license="GPL"))
    assert info["depends"] == ["scsi_mod,cdrom"]
    assert info["name"] == ["sr_mod"]


def test_parse_modinfo_rejects_non_elf() -> None:
    with pytest.raises(ValueError):
        parse_modinfo(b"not an elf file")


@pytest.mark.parametrize(
    ("filename", "name"),
    [("virtio_pci.ko", "virtio_pci"), ("virtio-rng.ko.xz", "virtio_rng"), ("a-b.ko.zst", "a_b")],
)
def test_module_names_use_underscores(filename: str, name: str) -> None:
    assert module_name(filename) == name


def test_load_order_puts_dependencies_first() -> None:
    depends = {
        "sr_mod": ["scsi_mod", "cdrom", "scsi_common"],
        "scsi_mod": ["scsi_common"],
        "scsi_common": [],
        "cdrom": [],
        "virtio_blk": ["virtio", "virtio_ring"],
        "virtio": ["virtio_ring"],
        "virtio_ring": [],
    }
    order = load_order(["virtio_blk", "sr_mod"], depends)
    assert order == [
        "virtio_ring",
        "virtio",
        "virtio_blk",
        "cdrom",
        "scsi_common",
        "scsi_mod",
        "sr_mod",
    ]
    for name, deps in depends.items():
        assert all(order.index(dep) < order.index(name) for dep in deps)


def test_load_order_skips_names_outside_the_selection() -> None:
    # "crc32c" is built in: it has no entry and is not loaded.
    assert load_order(["libcrc32c"], {"libcrc32c": ["crc32c"]}) == ["libcrc32c"]


def test_load_order_reports_cycles() -> None:
    with pytest.raises(ApplianceBuildError, match="a -> b -> a"):
        load_order(["a"], {"a": ["b"], "b": ["a"]})


def fake_moddir(tmp_path: Path) -> Path:
    moddir = tmp_path / "lib/modules/6.1.0-1-cloud-amd64"
    modules = {
        "drivers/scsi/sr_mod.ko": make_module(name="sr_mod", depends="scsi_mod,cdrom"),
        "drivers/scsi/scsi_mod.ko": make_module(name="scsi_mod", depends=""),
        "drivers/cdrom/cdrom.ko.xz": lzma.compress(make_module(name="cdrom", depends="")),
        "drivers/net/virtio-net.ko": make_module(
            name="virtio_net", depends="virtio", softdep="pre: net-failover"
        ),
        "drivers/net/net_failover.ko": make_module(name="net_failover", depends=""),
        "drivers/acpi/button.ko": make_module(name="button", depends="missing_one"),
    }
    for relpath, data in modules.items():
        (moddir / "kernel" / relpath).parent.mkdir(parents=True, exist_ok=True)
        (moddir / "kernel" / relpath).write_bytes(data)
    (moddir / "modules.builtin").write_text("kernel/drivers/virtio/virtio.ko\n")
    return moddir


def test_module_tree_resolves_dependencies_and_built_ins(tmp_path: Path) -> None:
    tree = ModuleTree(fake_moddir(tmp_path), extra_builtin=["pciehp"])
    selection = tree.select(["sr_mod", "virtio_net", "virtio"], ["ahci", "pciehp"])
    assert [m.name for m in selection.modules] == [
        "cdrom", "scsi_mod", "sr_mod", "net_failover", "virtio_net",
    ]  # fmt: skip
    assert selection.builtin == ("virtio", "pciehp")
    assert selection.missing == ("ahci",)
    cdrom = selection.modules[0]
    assert cdrom.relpath == "kernel/drivers/cdrom/cdrom.ko"  # decompressed
    assert cdrom.data.startswith(b"\x7fELF")


def test_module_tree_refuses_missing_required_modules(tmp_path: Path) -> None:
    tree = ModuleTree(fake_moddir(tmp_path))
    with pytest.raises(ApplianceBuildError, match="nonexistent"):
        tree.select(["nonexistent"], [])
    with pytest.raises(ApplianceBuildError, match="depends on missing missing_one"):
        tree.select(["button"], [])


# --- initramfs ----------------------------------------------------------------------------


def test_initramfs_holds_init_busybox_and_ordered_modules() -> None:
    modules = (
        KernelModule("cdrom", "kernel/drivers/cdrom/cdrom.ko", b"c", (), ()),
        KernelModule("sr_mod", "kernel/drivers/scsi/sr_mod.ko", b"s", ("cdrom",), ()),
    )
    scripts = _initramfs.script_sources()
    archive = _initramfs.build_archive(b"busybox", "6.1.0-1-cloud-amd64", modules, scripts)
    data = archive.to_bytes()
    names = set(cpio_list(data))
    for name in ("init", "bin/busybox", "bin/sh", "bin/acpid", "bin/udhcpc", "dev/console"):
        assert name in names
    assert "etc/acpi/PWRF/00000080" in names
    order = archive.get("etc/appliance/modules").data.decode().split()
    assert order == [
        "/lib/modules/6.1.0-1-cloud-amd64/kernel/drivers/cdrom/cdrom.ko",
        "/lib/modules/6.1.0-1-cloud-amd64/kernel/drivers/scsi/sr_mod.ko",
    ]
    again = _initramfs.build_archive(b"busybox", "6.1.0-1-cloud-amd64", modules, scripts)
    assert _initramfs.compress(again) == _initramfs.compress(archive)


def test_init_script_prints_the_ready_line_and_never_exits() -> None:
    init = _initramfs.script_sources()["init"].decode()
    assert "THINVISOR-APPLIANCE-READY uptime=" in init
    assert init.rstrip().endswith("done")
    assert "THINVISOR-APPLIANCE-POWEROFF" in _initramfs.script_sources()["poweroff"].decode()


# --- the kernel image ---------------------------------------------------------------------

MIB = 1 << 20
LOAD = 0x1000000  # the kernel's physical load address
KVA = 0xFFFFFFFF80000000  # __START_KERNEL_map
SCRATCH_SIZE = 2 * MIB


def elf_section(name: int, kind: int, addr: int, offset: int, size: int) -> bytes:
    return struct.pack("<IIQQQQIIQQ", name, kind, 2 if addr else 0, addr, offset, size, 0, 0, 1, 0)


def make_vmlinux() -> tuple[bytes, bytes]:
    """A kernel ELF laid out as the kernel build does it, and its relocations: 2 MiB
    aligned segments in the file, the last one ending in ``.init.scratch``."""
    rng = random.Random(7)
    text, data, init = (rng.randbytes(n) for n in (0x3000, 0x2000, 0x1000))
    note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", LOAD)
    text = text[:0x100] + note + text[0x100 + len(note) :]
    # (paddr, file offset, memory size, bytes): init + .bss + .brk, then scratch on 2 MiB
    segments = [(LOAD, 0x200000, len(text), text), (LOAD + 2 * MIB, 0x400000, len(data), data)]
    segments.append((LOAD + 4 * MIB, 0x600000, 4 * MIB, init))
    shstrtab = b"\0.text\0.data\0.init.data\0.bss\0.brk\0.init.scratch\0.shstrtab\0"
    names = {n: shstrtab.index(n.encode() + b"\0") for n in (".text", ".data", ".init.data")}
    names |= {n: shstrtab.index(n.encode() + b"\0") for n in (".bss", ".brk", ".shstrtab")}
    scratch_at = LOAD + 6 * MIB
    file_end = 0x600000 + 4 * MIB
    sections = [
        bytes(64),
        elf_section(names[".text"], 1, KVA + LOAD, 0x200000, len(text)),
        elf_section(names[".data"], 1, KVA + LOAD + 2 * MIB, 0x400000, len(data)),
        elf_section(names[".init.data"], 1, KVA + LOAD + 4 * MIB, 0x600000, len(init)),
        elf_section(names[".bss"], 8, KVA + LOAD + 4 * MIB + 0x1000, 0x601000, 0x3000),
        elf_section(names[".brk"], 8, KVA + LOAD + 4 * MIB + 0x4000, 0x604000, 0x1000),
        elf_section(shstrtab.index(b".init.scratch"), 1, KVA + scratch_at, 0x800000, 2 * MIB),
        elf_section(names[".shstrtab"], 3, 0, file_end, len(shstrtab)),
    ]
    shoff = file_end + len(shstrtab)
    phdrs = [
        struct.pack("<IIQQQQQQ", 1, 5, off, KVA + paddr, paddr, size, size, 2 * MIB)
        for paddr, off, size, _ in segments
    ]
    phdrs.append(struct.pack("<IIQQQQQQ", 4, 4, 0x200100, KVA + LOAD + 0x100, LOAD + 0x100,
                             len(note), len(note), 4))  # fmt: skip
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, 62, 1, LOAD, 64, shoff, 0, 64, 56,
                         len(phdrs), 64, len(sections), len(sections) - 1)  # fmt: skip
    elf = bytearray(shoff)
    elf[: 64 + 56 * len(phdrs)] = header + b"".join(phdrs)
    for _, off, _, content in segments:
        elf[off : off + len(content)] = content
    elf[file_end:shoff] = shstrtab
    relocs = bytes(4) + rng.randbytes(40) + bytes(4) + rng.randbytes(20)
    return bytes(elf) + b"".join(sections), relocs


def make_bzimage(output: bytes, compress: Callable[[bytes], bytes]) -> bytes:
    """A bzImage around ``output``: setup header, then a decompressor image holding the
    payload and, after it, its input_len and output_len, sized as header.S does."""
    payload = compress(output)
    if not payload.startswith(b"\x1f\x8b"):
        payload += struct.pack("<I", len(output))
    zo = bytes(0x100) + payload + bytes(0x40) + struct.pack("<II", len(payload), len(output))
    zo += bytes(0x200)
    zo_size = (len(zo) + 4095) // 4096 * 4096 + 0x3000  # with its .bss and page tables
    setup = bytearray(1024)
    setup[0x1F1] = 1
    struct.pack_into("<I", setup, 0x1F4, (len(zo) + 15) // 16)
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)
    struct.pack_into("<II", setup, 0x248, 0x100, len(payload))
    init_size = zo_size + _kernel.extract_offset(len(output), len(payload))
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + zo


def loaded_image(bzimage: bytes) -> tuple[bytearray, bytes]:
    """Memory from the load address up, once the decompressor's parse_elf() has moved
    the segments in place, and the relocations it then reads from the output's end."""
    payload_at, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    (init_size,) = struct.unpack_from("<I", bzimage, 0x260)
    payload = bzimage[1024 + payload_at : 1024 + payload_at + payload_length]
    output = _kernel.decompress(_kernel._format(payload), payload)
    # The decompressor's own input_len and output_len agree with the header.
    assert struct.pack("<II", payload_length, len(output)) in bzimage[1024 + payload_at :]
    memory = bytearray(output.ljust(init_size, b"\0"))
    phoff, phentsize, phnum = struct.unpack_from("<Q", output, 0x20)[0], 56, output[0x38]
    for i in range(phnum):
        kind, _, offset, _, paddr, filesz, _, align = struct.unpack_from(
            "<IIQQQQQQ", output, phoff + i * phentsize
        )
        if kind == 1:
            assert align % (2 * MIB) == 0  # parse_elf() refuses anything else
            memory[paddr - LOAD : paddr - LOAD + filesz] = memory[offset : offset + filesz]
    return memory, output[-68:]


def kernel_regions(memory: bytearray) -> list[bytes]:
    """The parts of a loaded image that are the kernel: its segments up to ``_end``."""
    spans = [(0, 0x3000), (2 * MIB, 2 * MIB + 0x2000), (4 * MIB, 4 * MIB + 0x5000)]
    return [bytes(memory[start:end]) for start, end in spans]


@pytest.mark.parametrize(
    "compress",
    [
        lambda data: gzip.compress(data, 9, mtime=0),
        lambda data: lzma.compress(data, lzma.FORMAT_XZ, lzma.CHECK_CRC32),
    ],
    ids=["gzip", "xz"],
)
def test_repacked_kernel_loads_the_same_and_unpacks_in_less_memory(
    compress: Callable[[bytes], bytes],
) -> None:
    vmlinux, relocs = make_vmlinux()
    stock = make_bzimage(vmlinux + relocs, compress)
    repacked = _kernel.repack(stock)
    assert len(repacked.image) == len(stock)
    assert repacked.image[:0x248] == stock[:0x248]  # the setup code is untouched
    before, stock_relocs = loaded_image(stock)
    after, new_relocs = loaded_image(repacked.image)
    assert kernel_regions(after) == kernel_regions(before)
    assert new_relocs == stock_relocs == relocs
    (init_size,) = struct.unpack_from("<I", repacked.image, 0x260)
    assert init_size == repacked.init_size < repacked.stock_init_size - 2 * MIB
    assert _kernel.repack(stock) == repacked  # deterministic


def test_relayout_drops_init_scratch_and_alignment_but_keeps_notes() -> None:
    vmlinux, relocs = make_vmlinux()
    output, kernel_size = _kernel.relayout(vmlinux + relocs)
    assert kernel_size == 4 * MIB + 0x5000  # up to _end, the end of .brk
    assert output.endswith(relocs)
    assert len(output) == _kernel.HEADROOM + kernel_size + len(relocs)
    phdrs = [struct.unpack_from("<IIQQQQQQ", output, 64 + i * 56) for i in range(4)]
    assert [(p[0], p[2], p[6]) for p in phdrs] == [
        (1, 0x1000, 0x3000), (1, 0x1000 + 2 * MIB, 0x2000), (1, 0x1000 + 4 * MIB, 0x5000),
        (4, 0x1100, 12 + 4 + 4),
    ]  # fmt: skip
    assert output[0x1100 + 12 : 0x1100 + 16] == b"Xen\0"
    assert struct.unpack_from("<Q", output, 0x28)[0] == 0  # no section headers


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda image: image[:0x202] + b"Nope" + image[0x206:], "not a bzImage"),
        (lambda image: image[:1024 + 0x100] + b"LZO!" + image[1024 + 0x104 :], "compressed as"),
        (lambda image: image.replace(struct.pack("<I", 0x20F), struct.pack("<I", 0x209), 1),
         "has no init_size"),
    ],
)  # fmt: skip
def test_repack_refuses_what_it_does_not_understand(mangle: Any, message: str) -> None:
    vmlinux, relocs = make_vmlinux()
    stock = make_bzimage(vmlinux + relocs, lambda data: gzip.compress(data, mtime=0))
    with pytest.raises(_kernel.RepackError, match=message):
        _kernel.repack(mangle(stock))


def test_build_keeps_a_kernel_it_cannot_repack() -> None:
    messages: list[str] = []
    image, info = _build._repack_kernel(b"not a kernel", messages.append)
    assert image == b"not a kernel"
    assert info == {
        "repacked": False,
        "reason": "the kernel is not a bzImage (no HdrS setup header)",
    }
    assert messages[-1].startswith("kernel left as packaged")


def test_command_line_keeps_early_boot_small() -> None:
    options = _build.CMDLINE.split()
    assert "initcall_blacklist=tracer_init_tracefs" in options
    assert "cgroup.memory=nokmem" in options


# --- Debian packages ----------------------------------------------------------------------


DEPENDS = """linux-image-cloud-amd64
  Depends: linux-image-6.1.0-56-cloud-amd64
"""
POLICY = """linux-image-6.1.0-56-cloud-amd64:
  Installed: (none)
  Candidate: 6.1.192-2
  Version table:
     6.1.192-2 500
busybox-static:
  Installed: 1:1.35.0-4
  Candidate: 1:1.35.0-4
"""


def test_resolve_packages_follows_the_metapackage(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {"depends": DEPENDS, "policy": POLICY}
    monkeypatch.setattr(_debian, "run_tool", lambda argv, cwd=None: answers[argv[1]])
    kernel, busybox = _debian.resolve_packages()
    assert kernel.spec == "linux-image-6.1.0-56-cloud-amd64=6.1.192-2"
    assert busybox.spec == "busybox-static=1:1.35.0-4"


def test_resolve_packages_without_a_candidate(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = POLICY.replace("Candidate: 6.1.192-2", "Candidate: (none)")
    answers = {"depends": DEPENDS, "policy": policy}
    monkeypatch.setattr(_debian, "run_tool", lambda argv, cwd=None: answers[argv[1]])
    with pytest.raises(ApplianceBuildError, match="no candidate"):
        _debian.resolve_packages()


def test_tool_failures_become_one_line_errors() -> None:
    with pytest.raises(ApplianceBuildError, match="is not installed") as missing:
        _debian.run_tool(["thinvisor-no-such-tool"])
    assert isinstance(missing.value.__cause__, FileNotFoundError)
    with pytest.raises(ApplianceBuildError, match=r"^sh -c failed: E: boom$") as failed:
        _debian.run_tool(["sh", "-c", "echo W: warn >&2; echo E: boom >&2; exit 100"])
    assert isinstance(failed.value.__cause__, subprocess.CalledProcessError)


# --- the cache ----------------------------------------------------------------------------


def test_find_appliance_ignores_unfinished_builds(tmp_path: Path) -> None:
    assert thinvisor.appliance.find_appliance(tmp_path) is None
    build = tmp_path / "appliance" / "6.1+abc"
    build.mkdir(parents=True)
    (build / "vmlinuz").write_bytes(b"kernel")
    (build / "initramfs.img").write_bytes(b"initrd")
    (tmp_path / "appliance" / "current").write_text("6.1+abc\n")
    assert thinvisor.appliance.find_appliance(tmp_path) is None  # no manifest yet
    files = {"vmlinuz": {"size": 6, "sha256": "x"}, "initramfs.img": {"size": 6, "sha256": "y"}}
    manifest = {"format": FORMAT - 1, "version": "6.1+abc", "cmdline": "console=ttyS0"}
    manifest["files"] = files
    (build / "manifest.json").write_text(json.dumps(manifest))
    assert thinvisor.appliance.find_appliance(tmp_path) is None  # an older recipe
    manifest["format"] = FORMAT
    (build / "manifest.json").write_text(json.dumps(manifest))
    found = thinvisor.appliance.find_appliance(tmp_path)
    assert found == Appliance(
        "6.1+abc", build / "vmlinuz", build / "initramfs.img", "console=ttyS0"
    )
    assert load_build(build, verify=True) is None  # the checksums do not match
    (build / "initramfs.img").write_bytes(b"short")
    assert thinvisor.appliance.find_appliance(tmp_path) is None


KERNEL = _debian.Package("linux-image-6.1.0-1-cloud-amd64", "6.1.1-1")
BUSYBOX = _debian.Package("busybox-static", "1:1.35.0-4")


def finished_build(root: Path, version: str) -> Path:
    build = root / "appliance" / version
    build.mkdir(parents=True)
    files = {}
    for name, data in (("vmlinuz", b"kernel"), ("initramfs.img", b"initrd")):
        (build / name).write_bytes(data)
        files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"format": FORMAT, "version": version, "cmdline": _build.CMDLINE, "files": files}
    (build / "manifest.json").write_text(json.dumps(manifest))
    return build


def test_build_refreshes_apt_lists_once_then_reuses_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def resolve() -> tuple[_debian.Package, _debian.Package]:
        calls.append("resolve")
        if "update" not in calls:
            raise ApplianceBuildError("apt has no candidate version of busybox-static")
        return KERNEL, BUSYBOX

    monkeypatch.setattr(_debian, "resolve_packages", resolve)
    monkeypatch.setattr(_debian, "update_lists", lambda: calls.append("update"))
    version = _build._version(KERNEL, BUSYBOX, _initramfs.script_sources())
    assert version.startswith("6.1.1-1+")
    build = finished_build(tmp_path, version)
    messages: list[str] = []
    found = thinvisor.appliance.build_appliance(tmp_path, progress=messages.append)
    assert calls == ["resolve", "update", "resolve"]
    assert found == Appliance(version, build / "vmlinuz", build / "initramfs.img", _build.CMDLINE)
    assert f"reusing build {version}" in messages
    assert thinvisor.appliance.find_appliance(tmp_path) == found
    assert [p.name for p in (tmp_path / "appliance").iterdir() if p.name.startswith(".b")] == []


def test_build_reports_a_failed_list_refresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(message: str) -> Any:
        def raiser() -> Any:
            raise ApplianceBuildError(message)

        return raiser

    monkeypatch.setattr(_debian, "resolve_packages", fail("apt has no candidate version of x"))
    monkeypatch.setattr(_debian, "update_lists", fail("apt-get update failed: E: offline"))
    with pytest.raises(ApplianceBuildError) as raised:
        thinvisor.appliance.build_appliance(tmp_path)
    assert str(raised.value) == (
        "apt has no candidate version of x; apt-get update failed too: "
        "apt-get update failed: E: offline"
    )
    assert "\n" not in str(raised.value)
