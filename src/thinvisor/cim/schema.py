"""The DMTF CIM Schema classes thinvisor implements, compiled with pywbem's MOF compiler.

The schema is DMTF's CIM Schema 2.49.0 as it ships inside the pywbem 1.7.3 source
distribution (``tests/schema/cim_schema_2.49.0Final-MOFs.zip``, DMTF's own archive).

- ``fetch_schema`` downloads that sdist from PyPI by exact version and sha256, checks
  its PKG-INFO and unpacks the MOF files into ``<cache_dir>/cim-schema/2.49.0/``.
- ``compile_schema`` compiles ``SCHEMA_CLASSES`` (with their superclasses, the classes
  they reference or embed, and the qualifier declarations), then thinvisor's ``TV_``
  subclasses from ``mof/``, into a ``ClassRepository``.
- ``load_repository`` does both and caches the compiled repository.

pip is not used to fetch the sdist: ``pip download`` always prepares an sdist's
metadata, that is, it runs pywbem's ``setup.py``. PyPI's simple index (PEP 691) gives
the file's URL and sha256 without running anything.
"""

from __future__ import annotations

import email
import hashlib
import io
import json
import os
import pickle
import re
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePosixPath

import pywbem
import pywbem_mock
from pywbem import CIMClass, CIMQualifierDeclaration

from thinvisor.errors import BackendError, NotFound
from thinvisor.fs import atomic_write, fsync_dir

PYWBEM_VERSION = "1.7.3"
SCHEMA_VERSION = "2.49.0"
SDIST_NAME = f"pywbem-{PYWBEM_VERSION}.tar.gz"
SDIST_SCHEMA_ZIP = f"tests/schema/cim_schema_{SCHEMA_VERSION}Final-MOFs.zip"
PRAGMA_FILE = f"cim_schema_{SCHEMA_VERSION}.mof"
INDEX_URL = "https://pypi.org/simple/pywbem/"
TV_MOF_DIR = Path(__file__).with_name("mof")

# The DMTF classes thinvisor implements or needs, by profile. Superclasses and the
# classes these reference or embed are pulled in by the compiler.
SCHEMA_CLASSES: tuple[str, ...] = (
    # Profile Registration (DSP1033), in root/interop
    "CIM_Namespace",
    "CIM_ObjectManager",
    "CIM_RegisteredProfile",
    "CIM_ElementConformsToProfile",
    "CIM_ReferencedProfile",
    # Base Server (DSP1004), Computer System (DSP1052), Virtual System (DSP1057)
    "CIM_ComputerSystem",
    "CIM_EnabledLogicalElementCapabilities",
    "CIM_ElementCapabilities",
    "CIM_SystemDevice",
    "CIM_HostedService",
    # CPU (DSP1022), System Memory (DSP1026)
    "CIM_Processor",
    "CIM_Memory",
    # Sensors (DSP1009), Fan (DSP1013), Power Supply (DSP1015)
    "CIM_Sensor",
    "CIM_NumericSensor",
    "CIM_AssociatedSensor",
    "CIM_Fan",
    "CIM_PowerSupply",
    # Record Log (DSP1010)
    "CIM_RecordLog",
    "CIM_LogEntry",
    "CIM_UseOfLog",
    "CIM_LogManagesRecord",
    # System Virtualization (DSP1042)
    "CIM_VirtualSystemManagementService",
    "CIM_VirtualSystemManagementCapabilities",
    "CIM_HostedDependency",
    "CIM_ServiceAffectsElement",
    # Virtual System (DSP1057)
    "CIM_VirtualSystemSettingData",
    "CIM_VirtualSystemSettingDataComponent",
    "CIM_SettingsDefineState",
    "CIM_ElementSettingData",
    # Resource Allocation (DSP1041)
    "CIM_ResourceAllocationSettingData",
    "CIM_ProcessorAllocationSettingData",
    "CIM_StorageAllocationSettingData",
    "CIM_EthernetPortAllocationSettingData",
    "CIM_ResourcePool",
    "CIM_AllocationCapabilities",
    "CIM_HostedResourcePool",
    "CIM_ElementAllocatedFromPool",
    "CIM_ResourceAllocationFromPool",
    "CIM_SettingsDefineCapabilities",
    # Virtual System Snapshot Service
    "CIM_VirtualSystemSnapshotService",
    "CIM_VirtualSystemSnapshotServiceCapabilities",
    "CIM_VirtualSystemSnapshotCapabilities",
    "CIM_SnapshotOfVirtualSystem",
    # Virtual Ethernet Switch (DSP1097), Ethernet Port Resource Virtualization (DSP1050)
    "CIM_VirtualEthernetSwitchSettingData",
    "CIM_DeviceConnection",
    # Base Metrics (DSP1053)
    "CIM_BaseMetricDefinition",
    "CIM_BaseMetricValue",
    "CIM_MetricDefForME",
    "CIM_MetricInstance",
    "CIM_MetricForME",
    "CIM_MetricService",
    # Devices of hosts and VMs, and jobs (thinvisor's tasks)
    "CIM_LogicalDisk",
    "CIM_EthernetPort",
    "CIM_ConcreteJob",
    "CIM_AffectedJobElement",
)

