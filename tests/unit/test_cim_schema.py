"""The DMTF CIM Schema subset, compiled by pywbem's MOF compiler.

The first run downloads the pywbem 1.7.3 sdist (~6 MB) into the shared test cache
(``$THINVISOR_TEST_CACHE`` or /var/cache/thinvisor-test); later runs use no network.
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from thinvisor.cim import schema
from thinvisor.cim.schema import ClassRepository
from thinvisor.errors import BackendError, NotFound

TEST_CACHE = Path(os.environ.get("THINVISOR_TEST_CACHE") or "/var/cache/thinvisor-test")
SMALL_CLASSES = ("CIM_ComputerSystem",)


@pytest.fixture(scope="module")
def schema_dir() -> Path:
    return schema.fetch_schema(TEST_CACHE)


@pytest.fixture(scope="module")
def repo(schema_dir: Path) -> ClassRepository:
    """Compiled afresh (not from the pickle cache), so these tests test the compiler."""
    return schema.compile_schema(schema_dir, schema.SCHEMA_CLASSES, schema.tv_mof_files())


@pytest.fixture
def cache_dir(tmp_path: Path, schema_dir: Path) -> Path:
    """A private cache that shares the already fetched schema."""
    (tmp_path / "cim-schema").mkdir()
    (tmp_path / "cim-schema" / schema.SCHEMA_VERSION).symlink_to(schema_dir)
    return tmp_path


def no_download(directory: Path) -> Path:
    raise AssertionError("the network was used")


def make_sdist(path: Path, version: str, members: dict[str, bytes]) -> Path:
    """A stand-in pywbem sdist: PKG-INFO and the schema zip holding ``members``."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    top = f"pywbem-{version}"
    files = {
        f"{top}/PKG-INFO": f"Metadata-Version: 2.2\nName: pywbem\nVersion: {version}\n".encode(),
        f"{top}/{schema.SDIST_SCHEMA_ZIP}": archive.getvalue(),
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def schema_members() -> dict[str, bytes]:
    return {
        schema.PRAGMA_FILE: b'#pragma include ("qualifiers.mof")\n',
        "qualifiers.mof": b"",
        "Core/CIM_ManagedElement.mof": b"",
        "README.txt": b"not a MOF file",
    }


def test_request_state_change_has_value_maps(repo: ClassRepository) -> None:
    for name in ("CIM_ComputerSystem", "TV_ComputerSystem"):
        method = repo.get(name).methods["RequestStateChange"]
        quals = method.parameters["RequestedState"].qualifiers
        assert {"2", "3", "4", "10", "11"} <= set(quals["ValueMap"].value)
        assert {"Enabled", "Disabled", "Reboot", "Reset"} <= set(quals["Values"].value)
        assert len(quals["ValueMap"].value) == len(quals["Values"].value)
        assert "ValueMap" in method.qualifiers


def test_registered_organization_has_value_map(repo: ClassRepository) -> None:
    quals = repo.get("CIM_RegisteredProfile").properties["RegisteredOrganization"].qualifiers
    value_map, values = quals["ValueMap"].value, quals["Values"].value
    assert len(value_map) == len(values)
    assert values[value_map.index("2")] == "DMTF"


def test_tv_superclass_chain_reaches_managed_element(repo: ClassRepository) -> None:
    chain = repo.superclasses("TV_ComputerSystem")
    assert chain[0] == "CIM_ComputerSystem"
    assert chain[-1] == "CIM_ManagedElement"
    assert repo.get("TV_ComputerSystem").properties["Name"].qualifiers["Key"].value is True


# Associations a profile uses that CIM 2.49 Final has no class for (the snapshot tree's):
# they extend CIM_Dependency.
DEPENDENCIES = {"TV_MostCurrentSnapshotInBranch", "TV_ParentChildSettingData"}


def test_every_tv_class_extends_a_listed_class(repo: ClassRepository) -> None:
    for path in schema.tv_mof_files():
        cls = repo.get(path.stem)
        if path.stem in DEPENDENCIES:
            assert cls.superclass == "CIM_Dependency"
        else:
            assert cls.superclass == "CIM_" + path.stem.removeprefix("TV_")
            assert cls.superclass in schema.SCHEMA_CLASSES
        assert cls.qualifiers["Description"].value.startswith("thinvisor's ")


def test_associations_and_only_they_have_the_association_qualifier(
    repo: ClassRepository,
) -> None:
    associations = []
    for name in repo.names():
        cls = repo.get(name)
        has_refs = any(p.type == "reference" for p in cls.properties.values())
        qual = cls.qualifiers.get("Association")
        assert bool(qual and qual.value) == has_refs, name
        associations += [name] if has_refs else []
    assert {"TV_ElementConformsToProfile", "TV_HostedDependency", "TV_SystemDevice"} <= set(
        associations
    )


def test_unlisted_class_is_absent(repo: ClassRepository) -> None:
    assert "CIM_Printer" not in repo
    with pytest.raises(NotFound, match="CIM_Printer"):
        repo.get("CIM_Printer")


def test_lookup_is_case_insensitive(repo: ClassRepository) -> None:
    assert "cim_computersystem" in repo
    assert repo.get("tv_COMPUTERSYSTEM").classname == "TV_ComputerSystem"


def test_subclasses(repo: ClassRepository) -> None:
    assert repo.subclasses("cim_computersystem") == ["TV_ComputerSystem"]
    assert "TV_ComputerSystem" not in repo.subclasses("CIM_ManagedElement")
    assert "TV_ComputerSystem" in repo.subclasses("CIM_ManagedElement", deep=True)
    assert "CIM_ManagedElement" in repo.subclasses(None)
    assert "CIM_ComputerSystem" not in repo.subclasses(None)


def test_get_returns_a_copy(repo: ClassRepository) -> None:
    repo.get("CIM_ComputerSystem").properties.clear()
    assert repo.get("CIM_ComputerSystem").properties


def test_qualifier_declarations(repo: ClassRepository) -> None:
    names = {q.name for q in repo.qualifier_declarations()}
    assert {"Association", "Description", "Key", "ValueMap", "Values"} <= names


def test_compile_refuses_a_class_not_in_the_schema(schema_dir: Path) -> None:
    with pytest.raises(BackendError, match="CIM_NoSuchClass"):
        schema.compile_schema(schema_dir, ["CIM_NoSuchClass"], [])


def test_compile_reports_a_bad_mof_file(schema_dir: Path, tmp_path: Path) -> None:
    mof = tmp_path / "TV_Bad.mof"
    mof.write_text("class TV_Bad : CIM_NoSuchClass {\n};\n")
    with pytest.raises(BackendError, match=r"TV_Bad\.mof:\d+: .*CIM_NoSuchClass") as info:
        schema.compile_schema(schema_dir, SMALL_CLASSES, [mof])
    assert "\n" not in str(info.value)


class CountingCompiler:
    """compile_schema, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(
        self, schema_dir: Path, classes: Sequence[str], mof: Sequence[Path]
    ) -> ClassRepository:
        self.calls += 1
        return schema.compile_schema(schema_dir, classes, mof)


def load_small(cache_dir: Path, compiler: CountingCompiler, *extra: str) -> ClassRepository:
    return schema.load_repository(
        cache_dir,
        classes=(*SMALL_CLASSES, *extra),
        extra_mof=[schema.TV_MOF_DIR / "TV_ComputerSystem.mof"],
        compile_fn=compiler,
        download=no_download,
    )


def test_compiled_repository_is_cached(cache_dir: Path) -> None:
    compiler = CountingCompiler()
    first = load_small(cache_dir, compiler)
    second = load_small(cache_dir, compiler)
    assert compiler.calls == 1
    assert second.names() == first.names()
    assert "TV_ComputerSystem" in second


def test_a_changed_class_list_or_damaged_cache_recompiles(cache_dir: Path) -> None:
    compiler = CountingCompiler()
    load_small(cache_dir, compiler)
    assert "CIM_Processor" in load_small(cache_dir, compiler, "CIM_Processor")
    for pickled in (cache_dir / "cim-schema").glob("compiled-*.pickle"):
        pickled.write_bytes(b"damaged")
    assert "TV_ComputerSystem" in load_small(cache_dir, compiler)
    assert compiler.calls == 3


def test_fetch_is_cached(cache_dir: Path, schema_dir: Path) -> None:
    fetched = schema.fetch_schema(cache_dir, download=no_download)
    assert fetched == cache_dir / "cim-schema" / schema.SCHEMA_VERSION
    assert (fetched / "qualifiers.mof").is_file()
    assert (schema_dir / "System" / "CIM_ComputerSystem.mof").is_file()


def test_fetch_refuses_a_wrong_version(tmp_path: Path) -> None:
    fake = make_sdist(tmp_path / schema.SDIST_NAME, "1.7.2", schema_members())
    cache = tmp_path / "cache"
    with pytest.raises(BackendError, match=r"pywbem 1\.7\.2, not pywbem 1\.7\.3"):
        schema.fetch_schema(cache, download=lambda directory: fake)
    assert list((cache / "cim-schema").iterdir()) == []


def test_fetch_extracts_only_mof_files(tmp_path: Path) -> None:
    fake = make_sdist(tmp_path / schema.SDIST_NAME, "1.7.3", schema_members())
    fetched = schema.fetch_schema(tmp_path / "cache", download=lambda directory: fake)
    found = sorted(str(p.relative_to(fetched)) for p in fetched.rglob("*") if p.is_file())
    assert found == ["Core/CIM_ManagedElement.mof", schema.PRAGMA_FILE, "qualifiers.mof"]


def test_fetch_refuses_unsafe_paths(tmp_path: Path) -> None:
    members = {**schema_members(), "../escape.mof": b""}
    fake = make_sdist(tmp_path / schema.SDIST_NAME, "1.7.3", members)
    with pytest.raises(BackendError, match="unsafe path"):
        schema.fetch_schema(tmp_path / "cache", download=lambda directory: fake)
    assert not (tmp_path / "cache" / "escape.mof").exists()


def test_fetch_refuses_a_file_that_is_not_an_sdist(tmp_path: Path) -> None:
    bogus = tmp_path / schema.SDIST_NAME
    bogus.write_bytes(b"<html>not found</html>")
    with pytest.raises(BackendError, match="not a readable pywbem sdist"):
        schema.fetch_schema(tmp_path / "cache", download=lambda directory: bogus)
