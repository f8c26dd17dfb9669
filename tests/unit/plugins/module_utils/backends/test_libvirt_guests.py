# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""LibvirtBackend's convergence half against a fake libvirt daemon that behaves like libvirtd 9.0 where it matters:
create-exclusive defines and volumes, user aliases dropped unless ^ua-[A-Za-z0-9_-]+$, console passwords only in
VIR_DOMAIN_XML_SECURE, setMetadata putting our element into its namespace. Kill points are a BaseException
raised from a fake call (the backend's clean-up never sees it, as with a SIGKILL); the next run must converge.
"""

from __future__ import annotations

import copy
import re
import uuid
import xml.etree.ElementTree as ET
from typing import Any, Callable

import pytest

from ansible_collections.virtfleet.core.plugins.module_utils._changes import Change, GuestPlan
from ansible_collections.virtfleet.core.plugins.module_utils._converge import RunOptions, converge
from ansible_collections.virtfleet.core.plugins.module_utils._endpoints import parse_endpoint
from ansible_collections.virtfleet.core.plugins.module_utils._errors import ConfigError, EndpointError
from ansible_collections.virtfleet.core.plugins.module_utils._model import (
    DiskSpec,
    GuestSpec,
    NicSpec,
    Placement,
    guest_spec_from_dict,
)
from ansible_collections.virtfleet.core.plugins.module_utils._plan import PlanOptions
from ansible_collections.virtfleet.core.plugins.module_utils.backends import libvirt as backend_mod
from ansible_collections.virtfleet.core.plugins.module_utils.backends.libvirt import apply, discovery

lv = pytest.importorskip("libvirt")
NS = backend_mod.METADATA_NS
POOL = "images"
PLACE = Placement(pool=POOL, domain_type="qemu")
DOMCAPS = """<domainCapabilities><os supported='yes'><enum name='firmware'>{efi}</enum>{loader}</os>
<devices><disk supported='yes'><enum name='bus'><value>ide</value><value>fdc</value><value>scsi</value>
<value>virtio</value><value>usb</value><value>sata</value></enum></disk></devices></domainCapabilities>"""


class Killed(BaseException):
    """The process died here: no except-Exception clean-up runs."""


def error(code: int, msg: str) -> Any:
    exc = lv.libvirtError(msg)
    exc.err = (code, 0, msg, 2, None, None, None, 0, 0)
    return exc


class FakeVol:
    def __init__(self, pool: FakePool, name: str, capacity: int) -> None:
        self.pool, self._name, self.capacity, self.data = pool, name, capacity, b""

    def name(self) -> str:
        return self._name

    def info(self) -> list[int]:
        return [0, self.capacity, self.capacity]

    def resize(self, size: int, flags: int) -> int:
        self.pool.conn.hook("resize")
        if size < self.capacity and not flags & lv.VIR_STORAGE_VOL_RESIZE_SHRINK:
            raise error(lv.VIR_ERR_INVALID_ARG, "invalid argument: Can't shrink capacity below current capacity "
                        "unless shrink flag explicitly specified")
        self.capacity = size
        return 0

    def storagePoolLookupByVolume(self) -> FakePool:
        return self.pool

    def delete(self, _flags: int) -> int:
        self.pool.conn.hook("delete")
        self.pool.volumes.pop(self._name, None)
        return 0

    def upload(self, stream: FakeStream, *_args: Any) -> int:
        self.pool.conn.hook("upload")
        stream.target = self
        return 0


class FakeStream:
    target: FakeVol | None = None

    def send(self, data: bytes) -> int:
        assert self.target is not None
        self.target.data = data
        return len(data)

    def finish(self) -> None:
        pass


class FakePool:
    def __init__(self, conn: FakeConn, name: str) -> None:
        self.conn, self._name, self.volumes = conn, name, {}

    def name(self) -> str:
        return self._name

    def isActive(self) -> int:
        return 1

    def storageVolLookupByName(self, name: str) -> FakeVol:
        if name not in self.volumes:
            raise error(lv.VIR_ERR_NO_STORAGE_VOL, f"Storage volume not found: {name}")
        return self.volumes[name]

    def listVolumes(self) -> list[str]:
        return list(self.volumes)

    def createXML(self, xml: str, _flags: int) -> FakeVol:
        self.conn.hook("createXML")
        root = ET.fromstring(xml)
        name = root.findtext("name") or ""
        if name in self.volumes:
            raise error(lv.VIR_ERR_STORAGE_VOL_EXIST, f"storage volume '{name}' exists already")
        self.volumes[name] = FakeVol(self, name, int(root.findtext("capacity") or 0))
        return self.volumes[name]

    def createXMLFrom(self, xml: str, _source: Any, flags: int) -> FakeVol:
        return self.createXML(xml, flags)


class FakeDom:
    def __init__(self, conn: FakeConn, root: ET.Element) -> None:
        self.conn, self.root, self.active, self.auto, self.live_root = conn, root, False, False, None

    def name(self) -> str:
        return self.root.findtext("name") or ""

    def UUIDString(self) -> str:
        return self.root.findtext("uuid") or ""

    def XMLDesc(self, flags: int) -> str:
        self.conn.hook("XMLDesc" if flags & lv.VIR_DOMAIN_XML_INACTIVE else "XMLDesc live")
        root = copy.deepcopy(self.live_root if self.active and not flags & lv.VIR_DOMAIN_XML_INACTIVE and
                             self.live_root is not None else self.root)
        if not flags & lv.VIR_DOMAIN_XML_SECURE:
            for graphics in root.iter("graphics"):
                graphics.attrib.pop("passwd", None)
        return ET.tostring(root, encoding="unicode")

    def setMetadata(self, _type: int, text: str | None, key: str | None, uri: str, flags: int) -> int:
        self.conn.hook("setMetadata")
        self.conn.metadata_writes += 1
        if text is not None and "xmlns" in text:
            raise error(lv.VIR_ERR_INTERNAL_ERROR, "failed to create a new XML namespace")
        roots = [self.root] if flags & lv.VIR_DOMAIN_AFFECT_CONFIG else []
        if flags & lv.VIR_DOMAIN_AFFECT_LIVE:
            if not self.active:
                raise error(lv.VIR_ERR_OPERATION_INVALID, "domain is not running")
            roots.append(self.live_root)
        for root in roots:
            metadata = root.find("metadata")
            if metadata is None:
                metadata = ET.SubElement(root, "metadata")
            for old in [e for e in metadata if e.tag.startswith(f"{{{uri}}}")]:
                metadata.remove(old)
            if text is not None:
                new = ET.fromstring(text)
                for element in new.iter():
                    element.tag = f"{{{uri}}}{element.tag}"
                metadata.append(new)
        return 0

    def setAutostart(self, value: int) -> int:
        self.conn.hook("setAutostart")
        self.auto = bool(value)
        return 0

    def state(self) -> list[int]:
        return [lv.VIR_DOMAIN_RUNNING if self.active else lv.VIR_DOMAIN_SHUTOFF, 0]

    def create(self) -> int:
        self.conn.hook("create")
        self.active, self.live_root = True, copy.deepcopy(self.root)
        return 0

    def shutdown(self) -> int:
        self.active = False
        return 0

    def destroy(self) -> int:
        self.conn.hook("destroy")
        if not self.active:
            raise error(lv.VIR_ERR_OPERATION_INVALID, "Requested operation is not valid: domain is not running")
        self.active = False
        return 0

    def undefineFlags(self, _flags: int) -> int:
        self.conn.hook("undefine")
        self.conn.domains.remove(self)
        return 0

    def setVcpusFlags(self, *_args: Any) -> int:
        return 0

    def isActive(self) -> int:
        return int(self.active)

    def _image(self, dev: str) -> FakeVol:
        for disk in self.root.findall("./devices/disk"):
            target, source = disk.find("target"), disk.find("source")
            if target is not None and source is not None and target.get("dev") == dev:
                return self.conn.pools[source.get("pool") or POOL].volumes[source.get("volume") or ""]
        raise error(lv.VIR_ERR_INVALID_ARG, f"invalid argument: disk '{dev}' was not found in the domain config")

    def blockInfo(self, dev: str, _flags: int) -> list[int]:
        capacity = self._image(dev).capacity
        return [capacity, capacity, capacity]

    def blockResize(self, dev: str, size: int, _flags: int) -> int:
        self.conn.hook("blockResize")
        if not self.active:
            raise error(lv.VIR_ERR_OPERATION_INVALID, "Requested operation is not valid: domain is not running")
        self._image(dev).capacity = size  # QEMU resizes the open image, a smaller size too
        return 0

    def attachDeviceFlags(self, *_args: Any) -> int:
        return 0


class FakeConn:
    """A libvirtd with one pool and one network. HOOKS[name] runs before that call does anything."""

    def __init__(self, efi: bool = True) -> None:
        self.domains: list[FakeDom] = []
        self.pools = {POOL: FakePool(self, POOL)}
        self.hooks: dict[str, Callable[[], None]] = {}
        self.defines = self.metadata_writes = 0
        self.efi = efi

    def hook(self, name: str) -> None:
        if name in self.hooks:
            self.hooks[name]()

    # reads
    def getInfo(self) -> list[Any]:
        return ["x86_64", 16000, 8, 2400, 1, 1, 8, 1]

    def getCapabilities(self) -> str:
        return "<capabilities><guest><arch name='x86_64'><domain type='qemu'/></arch></guest></capabilities>"

    def getDomainCapabilities(self, *_args: Any) -> str:
        self.hook("getDomainCapabilities")
        return DOMCAPS.format(efi="<value>efi</value>" if self.efi else "",
                              loader="<loader supported='yes'><value>/ovmf.fd</value></loader>" if self.efi else "")

    def listAllNetworks(self, _flags: int) -> list[Any]:
        net = type("Net", (), {"name": lambda self: "lan"})
        return [net()]

    def listAllStoragePools(self, _flags: int) -> list[FakePool]:
        return list(self.pools.values())

    def storagePoolLookupByName(self, name: str) -> FakePool:
        if name not in self.pools:
            raise error(lv.VIR_ERR_NO_STORAGE_POOL, f"no pool {name}")
        return self.pools[name]

    def storageVolLookupByPath(self, path: str) -> FakeVol:
        raise error(lv.VIR_ERR_NO_STORAGE_VOL, f"no volume at {path}")

    def getAllDomainStats(self, _stats: int, _flags: int) -> list[Any]:
        return [(d, {"state.state": d.state()[0], "block.count": 0}) for d in self.domains]

    def listAllDomains(self, flags: int) -> list[FakeDom]:
        if flags & lv.VIR_CONNECT_LIST_DOMAINS_AUTOSTART:
            return [d for d in self.domains if d.auto]
        return list(self.domains)

    def lookupByName(self, name: str) -> FakeDom:
        for dom in self.domains:
            if dom.name() == name:
                return dom
        raise error(lv.VIR_ERR_NO_DOMAIN, f"no domain {name}")

    def lookupByUUIDString(self, value: str) -> FakeDom:
        for dom in self.domains:
            if dom.UUIDString() == value:
                return dom
        raise error(lv.VIR_ERR_NO_DOMAIN, f"no domain {value}")

    def newStream(self, _flags: int) -> FakeStream:
        return FakeStream()

    # mutators
    def defineXML(self, xml: str) -> FakeDom:
        self.hook("defineXML")
        self.defines += 1
        root = ET.fromstring(xml)
        if root.find("uuid") is None:
            ET.SubElement(root, "uuid").text = str(uuid.uuid4())
        for target in root.iter("target"):
            if target.get("bus") == "nvme":
                raise error(lv.VIR_ERR_XML_ERROR, "Invalid value for attribute 'bus' in element 'target': 'nvme'")
        for disk in root.iter("disk"):
            alias = disk.find("alias")
            if alias is not None and not re.fullmatch(r"ua-[A-Za-z0-9_-]+", alias.get("name", "")):
                disk.remove(alias)  # what libvirtd does with a user alias it does not accept: nothing said
        name, uid = root.findtext("name"), root.findtext("uuid")
        for dom in self.domains:
            if dom.name() == name and dom.UUIDString() != uid:
                raise error(lv.VIR_ERR_OPERATION_FAILED, f"domain '{name}' already exists with uuid {dom.UUIDString()}")
            if dom.UUIDString() == uid:
                dom.root = root
                return dom
        dom = FakeDom(self, root)
        self.domains.append(dom)
        return dom

    def close(self) -> None:
        pass


@pytest.fixture()
def conn(monkeypatch: pytest.MonkeyPatch) -> FakeConn:
    fake = FakeConn()
    monkeypatch.setattr(backend_mod.libvirt, "open", lambda _uri: fake)
    return fake


def backend() -> Any:
    return backend_mod.LibvirtBackend(parse_endpoint("qemu:///system"), 5)


def desired(name: str = "web01", **extra: Any) -> GuestSpec:
    data = {"name": name, "vcpus": 1, "memory_mib": 512, "disks": [{"name": "root", "size_gib": 1},
                                                                   {"name": "data", "size_gib": 2}],
            "nics": [{"network": "lan"}], "cloud_init": {"meta_data": {"instance-id": name}}, "tags": {"t": "1"}}
    data.update(extra)
    return guest_spec_from_dict(data)


def run(specs: list[GuestSpec], check: bool = False, **plan: Any) -> list[dict[str, Any]]:
    with backend() as b:
        return [r.to_dict() for r in converge(b, specs, PLACE, RunOptions(plan=PlanOptions(**plan), check_mode=check))]


def state(name: str = "web01") -> Any:
    with backend() as b:
        return next(s for s in b.read_guests(PLACE) if s.spec.name == name)


def after_first_read(b: Any, action: Callable[[], None]) -> None:
    """B runs ACTION once, right after its first read_guests (the read its plan is made from): what another run
    or a person does between a run's read and its apply. Later reads (the read-back) see the result as it is."""
    read = b.read_guests
    done: list[bool] = []

    def read_then(placement: Any) -> Any:
        states = read(placement)
        if not done:
            done.append(True)
            action()
        return states

    b.read_guests = read_then


def volumes(conn: FakeConn) -> set[str]:
    return set(conn.pools[POOL].volumes)


def full(name: str = "web01") -> GuestSpec:
    """A complete spec, as the planner hands one to create_guest."""
    return GuestSpec(name=name, vcpus=1, memory_mib=512, firmware="bios", autostart=False, tags={},
                     disks=[DiskSpec(name="root", size_gib=1, pool=POOL, format="qcow2", bus="virtio")],
                     nics=[NicSpec(network="lan", mac="52:54:00:00:00:01", model="virtio")])


# ------------------------------------------------------------------ the contract: owner mark bound to the uuid
def test_create_marks_the_guest_with_owner_and_its_own_uuid(conn: FakeConn) -> None:
    with backend() as b:
        b.capacity(PLACE)
        made = b.create_guest(full(), PLACE, "team-a")
    assert made.spec.uuid and made.owner == "team-a" and made.created_disks == ["root"]
    dom = conn.lookupByName("web01")
    mark = dom.root.find(f"./metadata/{{{NS}}}guest")
    assert mark is not None and mark.get("owner") == "team-a" and mark.get("uuid") == dom.UUIDString() == made.spec.uuid
    read = state()
    assert read.owned_by("team-a") and not read.owned_by("team-b") and read.created_disks == ["root"]


def test_a_copy_of_an_owned_definition_under_a_new_uuid_owns_nothing(conn: FakeConn) -> None:
    with backend() as b:
        b.capacity(PLACE)
        b.create_guest(full(), PLACE, "team-a")
    clone = copy.deepcopy(conn.lookupByName("web01").root)
    clone.find("name").text = "clone01"  # type: ignore[union-attr]
    clone.find("uuid").text = str(uuid.uuid4())  # type: ignore[union-attr]
    conn.defineXML(ET.tostring(clone, encoding="unicode"))
    copied = state("clone01")
    assert copied.owner is None and copied.created_disks == [] and not copied.owned_by("team-a")


def test_create_is_exclusive_a_guest_defined_meanwhile_is_never_overwritten(conn: FakeConn) -> None:
    with backend() as b:
        b.capacity(PLACE)
        conn.defineXML("<domain type='qemu'><name>web01</name><memory>1</memory></domain>")  # another run
        other = conn.lookupByName("web01").root
        with pytest.raises(EndpointError, match="guest 'web01' was created meanwhile by another run"):
            b.create_guest(full(), PLACE, "team-a")
    assert conn.lookupByName("web01").root is other and len(conn.domains) == 1
    assert volumes(conn) == set(), "nothing of ours may exist, nothing of theirs was touched"


def test_create_with_a_user_uuid_is_exclusive_too(conn: FakeConn) -> None:
    uid = str(uuid.uuid4())
    conn.defineXML(f"<domain type='qemu'><name>web01</name><uuid>{uid}</uuid><memory>1</memory></domain>")
    other = conn.lookupByName("web01").root
    with backend() as b, pytest.raises(EndpointError, match="created meanwhile"):
        b.capacity(PLACE)
        b.create_guest(GuestSpec(**{**full().__dict__, "uuid": uid}), PLACE, "team-a")
    assert conn.lookupByName("web01").root is other


def test_a_volume_created_meanwhile_means_another_run_took_the_guest_over_and_nothing_is_undone(
        conn: FakeConn) -> None:
    spec = full()
    spec.disks = [DiskSpec(name="root", size_gib=1, pool=POOL, format="qcow2", bus="virtio"),
                  DiskSpec(name="data", size_gib=1, pool=POOL, format="qcow2", bus="virtio")]
    pool = conn.pools[POOL]

    def other_run_makes_data() -> None:
        if "web01+root.qcow2" in pool.volumes and "web01+data.qcow2" not in pool.volumes:
            pool.volumes["web01+data.qcow2"] = FakeVol(pool, "web01+data.qcow2", 5)

    conn.hooks["createXML"] = other_run_makes_data
    with backend() as b, pytest.raises(EndpointError, match=r"volume 'web01\+data\.qcow2' was created meanwhile"):
        b.capacity(PLACE)
        b.create_guest(spec, PLACE, "team-a")
    # The other run read the defined guest and made its missing volume: undefining it (or deleting root, which its
    # definition names) would lose the guest that run converges. Nothing of the other run's is touched either.
    assert [d.name() for d in conn.domains] == ["web01"]
    assert volumes(conn) == {"web01+root.qcow2", "web01+data.qcow2"}


def test_a_disk_another_run_adds_at_the_same_time_is_not_rolled_back(conn: FakeConn) -> None:
    run([desired()])
    more = desired(disks=[{"name": "root", "size_gib": 1}, {"name": "data", "size_gib": 2},
                          {"name": "logs", "size_gib": 1}])
    pool = conn.pools[POOL]

    def other_run_made_logs() -> None:  # it planned the same disk, defined it as we did and made it first
        if "web01+logs.qcow2" not in pool.volumes:
            pool.volumes["web01+logs.qcow2"] = FakeVol(pool, "web01+logs.qcow2", 1024**3)

    conn.hooks["createXML"] = other_run_made_logs
    lost = run([more])[0]
    del conn.hooks["createXML"]
    assert lost["failed"] and "created meanwhile by another run" in lost["msg"], lost
    assert conn.lookupByName("web01").root.findall("./devices/disk/alias[@name='ua-logs']"), "its disk was dropped"
    assert run([more])[0]["changed"] is False


def test_a_guest_another_run_stopped_or_undefined_meanwhile_is_read_and_removed_without_an_error(
        conn: FakeConn) -> None:
    run([desired(state="running")])
    dom = conn.lookupByName("web01")

    def undefined_meanwhile() -> None:
        raise error(lv.VIR_ERR_NO_DOMAIN, "Domain not found")

    conn.hooks["XMLDesc live"] = undefined_meanwhile  # after the stats said running
    with backend() as b:
        assert [s.spec.name for s in b.read_guests(PLACE)] == [], "a guest undefined meanwhile is not there"
    del conn.hooks["XMLDesc live"]
    conn.hooks["XMLDesc live"] = lambda: (x for x in ()).throw(error(lv.VIR_ERR_INTERNAL_ERROR, "connection lost"))
    with backend() as b, pytest.raises(EndpointError, match="live definition: connection lost"):
        b.read_guests(PLACE)  # any other error is not taken for the guest being gone
    del conn.hooks["XMLDesc live"]
    conn.hooks["destroy"] = lambda: setattr(dom, "active", False)  # the other run's power off came first
    removed = run([desired(state="absent")])[0]
    assert not removed["failed"] and removed["changed"], removed
    assert conn.domains == []


def test_a_volume_the_creating_run_makes_after_our_read_stays_recorded_as_created(conn: FakeConn) -> None:
    """Run A defined web01 (recording root and data as created) and is about to make their volumes; run B read it
    with both missing and plans to make them. A makes them first: B finds them, and the record A wrote stays, so
    a removal with remove_storage still deletes them."""
    conn.hooks["createXML"] = lambda: (x for x in ()).throw(Killed("A is still creating"))
    with pytest.raises(Killed):
        run([desired()])
    del conn.hooks["createXML"]
    pool = conn.pools[POOL]

    def a_makes_them() -> None:
        for name in ("web01+root.qcow2", "web01+data.qcow2"):
            pool.volumes.setdefault(name, FakeVol(pool, name, 2 * 1024**3))

    with backend() as b:
        after_first_read(b, a_makes_them)
        result = converge(b, [desired()], PLACE, RunOptions())[0].to_dict()
    assert not result["failed"], result
    assert sorted(state().created_disks) == ["data", "root"], "the other run's record was overwritten"
    run([guest_spec_from_dict({"name": "web01", "state": "absent"})], remove_storage=True)
    assert volumes(conn) == set()


def test_a_seed_another_run_is_still_writing_is_waited_for(conn: FakeConn) -> None:
    busy = {"n": 0}

    def in_use() -> None:
        busy["n"] += 1
        if busy["n"] <= 2:
            raise error(lv.VIR_ERR_OPERATION_INVALID, "Requested operation is not valid: volume 'web01+cidata.iso' "
                        "is still in use.")

    conn.hooks["upload"] = in_use
    result = run([desired()])[0]
    assert not result["failed"], result
    assert busy["n"] == 3 and b"instance-id" in conn.pools[POOL].volumes["web01+cidata.iso"].data


def test_a_power_off_refused_while_the_guest_still_runs_is_an_error(conn: FakeConn) -> None:
    run([desired(state="running")])
    conn.hooks["destroy"] = lambda: (x for x in ()).throw(error(lv.VIR_ERR_OPERATION_FAILED, "device busy"))
    removed = run([desired(state="absent")])[0]
    assert removed["failed"] and "power off guest 'web01': device busy" in removed["msg"], removed
    assert conn.lookupByName("web01").active


def test_a_running_guests_disk_grown_meanwhile_is_not_shrunk_and_a_guest_stopped_meanwhile_grows_offline(
        conn: FakeConn) -> None:
    run([desired(state="running")])
    root = conn.pools[POOL].volumes["web01+root.qcow2"]
    dom = conn.lookupByName("web01")
    bigger = desired(state="running", disks=[{"name": "root", "size_gib": 2}, {"name": "data", "size_gib": 2}])
    with backend() as b:
        after_first_read(b, lambda: setattr(root, "capacity", 3 * 1024**3))  # another run grew it to 3 GiB
        result = converge(b, [bigger], PLACE, RunOptions())[0].to_dict()
    assert not result["failed"] and root.capacity == 3 * 1024**3, (result, root.capacity)
    root.capacity = 1024**3
    conn.hooks["blockResize"] = lambda: setattr(dom, "active", False)  # stopped just before the live resize
    result = run([desired(disks=[{"name": "root", "size_gib": 2}, {"name": "data", "size_gib": 2}])])[0]
    assert not result["failed"] and root.capacity == 2 * 1024**3, (result, root.capacity)


def test_a_failed_create_keeps_a_reused_volume(conn: FakeConn) -> None:
    conn.pools[POOL].volumes["web01+root.qcow2"] = FakeVol(conn.pools[POOL], "web01+root.qcow2", 1024**3)
    conn.hooks["setAutostart"] = lambda: (x for x in ()).throw(error(lv.VIR_ERR_INTERNAL_ERROR, "boom"))
    spec = full()
    spec.autostart = True
    with backend() as b, pytest.raises(EndpointError, match="boom"):
        b.capacity(PLACE)
        b.create_guest(spec, PLACE, "team-a")
    assert conn.domains == [] and volumes(conn) == {"web01+root.qcow2"}


# ------------------------------------------------------------------ A: what libvirt stored, not what was sent
def test_a_disk_whose_alias_libvirt_drops_is_rolled_back_with_one_clear_error(conn: FakeConn) -> None:
    spec = full()
    spec.disks = [DiskSpec(name="root.v1", size_gib=1, pool=POOL, format="qcow2", bus="virtio")]
    with backend() as b, pytest.raises(EndpointError) as failure:
        b.capacity(PLACE)
        b.create_guest(spec, PLACE, "team-a")
    assert "guest 'web01' disk 'root.v1': libvirt dropped its alias 'ua-root.v1'" in str(failure.value)
    assert "\n" not in str(failure.value) and conn.domains == [] and volumes(conn) == set()


def test_an_added_disk_whose_alias_is_dropped_restores_the_previous_definition(conn: FakeConn) -> None:
    run([desired()])
    before = ET.tostring(conn.lookupByName("web01").root, encoding="unicode")
    current = state()
    disk = {"name": "x.v2", "size_gib": 1, "pool": POOL, "format": "qcow2", "bus": "virtio", "source": None}
    plan = GuestPlan(desired=current.spec, current=current, action="update", after=current.spec,
                     changes=[Change("disks", None, disk, key="x.v2")])
    with backend() as b, pytest.raises(EndpointError, match=r"guest 'web01' disk 'x\.v2': libvirt dropped its alias"):
        b.update_guest(current, plan)
    after = ET.tostring(conn.lookupByName("web01").root, encoding="unicode")
    assert after == before and "web01+x.v2.qcow2" not in volumes(conn)


@pytest.mark.parametrize("name", ["virtfleet-cidata", "vdb", "sda", "hdc", "nvme0n1", "root.v1"])
def test_disk_names_that_cannot_round_trip_are_refused_before_anything_changes(conn: FakeConn, name: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"disks[1].name='{name}'")):
        run([desired(disks=[{"name": "root", "size_gib": 1}, {"name": name, "size_gib": 1}])])
    assert conn.domains == [] and volumes(conn) == set()


