# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""Discovery's SOAP session without pyVmomi: its requests, its answers read against pyVmomi's own deserialiser
(on an answer captured from vcsim), paging, cookies and faults, over a fake connection."""

from __future__ import annotations

import email.message
import io
import ssl
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from ansible_collections.virtfleet.core.plugins.module_utils.backends import _vsphere_raw as raw
from ansible_collections.virtfleet.core.plugins.module_utils.backends import vsphere as backend_mod

needs_pyvmomi = pytest.mark.skipif(not backend_mod.HAS_PYVMOMI, reason="pyvmomi not installed")

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


def session() -> raw.Session:
    return raw.Session("127.0.0.1", 443, ssl.create_default_context(), 5, lambda: None)


CONTENT = raw.ServiceContent(ET.fromstring(
    "<returnval xmlns='urn:vim25'><rootFolder type='Folder'>group-d1</rootFolder><propertyCollector "
    "type='PropertyCollector'>propertyCollector</propertyCollector><viewManager type='ViewManager'>ViewManager"
    "</viewManager><sessionManager type='SessionManager'>SessionManager</sessionManager><about><apiType>"
    "VirtualCenter</apiType><version>8.0.3</version></about></returnval>"))


@needs_pyvmomi
def test_fast_reader_matches_pyvmomi_on_the_same_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    from pyVmomi import vim

    body = answer()
    returnval = ET.fromstring(body).find(f".//{raw.VIM}returnval")
    assert returnval is not None
    calls: list[str] = []
    monkeypatch.setattr(raw.Session, "call", lambda self, method, this, args="": calls.append(method) or returnval)
    rows = list(session().retrieve(CONTENT, "<specSet/>", 1000))
    assert calls == ["RetrievePropertiesEx"] and len(rows) == 2
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
    seen: list[tuple[str, tuple[str, str], str]] = []

    def fake(self: Any, method: str, this: tuple[str, str], args: str = "") -> ET.Element:
        seen.append((method, this, args))
        return ET.fromstring(pages[method])

    monkeypatch.setattr(raw.Session, "call", fake)
    rows = list(session().retrieve(CONTENT, "<specSet>spec</specSet>", 500))
    assert [r[1] for r in rows] == ["vm-1", "vm-2"]
    collector = ("PropertyCollector", "propertyCollector")
    assert seen == [("RetrievePropertiesEx", collector, "<specSet>spec</specSet><options><maxObjects>500</maxObjects>"
                                                        "</options>"),
                    ("ContinueRetrievePropertiesEx", collector, "<token>t1</token>")]


def test_specs_are_what_the_wsdl_orders_and_values_are_escaped() -> None:
    spec = raw.filter_spec([("VirtualMachine", ["name", "config.uuid"]), ("HostSystem", [])],
                           [raw.object_spec("ContainerView", "session[1]view", True),
                            raw.object_spec("VirtualMachine", "vm-<1>&")], report_missing=True)
    assert spec == (
        "<specSet><propSet><type>VirtualMachine</type><all>false</all><pathSet>name</pathSet><pathSet>config.uuid"
        "</pathSet></propSet><propSet><type>HostSystem</type><all>false</all></propSet>"
        '<objectSet><obj type="ContainerView">session[1]view</obj><skip>true</skip><selectSet xsi:type='
        '"TraversalSpec"><name>view</name><type>ContainerView</type><path>view</path><skip>false</skip></selectSet>'
        '</objectSet><objectSet><obj type="VirtualMachine">vm-&lt;1&gt;&amp;</obj><skip>false</skip></objectSet>'
        "<reportMissingObjectsInResults>true</reportMissingObjectsInResults></specSet>")
    ET.fromstring(f"<x xmlns:xsi='http://www.w3.org/2001/XMLSchema-instance'>{spec}</x>")  # well-formed


class FakeResponse:
    def __init__(self, status: int, body: bytes, cookies: tuple[str, ...] = ()) -> None:
        self.status, self.body = status, io.BytesIO(body)
        self.headers = email.message.Message()
        for cookie in cookies:
            self.headers["Set-Cookie"] = cookie
        self.sizes: list[int] = []

    def read(self, size: int = -1) -> bytes:
        self.sizes.append(size)
        return self.body.read(size)


class FakeConnection:
    def __init__(self, responses: list[FakeResponse]) -> None:
        self.responses = responses
        self.sent: list[tuple[str, str, bytes, dict[str, str]]] = []
        self.closed = False
        self.budgets: list[float] = []

    def start(self, budget: float) -> None:
        self.budgets.append(budget)

    def request(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> None:
        self.sent.append((method, path, body, headers))

    def getresponse(self) -> FakeResponse:
        return self.responses.pop(0)

    def close(self) -> None:
        self.closed = True


def answering(*responses: FakeResponse) -> tuple[raw.Session, FakeConnection, list[int]]:
    counted: list[int] = []
    conn = FakeConnection(list(responses))
    soap = raw.Session("127.0.0.1", 443, ssl.create_default_context(), 5, lambda: counted.append(1))
    soap._idle.append(conn)  # type: ignore[arg-type]
    return soap, conn, counted


def test_a_call_streams_the_answer_and_keeps_the_session_cookie() -> None:
    body = answer()
    login = FakeResponse(200, b"<soapenv:Envelope xmlns:soapenv='http://schemas.xmlsoap.org/soap/envelope/'>"
                              b"<soapenv:Body><LoginResponse xmlns='urn:vim25'><returnval><key>s1</key>"
                              b"</returnval></LoginResponse></soapenv:Body></soapenv:Envelope>",
                         cookies=("lb=node-2; Path=/", 'vmware_soap_session="abc"; Path=/; HttpOnly; Secure'))
    soap, conn, counted = answering(login, FakeResponse(200, body))
    soap.login(CONTENT, "admin<&>", "p&ss")
    returnval = soap.call("ContinueRetrievePropertiesEx", ("PropertyCollector", "propertyCollector"),
                          "<token>token-1</token>")
    assert len(returnval.findall(f"{raw.VIM}objects")) == 2 and counted == [1, 1]
    assert max(login.sizes) <= 1 << 16  # read in chunks, parsed while it arrives
    (m1, path, first, h1), (m2, _p, second, h2) = conn.sent
    assert (m1, m2, path) == ("POST", "POST", "/sdk") and h1["SOAPAction"] == raw.SOAP_ACTION
    assert "Cookie" not in h1 and h2["Cookie"] == 'vmware_soap_session="abc"'
    request = ET.fromstring(first)
    login_el = request.find(f".//{raw.VIM}Login")
    assert login_el is not None
    assert login_el.findtext(f"{raw.VIM}userName") == "admin<&>" and login_el.findtext(f"{raw.VIM}password") == "p&ss"
    this = login_el.find(f"{raw.VIM}_this")
    assert this is not None and (this.get("type"), this.text) == ("SessionManager", "SessionManager")
    assert b"<token>token-1</token>" in second
    assert soap._idle == [conn] and not conn.closed  # kept alive for the next call


def test_a_fault_raises_its_type_and_message() -> None:
    fault = (b'<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/'
             b'soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault>'
             b'<faultcode>ServerFaultCode</faultcode><faultstring>The session is not authenticated.</faultstring>'
             b'<detail><NotAuthenticatedFault xmlns="urn:vim25" xsi:type="NotAuthenticated"><object type='
             b'"PropertyCollector">propertyCollector</object><privilegeId>System.View</privilegeId>'
             b'</NotAuthenticatedFault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>')
    soap, _conn, _counted = answering(FakeResponse(500, fault))
    with pytest.raises(raw.SoapFault, match="not authenticated") as err:
        soap.call("ContinueRetrievePropertiesEx", ("PropertyCollector", "propertyCollector"), "<token>t</token>")
    assert err.value.kind == "NotAuthenticated"


def test_a_broken_connection_is_closed_not_reused() -> None:
    class Broken(FakeConnection):
        def getresponse(self) -> FakeResponse:
            raise ConnectionResetError("reset by peer")

    soap = raw.Session("127.0.0.1", 443, ssl.create_default_context(), 5, lambda: None)
    conn = Broken([])
    soap._idle.append(conn)  # type: ignore[arg-type]
    with pytest.raises(ConnectionResetError):
        soap.service_content()
    assert conn.closed and soap._idle == []


@pytest.mark.parametrize(("status", "body"), [(404, b"<html><body>Not Found<br></body></html>"),
                                              (404, b"<html><body>Not Found</body></html>"),
                                              (200, b"plain text")])
def test_an_answer_that_is_not_soap_is_one_clear_fault(status: int, body: bytes) -> None:
    soap, conn, _counted = answering(FakeResponse(status, body))
    with pytest.raises(raw.SoapFault, match=f"HTTP {status}, not a vSphere SOAP answer"):
        soap.service_content()
    assert conn.closed == (body != b"<html><body>Not Found</body></html>")  # unparsable: not kept alive
