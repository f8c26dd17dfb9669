# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""VsphereBackend's safety rules against a fake vSphere (file manager, datastore browser, folder, property
collector): a failed create removes only what it made, kept disks are picked up, MakeDirectory always names the
datacenter, task waits follow the task (not a fixed cap), a concurrent same-named VM is never kept twice, and
exclusive's scope follows the placement."""

from __future__ import annotations

import dataclasses
import fnmatch
from types import SimpleNamespace
from typing import Any

import pytest

from ansible_collections.virtfleet.core.plugins.module_utils._endpoints import parse_endpoint
from ansible_collections.virtfleet.core.plugins.module_utils._errors import ConfigError, EndpointError
from ansible_collections.virtfleet.core.plugins.module_utils._model import (
    DiskSpec,
    GuestSpec,
    NicSpec,
    Placement,
)
from ansible_collections.virtfleet.core.plugins.module_utils._plan import Change, GuestPlan
from ansible_collections.virtfleet.core.plugins.module_utils.backends import vsphere as backend_mod
from ansible_collections.virtfleet.core.plugins.module_utils.backends.vsphere import codec, configspec, session
from ansible_collections.virtfleet.core.plugins.module_utils.backends.vsphere.guests import VmRef, vm_state

pytestmark = pytest.mark.skipif(not backend_mod.HAS_PYVMOMI, reason="pyvmomi not installed")


def done(result: Any = None) -> Any:
    return SimpleNamespace(info=SimpleNamespace(state="success", result=result))


def failed(fault: Any) -> Any:
    return SimpleNamespace(info=SimpleNamespace(state="error", error=fault))


class FakeVM:
    def __init__(self, world: World, moid: str) -> None:
        self._moId = moid
        self.world = world

    def ReconfigVM_Task(self, spec: Any) -> Any:
        self.world.calls.append(("ReconfigVM", self._moId, spec))
        return done()

    def Destroy_Task(self) -> Any:
        self.world.calls.append(("Destroy", self._moId))
        self.world.folder_vms.pop(self._moId, None)
        return done()

    def UnregisterVM(self) -> None:
        self.world.calls.append(("UnregisterVM", self._moId))
        self.world.folder_vms.pop(self._moId, None)

    @property
    def config(self) -> Any:
        return SimpleNamespace(hardware=SimpleNamespace(device=self.world.devices))


class World:
    """Files (datastore path -> capacity KiB), directories, the folder's VMs (moid -> (name, instance uuid))."""

    def __init__(self, files: dict[str, int | None] | None = None, dirs: set[str] | None = None,
                 create_fault: Any = None) -> None:
        self.files = dict(files or {})
        self.dirs = set(dirs or set())
        self.create_fault = create_fault
        self.calls: list[Any] = []
        self.folder_vms: dict[str, tuple[str, str]] = {}
        self.devices: list[Any] = []
        self.next_vm = 100

    # FileManager
    def MakeDirectory(self, path: str, datacenter: Any, parents: bool) -> None:
        from pyVmomi import vim

        self.calls.append(("MakeDirectory", path, datacenter))
        if path in self.dirs:
            raise vim.fault.FileAlreadyExists(file=path)
        self.dirs.add(path)

    def DeleteDatastoreFile_Task(self, path: str, datacenter: Any) -> Any:
        self.calls.append(("DeleteDatastoreFile", path))
        return done()

    # HostDatastoreBrowser
    def SearchDatastore_Task(self, path: str, spec: Any) -> Any:
        from pyVmomi import vim

        self.calls.append(("SearchDatastore", path))
        if path not in self.dirs:
            return failed(vim.fault.FileNotFound(file=path))
        found = []
        for name, kib in self.files.items():
            directory, base = name.rsplit("/", 1)
            if directory == path and any(fnmatch.fnmatch(base, p) for p in spec.matchPattern):
                found.append(SimpleNamespace(path=base, capacityKb=kib))
        return done(SimpleNamespace(file=found))

    # Folder
    def CreateVM_Task(self, config: Any, pool: Any, host: Any) -> Any:
        self.calls.append(("CreateVM", config))
        if self.create_fault is not None:
            return failed(self.create_fault)
        moid = f"vm-{self.next_vm}"
        self.next_vm += 1
        self.folder_vms[moid] = (config.name, config.instanceUuid)
        for change in config.deviceChange:
            file_name = getattr(getattr(change.device, "backing", None), "fileName", None)
            if file_name and change.fileOperation == "create":
                self.files[file_name] = change.device.capacityInKB
        self.devices = [c.device for c in config.deviceChange]
        return done(FakeVM(self, moid))

    # PropertyCollector (the folder's children after CreateVM)
    def RetrievePropertiesEx(self, specs: Any, options: Any) -> Any:
        from pyVmomi import vim

        objects = [SimpleNamespace(obj=vim.VirtualMachine(m),
                                   propSet=[SimpleNamespace(name="name", val=n),
                                            SimpleNamespace(name="config.instanceUuid", val=u)])
                   for m, (n, u) in self.folder_vms.items()]
        return SimpleNamespace(objects=objects, token=None)


