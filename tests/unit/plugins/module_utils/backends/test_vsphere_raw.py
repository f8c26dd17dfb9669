"""The fast VM reader against pyVmomi's own deserialiser on the same answer (captured from vcsim)."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from ansible_collections.virtfleet.core.plugins.module_utils.backends import _vsphere_raw as raw
from ansible_collections.virtfleet.core.plugins.module_utils.backends import vsphere as backend_mod

pytestmark = pytest.mark.skipif(not backend_mod.HAS_PYVMOMI, reason="pyvmomi not installed")

FIXTURE = Path(__file__).parent / "fixtures" / "vcsim_vm_properties.xml"


def answer() -> bytes:
    """vcsim's RetrievePropertiesEx answer for two VMs, plus a tag and an address to read."""
    text = FIXTURE.read_text()
    tag = ("<OptionValue><key>virtfleet.tag.role</key><value xmlns:XMLSchema-instance="
           "\"http://www.w3.org/2001/XMLSchema-instance\" XMLSchema-instance:type=\"xsd:string\">web</value>"
           "</OptionValue>")
    text = text.replace("XMLSchema-instance:type=\"ArrayOfOptionValue\">",
                        "XMLSchema-instance:type=\"ArrayOfOptionValue\">" + tag, 1)
    text = text.replace("<GuestNicInfo><network>VM Network</network>",
                        "<GuestNicInfo><network>VM Network</network><ipAddress>192.0.2.10</ipAddress>", 1)
    return text.encode()


def with_pyvmomi(body: bytes) -> list[Any]:
    from pyVmomi import SoapAdapter, vmodl

    stub = SoapAdapter.SoapStubAdapter(host="127.0.0.1", version="vim.version.version9")
    result = SoapAdapter.SoapResponseDeserializer(stub).Deserialize(
        io.BytesIO(body), vmodl.query.PropertyCollector.RetrieveResult)
    return list(result.objects)


def test_fast_reader_matches_pyvmomi_on_the_same_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    from pyVmomi import vim

    body = answer()
    returnval = ET.fromstring(body).find(f".//{raw.VIM}returnval")
    assert returnval is not None
    monkeypatch.setattr(raw, "invoke", lambda stub, mo, method, *args: (returnval, len(body)))
    calls: list[int] = []
    rows = list(raw.retrieve(type("Collector", (), {"_stub": None})(), None, None, on_call=lambda: calls.append(1)))
    assert len(calls) == 1 and len(rows) == 2
    networks = {"network-7": "VM Network"}
    fast = {moid: backend_mod.VsphereBackend._guest_from_raw(moid, values, networks, True)
            for kind, moid, values in rows}

    for obj in with_pyvmomi(body):
        props = {p.name: p.val for p in obj.propSet}
        guest = fast[obj.obj._moId]
        assert guest.name == props["name"] and guest.uuid == props["config.uuid"]
        assert guest.vcpus == props["config.hardware.numCPU"] and guest.memory_mib == props["config.hardware.memoryMB"]
        assert guest.power_state == {"poweredOn": "running", "poweredOff": "stopped"}[props["runtime.powerState"]]
        assert guest.host_key == props["runtime.host"]._moId and guest.guest_os == props["config.guestFullName"]
        devices = props["config.hardware.device"]
        disks = [d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)]
        nics = [d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)]
        assert [d.name for d in guest.disks] == [d.deviceInfo.label for d in disks]
        assert [d.source for d in guest.disks] == [d.backing.fileName for d in disks]
        assert [d.bus for d in guest.disks] == ["scsi"] * len(disks)
        assert [n.mac for n in guest.nics] == [n.macAddress.lower() for n in nics]
        assert [n.model for n in guest.nics] == [type(n).__name__.rsplit(".", 1)[-1][7:].lower() for n in nics]
        tags = {o.key[len("virtfleet.tag."):]: o.value for o in props["config.extraConfig"]
                if o.key.startswith("virtfleet.tag.")}
        assert guest.tags == tags
        ips = sorted({a for nic in props["guest.net"] or [] for a in nic.ipAddress or []})
        assert guest.ip_addresses == ips
    assert any(g.tags == {"role": "web"} for g in fast.values()), "the fixture's tag was not read"
    assert any(g.ip_addresses == ["192.0.2.10"] for g in fast.values())