# ------------------------------------------------------------------ B: kill points
CREATE_KILLS = ["createXML#1", "createXML#2", "createXML#3", "upload#1", "setMetadata#1"]


@pytest.mark.parametrize("point", CREATE_KILLS)
def test_a_create_killed_anywhere_is_converged_by_the_next_run_and_stays_removable(conn: FakeConn,
                                                                                   point: str) -> None:
    call, nth = point.split("#")
    seen = {"n": 0}

    def kill() -> None:
        seen["n"] += 1
        if seen["n"] == int(nth):
            raise Killed(point)

    conn.hooks[call] = kill
    with pytest.raises(Killed):
        run([desired()])
    del conn.hooks[call]
    again = run([desired()])
    assert not again[0]["failed"], again
    settled = run([desired()])
    assert settled[0]["changed"] is False, f"did not converge after a kill at {point}: {settled}"
    guest = state()
    assert guest.owner is not None and sorted(guest.created_disks) == ["data", "root"]
    assert volumes(conn) == {"web01+root.qcow2", "web01+data.qcow2", "web01+cidata.iso"}
    assert conn.pools[POOL].volumes["web01+cidata.iso"].data, "the seed was never written"
    run([guest_spec_from_dict({"name": "web01", "state": "absent"})], remove_storage=True)
    assert conn.domains == [] and volumes(conn) == set(), "what the collection created was not all removed"