def fake_folder(world: World) -> Any:
    """A Folder moref (property specs take only managed objects) whose CreateVM_Task is the world's."""
    from pyVmomi import vim

    class Folder(vim.Folder):  # type: ignore[misc]
        def CreateVM_Task(self, config: Any, pool: Any, host: Any) -> Any:
            return world.CreateVM_Task(config, pool, host)

    return Folder("f-1")


def world_backend(world: World, vms: dict[str, dict[str, Any]] | None = None) -> backend_mod.VsphereBackend:
    from pyVmomi import vim

    refs: dict[str, Any] = {"dc-1": vim.Datacenter("dc-1"), "ds-1": vim.Datastore("ds-1"),
                            "ds-2": vim.Datastore("ds-2"), "f-1": vim.Folder("f-1")}
    props: dict[str, dict[str, Any]] = {
        "dc-1": {"name": "DC0", "parent": None, "vmFolder": refs["f-1"]},
        "ds-1": {"name": "ds1", "browser": world}, "ds-2": {"name": "ds2", "browser": world},
        "f-1": {"name": "vm", "parent": refs["dc-1"]},
    }
    for moid, vm in (vms or {}).items():
        refs[moid] = vim.VirtualMachine(moid)
        props[moid] = dict(vm, parent=refs["f-1"])
    backend = backend_mod.VsphereBackend(parse_endpoint("vsphere://vc01"), 5)
    backend._inv.snap = backend_mod._Snapshot(props=props, refs=refs, vcenter=True)
    backend._conn.content = SimpleNamespace(fileManager=world, propertyCollector=world)
    backend._conn.logged_in = True
    backend._inv.targets[dataclasses.astuple(Placement())] = backend_mod._Target(
        datacenter="dc-1", folder=fake_folder(world), pool="pool-1", host=None, hosts=[], datastores=["ds1", "ds2"],
        default_datastore="ds1", networks={})
    return backend


def spec(name: str = "web1") -> GuestSpec:
    return GuestSpec(name=name, vcpus=1, memory_mib=512, firmware="bios", nics=[], tags={},
                     disks=[DiskSpec(name="root", size_gib=2, pool="ds1", format="thin", bus="scsi"),
                            DiskSpec(name="data", size_gib=1, pool="ds2", format="thin", bus="scsi")])


def kinds(world: World, kind: str) -> list[Any]:
    return [c for c in world.calls if c[0] == kind]


# ---------------------------------------------------------------------------------------------- defect 1
def test_failed_create_never_deletes_a_directory_it_did_not_make() -> None:
    """[ds2] web1 holds a disk kept from an earlier `absent`: MakeDirectory finds it there, CreateVM fails,
    and nothing is deleted (before: DeleteDatastoreFile_Task on '[ds2] web1', recursively)."""
    from pyVmomi import vim

    world = World(files={"[ds2] web1/web1_other.vmdk": 1024}, dirs={"[ds2] web1"},
                  create_fault=vim.fault.InvalidDeviceSpec(msg="bad device"))
    with pytest.raises(EndpointError, match=r"guest 'web1': CreateVM failed: InvalidDeviceSpec"):
        world_backend(world).create_guest(spec(), Placement(), "virtfleet.core")
    assert kinds(world, "DeleteDatastoreFile") == []


def test_failed_create_removes_the_directory_it_made_only_while_empty() -> None:
    from pyVmomi import vim

    world = World(create_fault=vim.fault.InvalidDeviceSpec(msg="bad device"))
    with pytest.raises(EndpointError):
        world_backend(world).create_guest(spec(), Placement(), "virtfleet.core")
    assert kinds(world, "DeleteDatastoreFile") == [("DeleteDatastoreFile", "[ds2] web1")]  # made here, empty

    # Another run put its disk into the directory meanwhile: it stays.
    world = World(create_fault=vim.fault.InvalidDeviceSpec(msg="bad device"))
    original = world.CreateVM_Task

    def create_while_another_run_writes(config: Any, pool: Any, host: Any) -> Any:
        world.files["[ds2] web1/web1_data.vmdk"] = 1024
        return original(config, pool, host)

    world.CreateVM_Task = create_while_another_run_writes  # type: ignore[method-assign]
    with pytest.raises(EndpointError):
        world_backend(world).create_guest(spec(), Placement(), "virtfleet.core")
    assert kinds(world, "DeleteDatastoreFile") == []