Downloader = Callable[[Path], Path]
Compiler = Callable[[Path, Sequence[str], Sequence[Path]], "ClassRepository"]

_TIMEOUT = 60.0
_COMPILE_NAMESPACE = "root/cimv2"
# Bump when ClassRepository's pickled layout changes.
_CACHE_FORMAT = 1


class ClassRepository:
    """CIM classes and qualifier declarations, looked up case-insensitively by name.

    Each class is complete: inherited properties, methods and qualifiers are included,
    marked ``propagated`` and with their ``class_origin``.
    """

    def __init__(
        self, classes: Iterable[CIMClass], qualifiers: Iterable[CIMQualifierDeclaration]
    ) -> None:
        self._classes = {c.classname.lower(): c for c in classes}
        self._qualifiers = {q.name.lower(): q for q in qualifiers}

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._classes

    def names(self) -> list[str]:
        """Every class name, sorted."""
        return sorted((c.classname for c in self._classes.values()), key=str.lower)

    def get(self, name: str) -> CIMClass:
        """A copy of class ``name``; ``NotFound`` if there is none."""
        return self._lookup(name).copy()

    def superclasses(self, name: str) -> list[str]:
        """The superclass chain of ``name``, nearest first."""
        chain: list[str] = []
        cls = self._lookup(name)
        while cls.superclass:
            cls = self._lookup(cls.superclass)
            chain.append(cls.classname)
        return chain

    def subclasses(self, name: str | None, deep: bool = False) -> list[str]:
        """The direct subclasses of ``name`` (the root classes for None); all with ``deep``."""
        found: list[str] = []
        parents = ["" if name is None else self._lookup(name).classname.lower()]
        while parents:
            parent = parents.pop()
            children = [c.classname for c in self._classes.values() if _parent(c) == parent]
            found.extend(children)
            if deep:
                parents.extend(child.lower() for child in children)
        return sorted(found, key=str.lower)

    def qualifier_declarations(self) -> list[CIMQualifierDeclaration]:
        """Copies of the qualifier declarations, sorted by name."""
        return [self._qualifiers[key].copy() for key in sorted(self._qualifiers)]

    def _lookup(self, name: str) -> CIMClass:
        try:
            return self._classes[name.lower()]
        except KeyError:
            raise NotFound(f"CIM class {name} not found") from None


def _parent(cls: CIMClass) -> str:
    return (cls.superclass or "").lower()


def load_repository(
    cache_dir: Path,
    *,
    classes: Sequence[str] = SCHEMA_CLASSES,
    extra_mof: Sequence[Path] | None = None,
    compile_fn: Compiler | None = None,
    download: Downloader | None = None,
) -> ClassRepository:
    """The compiled classes: fetched, compiled and cached under ``cache_dir`` on first use."""
    mof = tv_mof_files() if extra_mof is None else list(extra_mof)
    schema_dir = fetch_schema(cache_dir, download=download)
    try:
        cache = schema_dir.parent / f"compiled-{_cache_key(classes, mof)}.pickle"
        repo = _load_cached(cache)
        if repo is None:
            repo = (compile_fn or compile_schema)(schema_dir, classes, mof)
            atomic_write(cache, pickle.dumps(repo, protocol=pickle.HIGHEST_PROTOCOL))
    except OSError as exc:
        raise BackendError(f"cannot cache the compiled CIM schema: {exc}") from exc
    return repo


def tv_mof_files() -> list[Path]:
    """thinvisor's own MOF files, one ``TV_`` class each."""
    return sorted(TV_MOF_DIR.glob("TV_*.mof"))