def test_an_update_killed_between_the_define_and_the_new_volume_is_converged(conn: FakeConn) -> None:
    run([desired()])
    more = desired(disks=[{"name": "root", "size_gib": 1}, {"name": "data", "size_gib": 2},
                          {"name": "logs", "size_gib": 1}])
    conn.hooks["createXML"] = lambda: (x for x in ()).throw(Killed("createXML"))
    with pytest.raises(Killed):
        run([more])
    del conn.hooks["createXML"]
    assert [d.name for d in state().spec.disks] == ["root", "data"], "a disk without its volume is not there"
    redo = run([more])
    assert [c["field"] for c in redo[0]["changes"]] == ["disks[logs]"] and not redo[0]["failed"]
    assert "web01+logs.qcow2" in volumes(conn) and run([more])[0]["changed"] is False
    disks = conn.lookupByName("web01").root.findall("./devices/disk/alias[@name='ua-logs']")
    assert len(disks) == 1, "the disk was attached twice"
    assert "logs" in state().created_disks


def test_a_seed_update_killed_before_the_seed_is_written_is_written_by_the_next_run(conn: FakeConn) -> None:
    run([desired()])
    newer = desired(cloud_init={"meta_data": {"instance-id": "v2"}})
    conn.hooks["upload"] = lambda: (x for x in ()).throw(Killed("upload"))
    with pytest.raises(Killed):
        run([newer])
    del conn.hooks["upload"]
    assert [c["field"] for c in run([newer])[0]["changes"]] == ["cloud_init"]
    assert run([newer])[0]["changed"] is False
    assert b"v2" in conn.pools[POOL].volumes["web01+cidata.iso"].data


