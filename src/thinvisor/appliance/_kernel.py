"""Repacking Debian's bzImage so that the kernel starts in 64 MiB of guest memory.

A bzImage's decompressor first moves itself to the end of a buffer of ``init_size``
bytes (a setup header field) that begins at the kernel's physical load address, 16 MiB,
then unpacks the kernel in place from the start of that buffer. ``init_size`` covers the
whole unpacked payload: the kernel's ELF file, with 2 MiB of file alignment between
segments and the 4 MiB ``.init.scratch`` section of zeros, and its relocations. For
Debian's cloud kernel that is about 51 MiB: the guest needs more than 67 MiB of RAM
before the kernel prints a line, and with 64 MiB it resets at once.

Repacking writes the same kernel as a tighter ELF: segments a page apart from the ELF
header, and no ``.init.scratch``, which only SME (host memory encryption) uses and which
lies after the kernel's ``_end``. The payload is compressed again as the kernel build
does it, in the same place, and the numbers that describe it are updated: ``input_len``
and ``output_len`` in the decompressor, ``payload_length`` and ``init_size`` in the
setup header. The kernel, its decompressor and its relocations are unchanged: it boots
from every boot loader, KASLR included. (The image's UEFI Secure Boot signature no
longer matches; guests boot it from BIOS or straight from QEMU.)
"""

from __future__ import annotations

import gzip
import lzma
import struct
import subprocess
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace

from thinvisor.errors import ApplianceBuildError

MIB = 1 << 20
PAGE = 4096
# Room for the ELF header and program headers before the first segment.
HEADROOM = PAGE
SCRATCH = b".init.scratch"
_PT_LOAD = 1
_PT_NOTE = 4
_SHF_ALLOC = 2
_SHT_NOBITS = 8
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_LENGTHS = struct.Struct("<II")  # the decompressor's input_len and output_len (piggy.S)


class RepackError(ApplianceBuildError):
    """The kernel image cannot be repacked (it still boots as packaged, in more memory)."""


@dataclass(frozen=True)
class Repacked:
    """A repacked bzImage, and the buffer it asks of the boot loader before and after."""

    image: bytes
    compression: str
    init_size: int
    stock_init_size: int


def repack(bzimage: bytes) -> Repacked:
    """``bzimage`` with a payload that needs less memory to unpack. Raises RepackError."""
    setup = _Setup.parse(bzimage)
    payload = bzimage[setup.payload_at : setup.payload_at + setup.payload_length]
    fmt = _format(payload)
    output = decompress(fmt, payload)
    zo_size = setup.init_size - extract_offset(len(output), len(payload))
    if zo_size % PAGE or not setup.zo_file_size <= zo_size < setup.zo_file_size + 16 * MIB:
        raise RepackError("the decompressor does not size its buffer as expected")
    unpacked, kernel_size = relayout(output)
    new_payload = fmt.pack(unpacked) + struct.pack("<I", len(unpacked))
    if len(new_payload) > len(payload):
        raise RepackError(f"the {fmt.name} payload would grow from {len(payload)} bytes")
    init_size = max(zo_size + extract_offset(len(unpacked), len(new_payload)), kernel_size)
    if init_size >= setup.init_size:
        raise RepackError("repacking would not make the kernel need less memory")
    image = bytearray(bzimage)
    at = _lengths_at(bzimage, len(payload), len(output))
    image[at : at + _LENGTHS.size] = _LENGTHS.pack(len(new_payload), len(unpacked))
    end = setup.payload_at + len(payload)
    image[setup.payload_at : end] = new_payload.ljust(len(payload), b"\0")
    struct.pack_into("<I", image, 0x24C, len(new_payload))
    struct.pack_into("<I", image, 0x260, init_size)
    return Repacked(bytes(image), fmt.name, init_size, setup.init_size)


def extract_offset(output_len: int, input_len: int) -> int:
    """How far above the output the compressed input must start for the decompressor
    to unpack in place (``ZO_z_min_extract_offset`` in arch/x86/boot/header.S)."""
    extra = (output_len >> 8) + 65536
    offset = output_len + extra - input_len if output_len > input_len else extra
    return _page_up(offset)


@dataclass(frozen=True)
class _Setup:
    """The setup header fields that locate and size the payload (Documentation/x86/boot)."""

    payload_at: int
    payload_length: int
    init_size: int
    zo_file_size: int  # the decompressor's image in the file: syssize

    @classmethod
    def parse(cls, bzimage: bytes) -> _Setup:
        if len(bzimage) < 0x270 or bzimage[0x202:0x206] != b"HdrS":
            raise RepackError("the kernel is not a bzImage (no HdrS setup header)")
        (protocol,) = struct.unpack_from("<H", bzimage, 0x206)
        if protocol < 0x20A:
            raise RepackError(f"boot protocol {protocol:#x} has no init_size")
        setup_size = ((bzimage[0x1F1] or 4) + 1) * 512
        (syssize,) = struct.unpack_from("<I", bzimage, 0x1F4)
        offset, length = struct.unpack_from("<II", bzimage, 0x248)
        (init_size,) = struct.unpack_from("<I", bzimage, 0x260)
        if length < 8 or setup_size + offset + length > len(bzimage):
            raise RepackError("the bzImage's payload lies outside the file")
        return cls(setup_size + offset, length, init_size, syssize * 16)