def test_a_name_taken_meanwhile_is_an_error_and_cleans_up_nothing_of_the_other_run() -> None:
    from pyVmomi import vim

    world = World(dirs={"[ds2] web1"}, create_fault=vim.fault.DuplicateName(name="web1", msg="web1 exists"))
    with pytest.raises(EndpointError, match=r"CreateVM failed: DuplicateName"):
        world_backend(world).create_guest(spec(), Placement(), "virtfleet.core")
    assert kinds(world, "DeleteDatastoreFile") == [] and kinds(world, "Destroy") == []


def test_kept_disks_are_reused_not_created_and_not_recorded_as_created() -> None:
    """docs/guests.md: a re-created guest picks its kept disks up again (as libvirt does); a smaller size is
    refused by the planner, a larger one grows the kept disk."""
    world = World(files={"[ds1] web1/web1_root.vmdk": 1 * 1024 * 1024, "[ds2] web1/web1_data.vmdk": None},
                  dirs={"[ds1] web1", "[ds2] web1"})
    backend = world_backend(world)
    assert backend.leftover_disks([spec()], Placement()) == {("web1", "root"): 1.0, ("web1", "data"): 0.0}
    created = backend.create_guest(spec(), Placement(), "virtfleet.core")
    (config,) = [c[1] for c in kinds(world, "CreateVM")]
    disks = {c.device.backing.fileName: c.fileOperation for c in config.deviceChange
             if c.device.backing is not None and hasattr(c.device.backing, "fileName")}
    assert disks == {"[ds1] web1/web1_root.vmdk": None, "[ds2] web1/web1_data.vmdk": None}
    extra = {o.key: o.value for o in config.extraConfig}
    assert extra["virtfleet.kept.root"] == "[ds1] web1/web1_root.vmdk" and "virtfleet.disk.root" not in extra
    assert created.created_disks == []  # remove_storage never deletes a disk this call did not make
    # root was kept at 1 GiB and is wanted at 2: attached at its size, then grown (never shrunk).
    (grow,) = list(kinds(world, "ReconfigVM"))
    (edit,) = grow[2].deviceChange
    assert (edit.operation, edit.device.backing.fileName, edit.device.capacityInKB) == (
        "edit", "[ds1] web1/web1_root.vmdk", 2 * 1024 * 1024)
    assert kinds(world, "DeleteDatastoreFile") == []


def test_a_kept_disk_attached_to_another_vm_is_refused() -> None:
    from pyVmomi import vim

    other = vim.vm.device.VirtualDisk(key=2000, backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
        fileName="[ds1] web1/web1_root.vmdk"))
    world = World(files={"[ds1] web1/web1_root.vmdk": 1024}, dirs={"[ds1] web1"})
    backend = world_backend(world, {"vm-5": {"name": "db1", "config.hardware.device": [other]}})
    with pytest.raises(ConfigError, match=r"attached to VM 'db1'"):
        backend.leftover_disks([spec()], Placement())


def test_create_writes_the_mark_with_the_instance_uuid_it_gives_the_vm() -> None:
    world = World()
    created = world_backend(world).create_guest(spec(), Placement(), "team-a")
    (config,) = [c[1] for c in kinds(world, "CreateVM")]
    extra = {o.key: o.value for o in config.extraConfig}
    assert extra["virtfleet.owner"] == "team-a" and extra["virtfleet.owner.uuid"] == config.instanceUuid
    assert created.owner == "team-a" and created.created_disks == ["root", "data"]
    assert kinds(world, "ReconfigVM") == []  # the mark is written by CreateVM itself


def test_a_same_named_vm_created_at_the_same_time_is_removed_by_the_run_that_came_second() -> None:
    """vcsim does not refuse a second VM of a name in a folder: the later one is unregistered by its own run, never
    destroyed (its files are the other run's: same name, same paths)."""
    world = World()
    world.folder_vms["vm-50"] = ("web1", "5010aaaa-0000-0000-0000-000000000050")  # the other run's, first
    with pytest.raises(EndpointError, match=r"another run created a VM of this name at the same time \(vm-50\)"):
        world_backend(world).create_guest(spec(), Placement(), "virtfleet.core")
    assert kinds(world, "UnregisterVM") == [("UnregisterVM", "vm-100")]  # ours, never the other run's
    assert kinds(world, "Destroy") == [] and kinds(world, "DeleteDatastoreFile") == []
    assert list(world.folder_vms) == ["vm-50"]