def test_a_disk_grown_by_another_run_just_before_our_grow_is_left_as_it_is(conn: FakeConn) -> None:
    run([desired()])
    root = conn.pools[POOL].volumes["web01+root.qcow2"]
    conn.hooks["resize"] = lambda: setattr(root, "capacity", 3 * 1024**3)  # between our look and our resize
    result = run([desired(disks=[{"name": "root", "size_gib": 2}, {"name": "data", "size_gib": 2}])])
    assert not result[0]["failed"], result
    assert [c["field"] for c in result[0]["changes"]] == ["disks[root].size_gib"]
    assert root.capacity == 3 * 1024**3, "a grow never shrinks"


def test_a_seed_volume_made_meanwhile_by_another_run_is_written_not_refused(
        conn: FakeConn, monkeypatch: pytest.MonkeyPatch) -> None:
    create = FakePool.createXML

    def other_run_first(pool: FakePool, xml: str, flags: int) -> FakeVol:
        name = ET.fromstring(xml).findtext("name") or ""
        if name.endswith("+cidata.iso") and name not in pool.volumes:
            pool.volumes[name] = FakeVol(pool, name, 1)  # the other run's seed, not yet written
        return create(pool, xml, flags)

    monkeypatch.setattr(FakePool, "createXML", other_run_first)
    result = run([desired()])
    assert not result[0]["failed"] and result[0]["changed"], result
    seed = conn.pools[POOL].volumes["web01+cidata.iso"]
    assert b"instance-id" in seed.data and seed.capacity >= len(seed.data)
    assert run([desired()])[0]["changed"] is False