def _lengths_at(bzimage: bytes, input_len: int, output_len: int) -> int:
    """Where the decompressor keeps ``input_len`` and ``output_len``: one place only."""
    wanted = _LENGTHS.pack(input_len, output_len)
    at = bzimage.find(wanted)
    if at < 0 or bzimage.find(wanted, at + 1) >= 0:
        raise RepackError("cannot find the decompressor's input_len and output_len")
    return at


# --- compression, as the kernel build does it (arch/x86/boot/compressed/Makefile) ------


@dataclass(frozen=True)
class _Format:
    name: str
    magic: bytes
    unpack: Callable[[bytes], bytes]
    pack: Callable[[bytes], bytes]


def decompress(fmt: _Format, payload: bytes) -> bytes:
    """The payload unpacked. It ends in the unpacked size (32 bits, little-endian): gzip's
    own trailer, appended to the others, which their decompressors must not see."""
    (size,) = struct.unpack("<I", payload[-4:])
    try:
        output = fmt.unpack(payload if fmt.name == "gzip" else payload[:-4])
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        raise RepackError(f"cannot decompress the {fmt.name} kernel: {exc}") from exc
    if len(output) != size:
        raise RepackError(f"the kernel unpacked to {len(output)} bytes, not {size}")
    return output


def _format(payload: bytes) -> _Format:
    for fmt in FORMATS:
        if payload.startswith(fmt.magic):
            return fmt
    raise RepackError(f"cannot repack a kernel compressed as {payload[:4].hex()}")


def _tool(*argv: str) -> Callable[[bytes], bytes]:
    def run(data: bytes) -> bytes:
        try:
            done = subprocess.run(argv, input=data, capture_output=True, check=True)
        except FileNotFoundError as exc:
            raise RepackError(f"{argv[0]} is not installed") from exc
        except subprocess.CalledProcessError as exc:
            reason = exc.stderr.decode(errors="replace").strip() or f"status {exc.returncode}"
            raise RepackError(f"{argv[0]} failed: {reason}") from exc
        return done.stdout

    return run


def _gunzip(data: bytes) -> bytes:
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)


def _xz(data: bytes) -> bytes:
    # scripts/xz_wrap.sh: the decompressor checks CRC32 only, and knows the x86 BCJ filter.
    filters = [
        {"id": lzma.FILTER_X86},
        {"id": lzma.FILTER_LZMA2, "preset": 9, "dict_size": 32 * MIB},
    ]
    return lzma.compress(data, lzma.FORMAT_XZ, lzma.CHECK_CRC32, filters=filters)


def _unxz(data: bytes) -> bytes:
    return lzma.decompress(data, lzma.FORMAT_XZ)


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, 9, mtime=0)


FORMATS = (
    _Format("gzip", b"\x1f\x8b", _gunzip, _gzip),
    _Format("xz", b"\xfd7zXZ\x00", _unxz, _xz),
    # The legacy frame (-l) is the only one the kernel's LZ4 decompressor reads.
    _Format(
        "lz4",
        b"\x02\x21\x4c\x18",
        _tool("lz4", "-dcq"),
        _tool("lz4", "-l", "-12", "--favor-decSpeed", "-cq"),
    ),
    _Format(
        "zstd", b"\x28\xb5\x2f\xfd", _tool("zstd", "-dcq"), _tool("zstd", "-22", "--ultra", "-cq")
    ),
)


# --- the ELF ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Phdr:
    type: int
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int

    def pack(self) -> bytes:
        return _PHDR.pack(
            self.type, self.flags, self.offset, self.vaddr, self.paddr,
            self.filesz, self.memsz, self.align,
        )  # fmt: skip


@dataclass(frozen=True)
class _Section:
    name: bytes
    alloc: bool
    addr: int
    size: int  # in memory
    file_end: int  # 0 for a section that takes no room in the file