# ---------------------------------------------------------------------------------------------- defect 6
def test_a_disk_on_another_datastore_makes_its_directory_in_the_vms_datacenter() -> None:
    """vCenter needs the datacenter for a datastore path; the bulk read is dropped before the reconfigure, and
    MakeDirectory used to get None."""
    from pyVmomi import vim

    world = World()
    vm = {"name": "web1", "config.files.vmPathName": "[ds1] web1/web1.vmx", "config.hardware.device": [],
          "config.extraConfig": [], "runtime.powerState": "poweredOff"}
    backend = world_backend(world, {"vm-1": vm})
    current = vm_state(backend._inv.snap.refs["vm-1"], vm, {}, 4, 4096)  # type: ignore[union-attr]
    current.ref = VmRef(FakeVM(world, "vm-1"), vm)
    new = {"name": "logs", "size_gib": 1, "pool": "ds2", "format": "thin", "source": None, "bus": "scsi"}
    backend.update_guest(current, GuestPlan(desired=GuestSpec(name="web1"), current=current, action="update",
                                            changes=[Change("disks", None, new, key="logs")], after=current.spec))
    ((_kind, path, datacenter),) = kinds(world, "MakeDirectory")
    assert path == "[ds2] web1" and isinstance(datacenter, vim.Datacenter) and datacenter._moId == "dc-1"
    (reconfig,) = kinds(world, "ReconfigVM")
    (disk,) = [c for c in reconfig[2].deviceChange if c.fileOperation == "create"]
    assert disk.device.backing.fileName == "[ds2] web1/web1_logs.vmdk"


def test_task_wait_follows_the_task_past_the_old_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """An eager-zeroed disk task running 20 minutes (the old cap was max(60 s, 6 x timeout)) is waited for."""
    clock = {"now": 0.0}
    monkeypatch.setattr(session, "_monotonic", lambda: clock["now"])
    monkeypatch.setattr(session, "_sleep", lambda s: clock.__setitem__("now", clock["now"] + s))

    class SlowTask:
        @property
        def info(self) -> Any:
            if clock["now"] < 1200:
                return SimpleNamespace(state="running", progress=int(clock["now"] / 12))
            return SimpleNamespace(state="success", result="vm-1")

    backend = backend_mod.VsphereBackend(parse_endpoint("vsphere://vc01"), 5)
    assert backend._conn.wait(SlowTask(), "db1", "CreateVM", written_gib=500) == "vm-1"
    assert 1200 <= clock["now"] < 1202  # polled at most 1 s apart
    assert backend.calls < 1300  # one call per poll, none faster than the doubling allows