def test_a_failing_define_leaves_autostart_seed_and_volumes_as_they_were(conn: FakeConn) -> None:
    run([desired()])
    seed = conn.pools[POOL].volumes["web01+cidata.iso"].data
    before = volumes(conn)
    conn.hooks["defineXML"] = lambda: (x for x in ()).throw(error(lv.VIR_ERR_XML_ERROR, "refused"))
    changed = desired(vcpus=2, autostart=True, cloud_init={"meta_data": {"instance-id": "v2"}},
                      disks=[{"name": "root", "size_gib": 3}, {"name": "data", "size_gib": 2},
                             {"name": "logs", "size_gib": 1}])
    result = run([changed])
    assert result[0]["failed"] and "refused" in result[0]["msg"]
    dom = conn.lookupByName("web01")
    assert dom.auto is False and volumes(conn) == before
    assert conn.pools[POOL].volumes["web01+cidata.iso"].data == seed
    assert conn.pools[POOL].volumes["web01+root.qcow2"].capacity == 1024**3


def test_a_restart_whose_start_fails_leaves_a_mark_the_next_run_reads(conn: FakeConn) -> None:
    run([desired(state="running")])
    current = state()
    conn.hooks["create"] = lambda: (x for x in ()).throw(error(lv.VIR_ERR_INTERNAL_ERROR, "no start"))
    with backend() as b, pytest.raises(EndpointError, match="no start"):
        b.restart_guest(current, 1, True)
    del conn.hooks["create"]
    left = state()
    assert left.power_state == "stopped" and left.interrupted_restart is True
    with backend() as b:
        b.start_guest(left)
    assert state().interrupted_restart is False and state().power_state == "running"


