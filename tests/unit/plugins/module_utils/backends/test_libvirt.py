# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""LibvirtBackend against a fake libvirt connection: bulk calls only, normalised facts."""

from __future__ import annotations

from typing import Any

import pytest

from ansible_collections.virtfleet.core.plugins.module_utils._endpoints import parse_endpoint
from ansible_collections.virtfleet.core.plugins.module_utils.backends import libvirt as backend_mod

CAPS = """<capabilities><host><cpu><model>Skylake</model></cpu></host>
<guest><arch name='x86_64'><domain type='qemu'/><domain type='kvm'/></arch></guest></capabilities>"""


def domain_xml(i: int) -> str:
    return f"""<domain type='kvm'><name>vm{i}</name><uuid>00000000-0000-0000-0000-{i:012d}</uuid>
<memory unit='KiB'>{1048576 * (i + 1)}</memory><vcpu placement='static' current='{i + 1}'>8</vcpu>
<metadata><vf:guest xmlns:vf="{backend_mod.METADATA_NS}"><vf:tag name="role">web</vf:tag></vf:guest>
<libosinfo:libosinfo xmlns:libosinfo="{backend_mod.LIBOSINFO_NS}"><libosinfo:os id="http://debian.org/debian/12"/>
</libosinfo:libosinfo></metadata>
<devices><disk type='file' device='disk'><source file='/pool/vm{i}.qcow2'/><target dev='vda' bus='virtio'/></disk>
<disk type='file' device='cdrom'><target dev='sda' bus='sata'/></disk>
<interface type='network'><mac address='52:54:00:00:00:{i:02X}'/><source network='lab'/><model type='virtio'/>
</interface></devices></domain>"""


class FakeDomain:
    def __init__(self, i: int, counter: dict[str, int]) -> None:
        self.i, self.counter = i, counter

    def XMLDesc(self, _flags: int) -> str:
        self.counter["XMLDesc"] = self.counter.get("XMLDesc", 0) + 1
        return domain_xml(self.i)


class FakeNetwork:
    def name(self) -> str:
        return "lab"

    def isActive(self) -> bool:
        return True

    def DHCPLeases(self) -> list[dict[str, Any]]:
        return [{"mac": "52:54:00:00:00:01", "ipaddr": "192.0.2.11"}]


class FakePool:
    def name(self) -> str:
        return "images"

    def info(self) -> list[int]:
        return [2, 100 * 1024**3, 40 * 1024**3, 60 * 1024**3]

    def XMLDesc(self, _flags: int) -> str:
        return "<pool type='dir'><name>images</name></pool>"


class FakeConn:
    def __init__(self, n: int) -> None:
        self.counter: dict[str, int] = {}
        self.domains = [FakeDomain(i, self.counter) for i in range(n)]

    def getCapabilities(self) -> str:
        return CAPS

    def getType(self) -> str:
        return "QEMU"

    def getVersion(self) -> int:
        return 7002022

    def getLibVersion(self) -> int:
        return 9000000

    def getHostname(self) -> str:
        return "kvm01"

    def getInfo(self) -> list[Any]:
        return ["x86_64", 64000, 16, 2400, 1, 2, 4, 2]

    def getFreeMemory(self) -> int:
        return 32000 * 1024 * 1024

    def getSysinfo(self, _flags: int) -> str:
        return ("<sysinfo type='smbios'><system><entry name='manufacturer'>Dell Inc.</entry>"
                "<entry name='product'>PowerEdge R650</entry><entry name='serial'>ABC123</entry></system></sysinfo>")

    def listAllStoragePools(self, _flags: int) -> list[FakePool]:
        return [FakePool()]

    def listAllNetworks(self, _flags: int) -> list[FakeNetwork]:
        return [FakeNetwork()]

    def getAllDomainStats(self, _stats: int, _flags: int) -> list[Any]:
        self.counter["getAllDomainStats"] = self.counter.get("getAllDomainStats", 0) + 1
        return [(d, {"state.state": 1 if d.i % 2 else 5, "block.count": 1, "block.0.name": "vda",
                     "block.0.capacity": 20 * 1024**3}) for d in self.domains]

    def close(self) -> None:
        pass


@pytest.fixture()
def backend(monkeypatch: pytest.MonkeyPatch) -> Any:
    if not backend_mod.HAS_LIBVIRT:
        pytest.skip("libvirt-python not installed")
    conn = FakeConn(50)
    monkeypatch.setattr(backend_mod.libvirt, "open", lambda _uri: conn)
    b = backend_mod.LibvirtBackend(parse_endpoint("qemu:///system"), 5)
    b.fake = conn
    return b


def test_discover_maps_host_and_guests(backend: Any) -> None:
    found = backend.discover(guests=True)
    host = found.hypervisors[0]
    assert (host.name, host.type, host.version, host.build) == ("kvm01", "kvm", "7.2.22", "9.0.0")
    hw = host.hardware
    assert (hw.vendor, hw.model, hw.serial) == ("Dell Inc.", "PowerEdge R650", "ABC123")
    assert (host.cpu.model, host.cpu.sockets, host.cpu.cores, host.cpu.threads) == ("Skylake", 2, 8, 16)
    assert (host.memory_mib, host.memory_free_mib) == (64000, 32000)
    assert host.storage[0].capacity_gib == 100.0 and host.storage[0].free_gib == 60.0
    assert host.guests.total == 50 and host.guests.running == 25 and host.guests.stopped == 25
    vm1 = next(g for g in found.guests if g.name == "vm1")
    assert vm1.power_state == "running" and vm1.vcpus == 2 and vm1.memory_mib == 2048
    assert vm1.tags == {"role": "web"} and vm1.guest_os == "http://debian.org/debian/12"
    assert [(d.name, d.size_gib, d.bus) for d in vm1.disks] == [("vda", 20.0, "virtio")]  # the cdrom is not a disk
    assert vm1.nics[0].mac == "52:54:00:00:00:01" and vm1.nics[0].network == "lab"
    assert vm1.ip_addresses == ["192.0.2.11"]


def test_one_bulk_stats_call_and_one_xml_per_domain(backend: Any) -> None:
    backend.discover(guests=True)
    assert backend.fake.counter == {"getAllDomainStats": 1, "XMLDesc": 50}