def test_paging_follows_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    pages = {
        "RetrievePropertiesEx": "<returnval xmlns='urn:vim25'><token>t1</token><objects><obj type='VirtualMachine'>"
                                "vm-1</obj></objects></returnval>",
        "ContinueRetrievePropertiesEx": "<returnval xmlns='urn:vim25'><objects><obj type='VirtualMachine'>vm-2</obj>"
                                        "</objects></returnval>",
    }
    seen: list[tuple[str, tuple[Any, ...]]] = []

    def fake(stub: Any, mo: Any, method: str, *args: Any) -> tuple[ET.Element, int]:
        seen.append((method, args))
        return ET.fromstring(pages[method]), 0

    monkeypatch.setattr(raw, "invoke", fake)
    rows = list(raw.retrieve(type("Collector", (), {"_stub": None})(), "spec", "opts", on_call=lambda: None))
    assert [r[1] for r in rows] == ["vm-1", "vm-2"]
    assert seen == [("RetrievePropertiesEx", (["spec"], "opts")), ("ContinueRetrievePropertiesEx", ("t1",))]


class FakeResponse:
    def __init__(self, status: int, body: bytes) -> None:
        self.status, self.body = status, io.BytesIO(body)

    def read(self, size: int = -1) -> bytes:
        return self.body.read(size)


class FakeConnection:
    def __init__(self, response: FakeResponse) -> None:
        self.response = response
        self.sent: list[tuple[str, str, Any, dict[str, str]]] = []

    def request(self, method: str, path: str, body: Any, headers: dict[str, str]) -> None:
        self.sent.append((method, path, body, headers))

    def getresponse(self) -> FakeResponse:
        return self.response

    def close(self) -> None:
        pass


def stub_answering(status: int, body: bytes) -> Any:
    from pyVmomi import SoapAdapter

    stub = SoapAdapter.SoapStubAdapter(host="127.0.0.1", version="vim.version.version9")
    conn = FakeConnection(FakeResponse(status, body))
    stub.GetConnection = lambda: conn  # type: ignore[method-assign]
    stub.ReturnConnection = lambda c: None  # type: ignore[method-assign]
    return stub, conn


def test_invoke_streams_the_answer_and_sends_pyvmomis_request() -> None:
    from pyVmomi import vmodl

    body = answer()
    stub, conn = stub_answering(200, body)
    collector = vmodl.query.PropertyCollector("propertyCollector", stub)
    returnval, size = raw.invoke(stub, collector, "ContinueRetrievePropertiesEx", "token-1")
    assert size == len(body) and len(returnval.findall(f"{raw.VIM}objects")) == 2
    method, path, request, headers = conn.sent[0]
    assert method == "POST" and path == "/sdk" and headers["SOAPAction"] == stub.versionId
    text = request if isinstance(request, str) else request.decode()
    assert "<ContinueRetrievePropertiesEx" in text and "token-1" in text


def test_invoke_raises_the_fault_pyvmomi_would() -> None:
    from pyVmomi import vim, vmodl

    fault = (b'<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/'
             b'soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault>'
             b'<faultcode>ServerFaultCode</faultcode><faultstring>The session is not authenticated.</faultstring>'
             b'<detail><NotAuthenticatedFault xmlns="urn:vim25" xsi:type="NotAuthenticated"><object type='
             b'"PropertyCollector">propertyCollector</object><privilegeId>System.View</privilegeId>'
             b'</NotAuthenticatedFault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>')
    stub = stub_answering(500, fault)[0]
    collector = vmodl.query.PropertyCollector("propertyCollector", stub)
    with pytest.raises(Exception, match="not authenticated") as err:
        raw.invoke(stub, collector, "ContinueRetrievePropertiesEx", "token-1")
    assert isinstance(err.value, vim.fault.NotAuthenticated)