def test_stopping_a_guest_an_interrupted_restart_left_down_only_clears_the_mark(conn: FakeConn) -> None:
    run([desired(state="running")])
    conn.hooks["create"] = lambda: (x for x in ()).throw(error(lv.VIR_ERR_INTERNAL_ERROR, "no start"))
    with backend() as b, pytest.raises(EndpointError, match="no start"):
        b.restart_guest(state(), 1, True)
    del conn.hooks["create"]
    left = state()
    assert left.power_state == "stopped" and left.interrupted_restart is True
    dom = conn.lookupByName("web01")
    before = ET.tostring(dom.root.find("devices"), encoding="unicode")  # type: ignore[arg-type]
    defines, writes = conn.defines, conn.metadata_writes
    touched: list[str] = []
    for call in ("create", "setAutostart", "defineXML", "undefine", "resize", "createXML", "upload"):
        conn.hooks[call] = lambda call=call: touched.append(call)  # type: ignore[misc]
    with backend() as b:
        b.stop_guest(left, 1, False)
    assert touched == [] and conn.defines == defines and conn.metadata_writes == writes + 1
    assert dom.active is False and ET.tostring(dom.root.find("devices"), encoding="unicode") == before  # type: ignore[arg-type]
    after = state()
    assert after.power_state == "stopped" and after.interrupted_restart is False, "a later present run would start it"
    with backend() as b:
        b.stop_guest(after, 1, False)  # stopped and unmarked: nothing at all
    assert conn.metadata_writes == writes + 1 and touched == []


