"""The CIM-XML server under uvicorn on loopback, driven by pywbem's real client.

The providers are written here: two ``TV_ComputerSystem`` instances (a host and a VM)
with a ``TV_HostedDependency`` between them in root/cimv2, and a
``TV_RegisteredProfile`` with a ``TV_ElementConformsToProfile`` to the host in
root/interop. No QEMU is needed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import pywbem
from pywbem import CIMInstance, CIMInstanceName, Uint16, Uint32, WBEMConnection

from thinvisor.cim.codec import MAX_BODY_BYTES
from thinvisor.cim.provider import CIMV2, INTEROP, CimContext, Registry
from thinvisor.cim.schema import ClassRepository, load_repository
from thinvisor.cim.server import create_cim_app
from thinvisor.host.agent import HostAgent
from thinvisor.tls import ensure_certificate

from .cimenv import ADMIN, READER, TEST_CACHE, Served, connect, make_agent, temp_config

pytestmark = pytest.mark.functional


def system_path(name: str) -> CIMInstanceName:
    keys = {"CreationClassName": "TV_ComputerSystem", "Name": name}
    return CIMInstanceName("TV_ComputerSystem", keys, namespace=CIMV2)


PROFILE_PATH = CIMInstanceName(
    "TV_RegisteredProfile", {"InstanceID": "thinvisor:DSP1004"}, namespace=INTEROP
)


@dataclass
class Systems:
    """TV_ComputerSystem: a host and a VM; RequestStateChange records what it was asked."""

    classname: str = "TV_ComputerSystem"
    namespace: str = CIMV2
    calls: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    async def instances(self, ctx: CimContext) -> list[CIMInstance]:
        return [self._system("host1", "thinvisor host"), self._system("vm1", "a VM")]

    def _system(self, name: str, caption: str) -> CIMInstance:
        inst = CIMInstance("TV_ComputerSystem", path=system_path(name))
        inst["CreationClassName"] = "TV_ComputerSystem"
        inst["Name"] = name
        inst["ElementName"] = name
        inst["Caption"] = caption
        inst["EnabledState"] = Uint16(2)
        return inst

    async def invoke(
        self, ctx: CimContext, target: CIMInstanceName | str, method: str, params: dict[str, Any]
    ) -> tuple[Any, dict[str, Any]]:
        assert isinstance(target, CIMInstanceName)
        self.calls.append((str(target["Name"]), method, params))
        return Uint32(0), {"Job": None}


@dataclass
class HostedDependency:
    classname: str = "TV_HostedDependency"
    namespace: str = CIMV2

    async def instances(self, ctx: CimContext) -> list[CIMInstance]:
        refs = {"Antecedent": system_path("host1"), "Dependent": system_path("vm1")}
        path = CIMInstanceName(self.classname, refs, namespace=CIMV2)
        return [CIMInstance(self.classname, properties=refs, path=path)]


@dataclass
class Profiles:
    classname: str = "TV_RegisteredProfile"
    namespace: str = INTEROP

    async def instances(self, ctx: CimContext) -> list[CIMInstance]:
        props = {
            "InstanceID": "thinvisor:DSP1004",
            "RegisteredOrganization": Uint16(2),
            "RegisteredName": "Base Server",
            "RegisteredVersion": "1.0.1",
        }
        return [CIMInstance(self.classname, properties=props, path=PROFILE_PATH)]


@dataclass
class ConformsToProfile:
    classname: str = "TV_ElementConformsToProfile"
    namespace: str = INTEROP

    async def instances(self, ctx: CimContext) -> list[CIMInstance]:
        refs = {"ConformantStandard": PROFILE_PATH, "ManagedElement": system_path("host1")}
        path = CIMInstanceName(self.classname, refs, namespace=INTEROP)
        return [CIMInstance(self.classname, properties=refs, path=path)]


@pytest.fixture(scope="module")
def repository() -> ClassRepository:
    return load_repository(TEST_CACHE)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostAgent]:
    agent = make_agent(temp_config(tmp_path_factory.mktemp("cim-agent")))
    yield agent
    agent.events.close()


@pytest.fixture(scope="module")
def systems() -> Systems:
    return Systems()


@pytest.fixture(scope="module")
def app(agent: HostAgent, repository: ClassRepository, systems: Systems) -> Any:
    registry = Registry([systems, HostedDependency(), Profiles(), ConformsToProfile()])
    return create_cim_app(agent, repository, registry)


@pytest.fixture(scope="module")
def url(app: Any) -> Iterator[str]:
    served = Served(app)
    yield f"http://127.0.0.1:{served.port}"
    served.close()


@pytest.fixture
def conn(url: str) -> Iterator[WBEMConnection]:
    c = connect(url)
    yield c
    c.close()


def cim_status(exc_info: pytest.ExceptionInfo[pywbem.CIMError]) -> int:
    status: int = exc_info.value.status_code
    return status


# Classes


def test_get_class_with_qualifiers(conn: WBEMConnection) -> None:
    cls = conn.GetClass("TV_ComputerSystem", LocalOnly=False, IncludeQualifiers=True)
    assert cls.superclass == "CIM_ComputerSystem"
    assert "ValueMap" in cls.properties["EnabledState"].qualifiers
    assert "RequestStateChange" in cls.methods
    bare = conn.GetClass("TV_ComputerSystem", LocalOnly=False, IncludeQualifiers=False)
    assert not bare.qualifiers and not bare.properties["EnabledState"].qualifiers
    local = conn.GetClass("TV_ComputerSystem")  # LocalOnly is true by default
    assert not local.properties
    origin = conn.GetClass("TV_ComputerSystem", LocalOnly=False, IncludeClassOrigin=True)
    assert origin.properties["Name"].class_origin == "CIM_ManagedSystemElement"
    only = conn.GetClass("TV_ComputerSystem", LocalOnly=False, PropertyList=["Name"])
    assert list(only.properties) == ["Name"]


def test_enumerate_class_names(conn: WBEMConnection, repository: ClassRepository) -> None:
    deep = conn.EnumerateClassNames(ClassName="CIM_System", DeepInheritance=True)
    assert {"CIM_ComputerSystem", "TV_ComputerSystem"} <= set(deep)
    shallow = conn.EnumerateClassNames(ClassName="CIM_System")
    assert "CIM_ComputerSystem" in shallow and "TV_ComputerSystem" not in shallow
    everything = conn.EnumerateClassNames(DeepInheritance=True, namespace=INTEROP)
    assert sorted(everything, key=str.lower) == repository.names()
    classes = conn.EnumerateClasses(ClassName="CIM_ComputerSystem", LocalOnly=False)
    assert [c.classname for c in classes] == ["TV_ComputerSystem"]


# Instances


def test_enumerate_instances_with_property_list(conn: WBEMConnection) -> None:
    found = conn.EnumerateInstances("CIM_ComputerSystem", PropertyList=["Name", "EnabledState"])
    assert sorted(i["Name"] for i in found) == ["host1", "vm1"]
    for inst in found:
        assert set(inst.properties) == {"Name", "EnabledState"}
        assert inst.path.classname == "TV_ComputerSystem"
        assert inst.path.keybindings["Name"] == inst["Name"]
    names = conn.EnumerateInstanceNames("CIM_System")
    assert {p["Name"] for p in names} == {"host1", "vm1"}
    assert conn.EnumerateInstances("TV_ComputerSystem", namespace=INTEROP) == []


def test_enumerate_instances_shallow_keeps_requested_class_properties(
    conn: WBEMConnection,
) -> None:
    found = conn.EnumerateInstances("CIM_ManagedElement", DeepInheritance=False)
    systems = [i for i in found if i.classname == "TV_ComputerSystem"]
    assert len(systems) == 2
    assert "Caption" in systems[0] and "Name" not in systems[0]


def test_get_instance(conn: WBEMConnection) -> None:
    inst = conn.GetInstance(system_path("vm1"))
    assert inst["Caption"] == "a VM" and inst["EnabledState"] == 2
    only = conn.GetInstance(system_path("vm1"), PropertyList=["Caption"])
    assert set(only.properties) == {"Caption"}
    with pytest.raises(pywbem.CIMError) as exc:
        conn.GetInstance(system_path("nope"))
    assert cim_status(exc) == pywbem.CIM_ERR_NOT_FOUND


def test_wrong_key_bindings_and_unknown_properties(conn: WBEMConnection) -> None:
    wrong_key = CIMInstanceName("TV_ComputerSystem", {"Bogus": "vm1"}, namespace=CIMV2)
    with pytest.raises(pywbem.CIMError) as exc:
        conn.GetInstance(wrong_key)
    assert cim_status(exc) in (pywbem.CIM_ERR_NOT_FOUND, pywbem.CIM_ERR_INVALID_PARAMETER)
    missing_key = CIMInstanceName("TV_ComputerSystem", {"Name": "vm1"}, namespace=CIMV2)
    with pytest.raises(pywbem.CIMError) as exc:
        conn.GetInstance(missing_key)
    assert cim_status(exc) in (pywbem.CIM_ERR_NOT_FOUND, pywbem.CIM_ERR_INVALID_PARAMETER)
    # DSP0200: a PropertyList naming a property the class lacks is not an error; the
    # property is simply not there.
    only = conn.GetInstance(system_path("vm1"), PropertyList=["NoSuchProperty"])
    assert set(only.properties) == set()


# Associations


def test_associators_and_names(conn: WBEMConnection) -> None:
    host = system_path("host1")
    found = conn.Associators(
        host, AssocClass="CIM_HostedDependency", ResultClass="CIM_ComputerSystem", Role="Antecedent"
    )
    assert [i["Name"] for i in found] == ["vm1"]
    assert found[0].path.namespace == CIMV2 and found[0]["Caption"] == "a VM"
    assert conn.Associators(host, Role="Dependent") == []
    assert conn.Associators(host, ResultClass="CIM_RegisteredProfile") == []
    names = conn.AssociatorNames(system_path("vm1"), ResultRole="Antecedent")
    assert [p["Name"] for p in names] == ["host1"]
    with pytest.raises(pywbem.CIMError) as exc:
        conn.Associators(host, AssocClass="NoSuchClass")
    assert cim_status(exc) == pywbem.CIM_ERR_INVALID_PARAMETER


def test_references_and_names(conn: WBEMConnection) -> None:
    vm = system_path("vm1")
    refs = conn.References(vm, ResultClass="CIM_Dependency")
    assert len(refs) == 1 and refs[0].classname == "TV_HostedDependency"
    assert refs[0]["Antecedent"]["Name"] == "host1"
    assert conn.ReferenceNames(vm, Role="Dependent")[0].classname == "TV_HostedDependency"
    assert conn.ReferenceNames(vm, Role="Antecedent") == []
    assert conn.ReferenceNames(vm, ResultClass="CIM_ElementCapabilities") == []


def test_associators_across_namespaces(conn: WBEMConnection) -> None:
    conforming = conn.Associators(PROFILE_PATH, ResultClass="CIM_ComputerSystem")
    assert [i["Name"] for i in conforming] == ["host1"]
    assert conforming[0].path.namespace == CIMV2
    profiles = conn.EnumerateInstances("CIM_RegisteredProfile", namespace=INTEROP)
    assert [p["RegisteredName"] for p in profiles] == ["Base Server"]


# Methods


def test_invoke_method(conn: WBEMConnection, systems: Systems) -> None:
    result, _ = conn.InvokeMethod(
        "RequestStateChange", system_path("vm1"), [("RequestedState", Uint16(3))]
    )
    assert result == 0
    assert systems.calls[-1] == ("vm1", "RequestStateChange", {"RequestedState": 3})
    with pytest.raises(pywbem.CIMError) as exc:
        conn.InvokeMethod("Explode", system_path("vm1"))
    assert cim_status(exc) == pywbem.CIM_ERR_METHOD_NOT_FOUND
    with pytest.raises(pywbem.CIMError) as exc:
        conn.InvokeMethod("RequestStateChange", system_path("vm1"), [("Bogus", Uint16(1))])
    assert cim_status(exc) == pywbem.CIM_ERR_INVALID_PARAMETER
    with pytest.raises(pywbem.CIMError) as exc:
        conn.InvokeMethod(
            "RequestStateChange", system_path("gone"), [("RequestedState", Uint16(3))]
        )
    assert cim_status(exc) == pywbem.CIM_ERR_NOT_FOUND


def test_read_only_user_may_read_not_invoke(url: str, systems: Systems) -> None:
    conn = connect(url, READER)
    assert len(conn.EnumerateInstanceNames("TV_ComputerSystem")) == 2
    calls = len(systems.calls)
    with pytest.raises(pywbem.CIMError) as exc:
        conn.InvokeMethod("RequestStateChange", system_path("vm1"), [("RequestedState", Uint16(3))])
    assert cim_status(exc) == pywbem.CIM_ERR_ACCESS_DENIED
    assert len(systems.calls) == calls


# Pull operations: refused exactly, and pywbem falls back


def test_pull_operations_not_supported_and_iter_falls_back(conn: WBEMConnection) -> None:
    with pytest.raises(pywbem.CIMError) as exc:
        conn.OpenEnumerateInstances("TV_ComputerSystem")
    assert cim_status(exc) == pywbem.CIM_ERR_NOT_SUPPORTED
    found = list(conn.IterEnumerateInstances("CIM_ComputerSystem", PropertyList=["Name"]))
    assert sorted(i["Name"] for i in found) == ["host1", "vm1"]
    paths = list(conn.IterEnumerateInstancePaths("TV_ComputerSystem"))
    assert len(paths) == 2
    assoc = list(conn.IterAssociatorInstances(system_path("host1"), Role="Antecedent"))
    assert [i["Name"] for i in assoc] == ["vm1"]
    refs = list(conn.IterReferenceInstancePaths(system_path("host1")))
    assert [r.classname for r in refs] == ["TV_HostedDependency"]


# Errors


def test_unknown_namespace_and_class(conn: WBEMConnection) -> None:
    with pytest.raises(pywbem.CIMError) as exc:
        conn.EnumerateInstances("TV_ComputerSystem", namespace="root/nowhere")
    assert cim_status(exc) == pywbem.CIM_ERR_INVALID_NAMESPACE
    with pytest.raises(pywbem.CIMError) as exc:
        conn.EnumerateInstances("TV_NoSuchClass")
    assert cim_status(exc) == pywbem.CIM_ERR_INVALID_CLASS
    with pytest.raises(pywbem.CIMError) as exc:
        conn.GetClass("TV_NoSuchClass")
    assert cim_status(exc) == pywbem.CIM_ERR_INVALID_CLASS
    with pytest.raises(pywbem.CIMError) as exc:
        conn.CreateInstance(CIMInstance("TV_ComputerSystem", {"Name": "x"}))
    assert cim_status(exc) == pywbem.CIM_ERR_NOT_SUPPORTED


def test_wrong_password_is_401_and_recorded(url: str, agent: HostAgent) -> None:
    conn = connect(url, ("admin", "wrong-password"))
    with pytest.raises(pywbem.AuthError):
        conn.EnumerateInstanceNames("TV_ComputerSystem")
    failed = agent.events.list(kind_prefix="auth.login_failed")
    assert failed and failed[-1].object == "user/admin"
    agent.gate.throttle.succeeded("127.0.0.1")  # later tests are not slowed down
    response = httpx.post(f"{url}/cimom", headers=cim_headers("EnumerateClassNames"))
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic")


def cim_headers(method: str) -> dict[str, str]:
    return {
        "CIMOperation": "MethodCall",
        "CIMMethod": method,
        "CIMObject": "root/cimv2",
        "Content-Type": 'application/xml; charset="utf-8"',
    }


def raw_post(url: str, body: bytes, method: str = "EnumerateClassNames") -> httpx.Response:
    return httpx.post(f"{url}/cimom", content=body, headers=cim_headers(method), auth=ADMIN)


REQUEST = (
    '<?xml version="1.0" encoding="utf-8" ?>'
    '<CIM CIMVERSION="2.0" DTDVERSION="2.0"><MESSAGE ID="1001" PROTOCOLVERSION="1.0">'
    '<SIMPLEREQ><IMETHODCALL NAME="EnumerateClassNames"><LOCALNAMESPACEPATH>'
    '<NAMESPACE NAME="root"/><NAMESPACE NAME="cimv2"/></LOCALNAMESPACEPATH>'
    '<IPARAMVALUE NAME="ClassName"><CLASSNAME NAME="CIM_System"/></IPARAMVALUE>'
    "</IMETHODCALL></SIMPLEREQ></MESSAGE></CIM>"
)

BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + "".join(
        f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10 if i > 1 else "&lol;" * 10}">'
        for i in range(1, 10)
    )
    + "]><CIM>&lol9;</CIM>"
)


def test_raw_request_answers_with_cim_headers(url: str) -> None:
    response = raw_post(url, REQUEST.encode())
    assert response.status_code == 200
    assert response.headers["CIMOperation"] == "MethodResponse"
    assert response.headers["Content-Type"] == "application/xml; charset=utf-8"
    assert b'<CLASSNAME NAME="CIM_ComputerSystem"></CLASSNAME>' in response.content


def test_malformed_and_hostile_xml_are_400(url: str) -> None:
    malformed = raw_post(url, b"<CIM><MESSAGE>")
    assert malformed.status_code == 400
    assert malformed.headers["CIMError"] == "request-not-well-formed"
    started = time.monotonic()
    laughs = raw_post(url, BILLION_LAUGHS.encode())
    assert laughs.status_code == 400 and laughs.headers["CIMError"] == "request-not-valid"
    assert time.monotonic() - started < 5
    external = (
        '<?xml version="1.0"?><!DOCTYPE CIM [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        "<CIM>&x;</CIM>"
    )
    response = raw_post(url, external.encode())
    assert response.status_code == 400 and b"root:" not in response.content
    not_cim = raw_post(url, b"<CIM><NOPE/></CIM>")
    assert not_cim.status_code == 400 and not_cim.headers["CIMError"] == "request-not-valid"


def test_header_mismatch_and_missing_operation(url: str) -> None:
    response = raw_post(url, REQUEST.encode(), method="GetClass")
    assert response.status_code == 400 and response.headers["CIMError"] == "header-mismatch"
    plain = httpx.post(f"{url}/cimom", content=REQUEST.encode(), auth=ADMIN)
    assert plain.status_code == 400 and plain.headers["CIMError"] == "unsupported-operation"


def test_oversize_body_is_413(url: str) -> None:
    response = raw_post(url, b" " * (MAX_BODY_BYTES + 1))
    assert response.status_code == 413


# TLS


def test_tls(app: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # requests lets these override the ca_certs pywbem passes it.
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    cert, key = tmp_path / "host.crt", tmp_path / "host.key"
    ensure_certificate(cert, key, ["localhost", "127.0.0.1"])
    served = Served(app, str(cert), str(key))
    try:
        conn = connect(f"https://127.0.0.1:{served.port}", ca_certs=str(cert))
        assert len(conn.EnumerateInstances("TV_ComputerSystem")) == 2
        conn.close()
    finally:
        served.close()