@dataclass(frozen=True)
class _Elf:
    ident: bytes
    type: int
    machine: int
    version: int
    entry: int
    flags: int
    phdrs: list[_Phdr]
    sections: list[_Section]
    end: int  # where the file ends: what follows is the kernel's relocations

    @classmethod
    def parse(cls, data: bytes) -> _Elf:
        if data[:4] != b"\x7fELF" or data[4:6] != b"\x02\x01" or len(data) < _EHDR.size:
            raise RepackError("the kernel's payload is not a 64-bit little-endian ELF")
        ident, kind, machine, version, entry, phoff, shoff, flags, _, phentsize, phnum, *sh = (
            _EHDR.unpack_from(data)
        )
        phdrs = [_Phdr(*_PHDR.unpack_from(data, phoff + i * phentsize)) for i in range(phnum)]
        if any(p.offset + p.filesz > len(data) for p in phdrs):
            raise RepackError("a segment of the kernel's ELF lies outside the payload")
        shentsize, shnum, shstrndx = sh
        sections = _sections(data, shoff, shentsize, shnum, shstrndx)
        ends = [phoff + phentsize * phnum, *(p.offset + p.filesz for p in phdrs)]
        ends += [s.file_end for s in sections] + ([shoff + shentsize * shnum] if shnum else [])
        return cls(ident, kind, machine, version, entry, flags, phdrs, sections, max(ends))

    def header(self, phnum: int) -> bytes:
        """An ELF header for this image with ``phnum`` program headers and no sections."""
        return _EHDR.pack(
            self.ident, self.type, self.machine, self.version, self.entry, _EHDR.size, 0,
            self.flags, _EHDR.size, _PHDR.size, phnum, _SHDR.size, 0, 0,
        )  # fmt: skip


def _sections(data: bytes, shoff: int, shentsize: int, shnum: int, strndx: int) -> list[_Section]:
    if shoff == 0 or shnum == 0:
        return []
    if shoff + shnum * shentsize > len(data) or strndx >= shnum:
        raise RepackError("the kernel's section headers lie outside the payload")
    raw = [_SHDR.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
    strtab = data[raw[strndx][4] : raw[strndx][4] + raw[strndx][5]]
    sections = []
    for name, kind, flags, addr, offset, size, *_ in raw:
        end = strtab.find(b"\0", name)
        label = strtab[name : end if end >= 0 else len(strtab)]
        file_end = 0 if kind == _SHT_NOBITS else offset + size
        sections.append(_Section(label, bool(flags & _SHF_ALLOC), addr, size, file_end))
    return sections


def relayout(output: bytes) -> tuple[bytes, int]:
    """The decompressor's output (the kernel's ELF, then its relocations) laid out tight,
    and the memory the running kernel spans from its load address (``VO_INIT_SIZE``).

    The decompressor moves each loadable segment to ``load address + p_paddr - lowest
    p_paddr`` with ``memmove``, in program header order, and zero-fills nothing: so each
    segment keeps its whole memory image in the file, at its memory offset plus
    ``HEADROOM``, and segments come in address order, so that each moves down onto
    bytes already moved. The relocations follow the ELF, as before.
    """
    elf = _Elf.parse(output)
    relocs = output[elf.end :]
    if relocs and relocs[:4] != bytes(4):  # they start with a zero terminator
        raise RepackError("the kernel's relocations do not follow its ELF image")
    loads = sorted(
        (_without_scratch(p, elf.sections) for p in elf.phdrs if p.type == _PT_LOAD),
        key=lambda p: p.paddr,
    )
    if not loads or any(p.filesz > p.memsz for p in loads):
        raise RepackError("the kernel's ELF has no usable loadable segments")
    base = min(p.paddr for p in loads)
    placed = [replace(p, offset=p.paddr - base + HEADROOM, filesz=p.memsz) for p in loads]
    notes = [_moved_note(p, loads, placed) for p in elf.phdrs if p.type == _PT_NOTE]
    kept = placed + [n for n in notes if n is not None]
    if _EHDR.size + len(kept) * _PHDR.size > HEADROOM:
        raise RepackError("the kernel's ELF has too many program headers")
    image = bytearray(max(p.offset + p.filesz for p in placed))
    for old, new in zip(loads, placed, strict=True):
        image[new.offset : new.offset + old.filesz] = output[old.offset : old.offset + old.filesz]
    image[: _EHDR.size] = elf.header(len(kept))
    image[_EHDR.size : _EHDR.size + len(kept) * _PHDR.size] = b"".join(p.pack() for p in kept)
    kernel_size = _page_up(max(p.paddr + p.memsz for p in loads) - base)
    return bytes(image) + relocs, kernel_size


def _without_scratch(phdr: _Phdr, sections: list[_Section]) -> _Phdr:
    """``phdr`` cut before ``.init.scratch`` when that section ends it: it lives outside
    the kernel proper (arch/x86/kernel/vmlinux.lds.S) and holds only zeros."""
    end = phdr.vaddr + phdr.memsz
    inside = [s for s in sections if s.alloc and phdr.vaddr <= s.addr < end]
    if not any(s.name == SCRATCH and s.addr + s.size == end for s in inside):
        return phdr
    rest = [s.addr + s.size for s in inside if s.name != SCRATCH]
    memsz = max(rest, default=phdr.vaddr) - phdr.vaddr
    return replace(phdr, filesz=min(phdr.filesz, memsz), memsz=memsz)


def _moved_note(note: _Phdr, loads: list[_Phdr], placed: list[_Phdr]) -> _Phdr | None:
    """The note segment, pointing into the new file, if a loadable segment holds it."""
    for old, new in zip(loads, placed, strict=True):
        if old.offset <= note.offset and note.offset + note.filesz <= old.offset + old.filesz:
            return replace(note, offset=new.offset + note.offset - old.offset)
    return None


def _page_up(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)