def test_create_and_leftover_disks_need_no_earlier_call(conn: FakeConn) -> None:
    """No call depends on state an earlier one left: each reads what it needs (STYLE habit 11)."""
    pool = conn.pools[POOL]
    pool.volumes["web02+root.qcow2"] = FakeVol(pool, "web02+root.qcow2", 3 * 1024**3)
    with backend() as b:
        assert b.leftover_disks([desired("web02")], Placement()) == {("web02", "root"): 3.0}
    spec = full()
    spec.cloud_init = desired().cloud_init
    spec.disks = []
    with backend() as b:
        made = b.create_guest(spec, PLACE, "team-a")  # no capacity() first: seed pool and host CPUs read here
    root = conn.lookupByName("web01").root
    assert made.owner == "team-a" and root.find("vcpu").text == "8"  # type: ignore[union-attr]
    assert "web01+cidata.iso" in volumes(conn)
    pool.volumes["web04+root.qcow2"] = FakeVol(pool, "web04+root.qcow2", 1024**3)
    conn.defineXML("<domain type='qemu'><name>other</name><devices><disk type='volume' device='disk'>"
                   f"<source pool='{POOL}' volume='web04+root.qcow2'/><target dev='vda' bus='virtio'/></disk>"
                   "</devices></domain>")
    in_use = re.escape("its volume 'web04+root.qcow2' in pool 'images' is in use by guest 'other'")
    with backend() as b, pytest.raises(ConfigError, match=in_use):
        b.leftover_disks([desired("web04")], PLACE)


def test_a_restart_marks_the_guest_without_a_re_define(conn: FakeConn) -> None:
    run([desired(state="running")])
    defines = conn.defines
    with backend() as b:
        b.restart_guest(state(), 1, True)
    assert conn.defines == defines and state().interrupted_restart is False and state().power_state == "running"


# ------------------------------------------------------------------ C: secrets kept, no needless re-define
FOREIGN = """<domain type='qemu'><name>made-elsewhere</name><uuid>4b1c8f1e-0000-4000-8000-000000000001</uuid>
<memory unit='KiB'>524288</memory><currentMemory unit='KiB'>524288</currentMemory><vcpu placement='static'>2</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>
<graphics type='vnc' port='-1' autoport='yes' passwd='s3cret-pw'/><graphics type='spice' passwd='sp1ce-pw'/>
<video><model type='qxl'/></video></devices></domain>"""


def test_updates_keep_console_passwords_and_autostart_or_tags_make_no_define(conn: FakeConn) -> None:
    conn.defineXML(FOREIGN)
    defines = conn.defines
    spec = guest_spec_from_dict({"name": "made-elsewhere", "autostart": True, "tags": {"env": "lab"}})
    result = run([spec])
    assert {c["field"] for c in result[0]["changes"]} == {"autostart", "tags"}
    assert conn.defines == defines, "an autostart or tags change re-defined the whole domain"
    dom = conn.lookupByName("made-elsewhere")
    assert dom.auto is True and state("made-elsewhere").spec.tags == {"env": "lab"}
    assert state("made-elsewhere").owner is None, "editing a guest made elsewhere must not mark it as ours"
    run([guest_spec_from_dict({"name": "made-elsewhere", "vcpus": 3})])
    stored = dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE | lv.VIR_DOMAIN_XML_SECURE)
    assert "passwd='s3cret-pw'" in stored.replace('"', "'") and "sp1ce-pw" in stored
    assert ET.fromstring(stored).find("./devices/video/model").get("type") == "qxl"  # type: ignore[union-attr]