def _cache_key(classes: Sequence[str], mof: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    header = [_CACHE_FORMAT, pywbem.__version__, SCHEMA_VERSION, list(classes)]
    digest.update(json.dumps(header).encode())
    for path in mof:
        digest.update(f"\0{path.name}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _load_cached(path: Path) -> ClassRepository | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        repo = pickle.loads(data)
    except Exception:  # a stale or damaged cache can fail in many ways: recompile
        return None
    return repo if isinstance(repo, ClassRepository) else None


def compile_schema(
    schema_dir: Path, classes: Iterable[str], extra_mof: Sequence[Path]
) -> ClassRepository:
    """Compile ``classes`` from the schema in ``schema_dir``, then ``extra_mof`` on top."""
    conn = pywbem_mock.FakedWBEMConnection(default_namespace=_COMPILE_NAMESPACE)
    ns = _COMPILE_NAMESPACE
    try:
        conn.compile_schema_classes(list(classes), str(schema_dir / PRAGMA_FILE), namespace=ns)
        for path in extra_mof:
            conn.compile_mof_file(str(path), namespace=ns, search_paths=[str(schema_dir)])
    except pywbem.MOFCompileError as exc:
        where = f"{exc.file}:{exc.lineno}: " if exc.file else ""
        raise BackendError(f"CIM schema compile failed: {where}{exc.msg}") from exc
    except (pywbem.Error, ValueError, OSError) as exc:
        raise BackendError(f"CIM schema compile failed: {_first_line(exc)}") from exc
    found = conn.EnumerateClasses(
        namespace=ns,
        DeepInheritance=True,
        LocalOnly=False,
        IncludeQualifiers=True,
        IncludeClassOrigin=True,
    )
    return ClassRepository(found, conn.EnumerateQualifiers(namespace=ns))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def fetch_schema(cache_dir: Path, *, download: Downloader | None = None) -> Path:
    """The DMTF schema MOF directory, ``<cache_dir>/cim-schema/2.49.0``; fetched once."""
    target = cache_dir / "cim-schema" / SCHEMA_VERSION
    if (target / PRAGMA_FILE).is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
            sdist = (download or download_sdist)(Path(tmp))
            extract_schema(sdist, Path(tmp) / "schema")
            _install(Path(tmp) / "schema", target)
    except OSError as exc:
        raise BackendError(f"cannot fetch the CIM schema into {target}: {exc}") from exc
    return target


def _install(staged: Path, target: Path) -> None:
    try:
        os.rename(staged, target)
    except OSError:
        if not (target / PRAGMA_FILE).is_file():  # else another process installed it first
            raise
    fsync_dir(target.parent)


def download_sdist(directory: Path, index_url: str = INDEX_URL) -> Path:
    """Download the pywbem sdist from ``index_url`` into ``directory``, checking its sha256."""
    url, sha256 = _find_sdist(index_url)
    path = directory / SDIST_NAME
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT) as response, path.open("wb") as out:
            while chunk := response.read(1 << 16):
                digest.update(chunk)
                out.write(chunk)
    except OSError as exc:
        raise BackendError(f"cannot download {url}: {exc}") from exc
    if digest.hexdigest() != sha256:
        raise BackendError(f"{SDIST_NAME}: sha256 {digest.hexdigest()} is not PyPI's {sha256}")
    return path


def _find_sdist(index_url: str) -> tuple[str, str]:
    """The URL and sha256 of the sdist, from a PEP 691 simple index."""
    accept = {"Accept": "application/vnd.pypi.simple.v1+json"}
    try:
        request = urllib.request.Request(index_url, headers=accept)
        with urllib.request.urlopen(request, timeout=_TIMEOUT) as response:
            files = json.load(response).get("files", [])
    except (OSError, ValueError, AttributeError) as exc:
        raise BackendError(f"cannot read the package index {index_url}: {exc}") from exc
    for entry in files:
        sha256 = entry.get("hashes", {}).get("sha256")
        if entry.get("filename") == SDIST_NAME and sha256:
            return urllib.parse.urljoin(index_url, entry["url"]), str(sha256)
    raise BackendError(f"{SDIST_NAME} (with a sha256) is not on {index_url}")


def extract_schema(sdist: Path, dest: Path) -> None:
    """Check that ``sdist`` is pywbem 1.7.3, then unpack its DMTF MOF files into ``dest``."""
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            top = _check_version(tar, sdist.name)
            archive = _read_member(tar, f"{top}/{SDIST_SCHEMA_ZIP}", sdist.name)
        with zipfile.ZipFile(io.BytesIO(archive)) as zf:
            _unzip_mofs(zf, dest)
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise BackendError(f"{sdist.name} is not a readable pywbem sdist: {exc}") from exc
    if not (dest / PRAGMA_FILE).is_file():
        raise BackendError(f"{sdist.name}: the schema archive has no {PRAGMA_FILE}")


def _check_version(tar: tarfile.TarFile, label: str) -> str:
    """The sdist's top directory, once its PKG-INFO says pywbem 1.7.3."""
    pkg_info = next((m.name for m in tar if re.fullmatch(r"[^/]+/PKG-INFO", m.name)), None)
    if pkg_info is None:
        raise BackendError(f"{label} has no PKG-INFO")
    meta = email.message_from_bytes(_read_member(tar, pkg_info, label))
    name, version = meta.get("Name"), meta.get("Version")
    if (name, version) != ("pywbem", PYWBEM_VERSION):
        raise BackendError(f"{label} is {name} {version}, not pywbem {PYWBEM_VERSION}")
    return pkg_info.split("/")[0]


def _read_member(tar: tarfile.TarFile, name: str, label: str) -> bytes:
    try:
        member = tar.extractfile(name)
    except KeyError:
        member = None
    if member is None:
        raise BackendError(f"{label} has no file {name}")
    with member:
        return member.read()


def _unzip_mofs(zf: zipfile.ZipFile, dest: Path) -> None:
    for info in zf.infolist():
        if info.is_dir() or not info.filename.endswith(".mof"):
            continue
        parts = PurePosixPath(info.filename).parts
        if parts[0] == "/" or ".." in parts:
            raise BackendError(f"unsafe path in the schema archive: {info.filename!r}")
        path = dest.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as out:
            out.write(zf.read(info))
            os.fsync(out.fileno())