def test_a_task_that_never_ends_gives_up_after_a_bound_that_grows_with_the_disk(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = {"now": 0.0}
    monkeypatch.setattr(session, "_monotonic", lambda: clock["now"])
    monkeypatch.setattr(session, "_sleep", lambda s: clock.__setitem__("now", clock["now"] + s))
    stuck = SimpleNamespace(info=SimpleNamespace(state="running", progress=3))
    backend = backend_mod.VsphereBackend(parse_endpoint("vsphere://vc01"), 5)
    with pytest.raises(EndpointError, match=r"CreateVM still running after 9600s \(3% done\)"):
        backend._conn.wait(stuck, "db1", "CreateVM", written_gib=100)
    assert codec.written_gib(SimpleNamespace(deviceChange=[])) == 0.0


def test_written_gib_counts_only_disks_the_task_writes() -> None:
    from pyVmomi import vim

    def disk(fmt: str, op: str = "add", fop: Any = "create") -> Any:
        return configspec.disk_add(DiskSpec(name="d", size_gib=10, format=fmt), -1, (1000, 0),
                                   "[ds1] x/x_d.vmdk", create=fop == "create")

    config = vim.vm.ConfigSpec(deviceChange=[disk("thin"), disk("eagerzeroedthick"), disk("thick", fop=None)])
    assert codec.written_gib(config) == 10.0


# ---------------------------------------------------------------------------------------------- scope
def test_in_scope_follows_the_cluster_folder_and_resource_pool_placed_in() -> None:
    from pyVmomi import vim

    cls = {"dc": vim.Datacenter, "f": vim.Folder, "cl": vim.ClusterComputeResource, "cr": vim.ComputeResource,
           "rp": vim.ResourcePool, "h": vim.HostSystem, "vm": vim.VirtualMachine}
    ids = ["dc-1", "f-vm", "f-team", "f-other", "cl-1", "cr-2", "rp-1", "rp-child", "rp-2", "h-1", "h-2", "vm-1",
           "vm-2", "vm-3"]
    refs = {m: cls[m.split("-", maxsplit=1)[0]](m) for m in ids}
    hw = SimpleNamespace(numCpuThreads=8, memorySize=16 * 1024**3)

    def vm(name: str, folder: str, host: str, pool: str) -> dict[str, Any]:
        return {"name": name, "parent": refs[folder], "config.uuid": name, "config.hardware.device": [],
                "config.extraConfig": [], "runtime.powerState": "poweredOff", "runtime.host": refs[host],
                "resourcePool": refs[pool]}

    props = {
        "dc-1": {"name": "DC0", "parent": None, "vmFolder": refs["f-vm"]},
        "f-vm": {"name": "vm", "parent": refs["dc-1"]}, "f-team": {"name": "team", "parent": refs["f-vm"]},
        "f-other": {"name": "other", "parent": refs["f-vm"]},
        "cl-1": {"name": "C1", "parent": refs["dc-1"], "resourcePool": refs["rp-1"], "host": [refs["h-1"]]},
        "cr-2": {"name": "h2", "parent": refs["dc-1"], "resourcePool": refs["rp-2"], "host": [refs["h-2"]]},
        "rp-1": {"name": "Resources", "parent": refs["cl-1"]}, "rp-child": {"name": "web", "parent": refs["rp-1"]},
        "rp-2": {"name": "Resources", "parent": refs["cr-2"]},
        "h-1": {"name": "h1", "parent": refs["cl-1"], "summary.hardware": hw, "datastore": [], "network": []},
        "h-2": {"name": "h2", "parent": refs["cr-2"], "summary.hardware": hw, "datastore": [], "network": []},
        "vm-1": vm("in-c1-team-web", "f-team", "h-1", "rp-child"),
        "vm-2": vm("in-c1-other", "f-other", "h-1", "rp-1"),
        "vm-3": vm("on-h2-team", "f-team", "h-2", "rp-2"),
    }
    backend = backend_mod.VsphereBackend(parse_endpoint("vsphere://vc01"), 5)
    backend._inv.snap = backend_mod._Snapshot(props=props, refs=refs, vcenter=True)

    def scoped(placement: Placement) -> set[str]:
        return {s.spec.name for s in backend.read_guests(placement) if s.in_scope}

    everything = {"in-c1-team-web", "in-c1-other", "on-h2-team"}
    assert scoped(Placement(esxi_host="h2")) == {"on-h2-team"}
    assert scoped(Placement(cluster="C1")) == {"in-c1-team-web", "in-c1-other"}
    assert scoped(Placement(cluster="C1", folder="team")) == {"in-c1-team-web"}
    assert scoped(Placement(cluster="C1", resource_pool="web")) == {"in-c1-team-web"}
    assert scoped(Placement(folder="/DC0/vm/team", esxi_host="h2")) == {"on-h2-team"}
    assert {s.spec.name for s in backend.read_guests(Placement(cluster="C1"))} == everything  # still read
    assert backend.calls == 0


def test_nics_without_a_mac_are_found_by_position() -> None:
    from pyVmomi import vim

    nic = vim.vm.device.VirtualVmxnet3(key=4000, macAddress=None, backing=vim.vm.device.VirtualEthernetCard.
                                       NetworkBackingInfo(deviceName="VM Network"))
    vm = {"name": "web1", "config.files.vmPathName": "[ds1] web1/web1.vmx", "config.hardware.device": [nic],
          "config.extraConfig": [], "runtime.powerState": "poweredOff"}
    world = World()
    backend = world_backend(world, {"vm-1": vm})
    current = vm_state(backend._inv.snap.refs["vm-1"], vm, {}, 4, 4096)  # type: ignore[union-attr]
    plan = GuestPlan(desired=GuestSpec(name="web1"), current=current, action="update",
                     changes=[Change("nics", "vmxnet3", "e1000", key="#0", attr="model")],
                     after=dataclasses.replace(current.spec, nics=[NicSpec(network="VM Network", model="e1000")]))
    config, _dirs = backend.update_config(current, plan, live_only=False)
    removed, added = config.deviceChange
    assert (removed.operation, removed.device.key) == ("remove", 4000)
    assert isinstance(added.device, vim.vm.device.VirtualE1000)