def test_secrets_never_reach_facts_results_or_errors(conn: FakeConn) -> None:
    conn.defineXML(FOREIGN)
    conn.hooks["defineXML"] = lambda: (x for x in ()).throw(error(lv.VIR_ERR_XML_ERROR, "refused"))
    result = run([guest_spec_from_dict({"name": "made-elsewhere", "vcpus": 3})])
    with backend() as b:
        found = discovery.guests(b.session, "kvm01", {})  # what discovery reads of every guest
    assert result[0]["failed"]
    for text in (repr(result), repr(state("made-elsewhere")), repr(found)):
        assert "s3cret" not in text and "sp1ce" not in text


# ------------------------------------------------------------------ D: one parse, both readers agree
def test_lowering_memory_of_a_stopped_guest_sets_memory_and_current_memory(conn: FakeConn) -> None:
    run([desired(memory_mib=1024)])
    run([desired(memory_mib=512)])
    root = conn.lookupByName("web01").root
    assert root.findtext("memory") == root.findtext("currentMemory") == str(512 * 1024)


def test_discovery_facts_and_convergence_state_read_a_domain_the_same_way(conn: FakeConn) -> None:
    conn.pools[POOL].volumes["base.qcow2"] = FakeVol(conn.pools[POOL], "base.qcow2", 1024**3)
    run([desired(disks=[{"name": "root", "source": "base.qcow2"}])])
    dom = conn.lookupByName("web01")
    dom.root.find("memory").text = str(2048 * 1024)  # type: ignore[union-attr]  # a maximum above current
    with backend() as b:
        facts = next(g for g in discovery.guests(b.session, "kvm01", {}) if g.name == "web01")
    current = state()
    assert facts.memory_mib == current.spec.memory_mib == 512
    assert [(d.name, d.source, d.bus) for d in facts.disks] == \
        [(d.name, d.source, d.bus) for d in current.spec.disks or []] == [("root", "base.qcow2", "virtio")]


# ------------------------------------------------------------------ E: what the hypervisor cannot do
def test_a_bus_the_host_cannot_do_is_refused_while_planning_with_one_line(conn: FakeConn) -> None:
    spec = desired(disks=[{"name": "root", "size_gib": 1, "bus": "nvme"}])
    for check in (True, False):
        with pytest.raises(ConfigError) as refused:
            run([spec], check=check)
        assert str(refused.value).startswith("guest 'web01' disks[0].bus='nvme': this libvirt host cannot")
    assert conn.domains == [] and volumes(conn) == set()


def test_uefi_without_a_loader_is_refused_and_domcaps_are_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeConn(efi=False)
    monkeypatch.setattr(backend_mod.libvirt, "open", lambda _uri: fake)
    reads = {"n": 0}
    fake.hooks["getDomainCapabilities"] = lambda: reads.__setitem__("n", reads["n"] + 1)
    with backend() as b:
        b.verify_spec(desired())
        with pytest.raises(ConfigError, match="guest 'web01' firmware='uefi': this libvirt host offers no UEFI"):
            b.verify_spec(desired(firmware="uefi"))
    assert reads["n"] == 1


# ------------------------------------------------------------------ the change table
def test_every_change_kind_the_planner_makes_has_an_apply_function() -> None:
    kinds = {("vcpus", None), ("memory_mib", None), ("firmware", None), ("boot", None), ("autostart", None),
             ("tags", None), ("cloud_init", None), ("disks", None), ("disks", "size_gib"), ("disks", "bus"),
             ("nics", None), ("nics", "network"), ("nics", "model")}
    assert set(apply.APPLY) == kinds


def test_an_unknown_change_is_one_clear_error_not_a_silent_skip(conn: FakeConn) -> None:
    run([desired()])
    current = state()
    plan = GuestPlan(desired=current.spec, current=current, action="update", after=current.spec,
                     changes=[Change("disks", "a", "b", key="root", attr="format")])
    with backend() as b, pytest.raises(EndpointError, match=r"cannot apply disks\[root\].format"):
        b.update_guest(current, plan)


def test_changes_on_a_running_guest_go_live_and_to_the_definition(conn: FakeConn) -> None:
    run([desired(state="running")])
    result = run([desired(state="running", vcpus=2, tags={"t": "2"},
                          cloud_init={"meta_data": {"instance-id": "v3"}})])
    assert not result[0]["failed"], result
    dom = conn.lookupByName("web01")
    live_meta = dom.live_root.find(f"./metadata/{{{NS}}}guest")  # type: ignore[union-attr]
    assert live_meta is not None and live_meta.find(f"{{{NS}}}tag").text == "2"  # type: ignore[union-attr]
    assert live_meta.get("owner") and state().owner == live_meta.get("owner")
    assert run([desired(state="running", vcpus=2, tags={"t": "2"},
                        cloud_init={"meta_data": {"instance-id": "v3"}})])[0]["changed"] is False
