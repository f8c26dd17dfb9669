# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""VsphereBackend guest convergence at the pyVmomi boundary: the ConfigSpecs it builds for a create and for an
update, how a VM reads back into GuestState, what it refuses, and that reads are one bulk retrieval."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace
from typing import Any

import pytest

from ansible_collections.virtfleet.core.plugins.module_utils._endpoints import parse_endpoint
from ansible_collections.virtfleet.core.plugins.module_utils._errors import ConfigError, EndpointError
from ansible_collections.virtfleet.core.plugins.module_utils._model import (
    OWNER_TAG,
    CloudInit,
    DiskSpec,
    GuestSpec,
    GuestState,
    NicSpec,
    Placement,
    guest_spec_from_dict,
)
from ansible_collections.virtfleet.core.plugins.module_utils._plan import Change, GuestPlan
from ansible_collections.virtfleet.core.plugins.module_utils.backends import vsphere as backend_mod
from ansible_collections.virtfleet.core.plugins.module_utils.backends.vsphere.guests import VmRef, vm_state

pytestmark = pytest.mark.skipif(not backend_mod.HAS_PYVMOMI, reason="pyvmomi not installed")

MAC = "00:50:56:01:02:03"
INSTANCE_UUID = "5010aaaa-0000-0000-0000-00000000000a"


def new_backend() -> backend_mod.VsphereBackend:
    backend = backend_mod.VsphereBackend(parse_endpoint("vsphere://vc01"), 5)
    backend._inv.snap = backend_mod._Snapshot(props={}, refs={}, vcenter=True)
    return backend


def target() -> backend_mod._Target:
    return backend_mod._Target(datacenter="dc-1", folder=None, pool=None, host=None, hosts=["host-1"],
                               datastores=["ds1", "ds2"], default_datastore="ds1",
                               networks={"VM Network": "network-1"})


def full_spec() -> GuestSpec:
    return GuestSpec(
        name="web1", vcpus=2, memory_mib=2048, firmware="uefi",
        disks=[DiskSpec(name="root", size_gib=10, pool="ds1", format="thin", bus="scsi"),
               DiskSpec(name="data", size_gib=1.5, pool="ds2", format="eagerzeroedthick", bus="scsi")],
        nics=[NicSpec(network="VM Network", mac=MAC, model="vmxnet3")],
        cloud_init=CloudInit(user_data="#cloud-config\n", meta_data="instance-id: web1\n",
                             network_config="version: 2\n"),
        tags={"role": "web"}, autostart=False,
    )


def options(config: Any) -> dict[str, str]:
    return {o.key: o.value for o in config.extraConfig}


def vm_props(**overrides: Any) -> dict[str, Any]:
    """A VM as the property collector returns it: PVSCSI controller, two disks (one ours), one NIC."""
    from pyVmomi import vim

    device = vim.vm.device
    disk_backing = device.VirtualDisk.FlatVer2BackingInfo
    devices = [
        device.ParaVirtualSCSIController(key=1000, busNumber=0, deviceInfo=vim.Description(label="SCSI 0")),
        device.VirtualDisk(key=2000, controllerKey=1000, unitNumber=0, capacityInKB=10 * 1024 * 1024,
                           deviceInfo=vim.Description(label="Hard disk 1"),
                           backing=disk_backing(fileName="[ds1] web1/web1_root.vmdk", thinProvisioned=True)),
        device.VirtualDisk(key=2001, controllerKey=1000, unitNumber=1, capacityInKB=1536 * 1024,
                           deviceInfo=vim.Description(label="Hard disk 2"),
                           backing=disk_backing(fileName="[ds2] shared/legacy.vmdk", thinProvisioned=False,
                                                eagerlyScrub=False)),
        device.VirtualVmxnet3(key=4000, macAddress=MAC.upper(), deviceInfo=vim.Description(label="NIC 1"),
                              backing=device.VirtualEthernetCard.NetworkBackingInfo(deviceName="VM Network")),
    ]
    extra = [vim.option.OptionValue(key=k, value=v) for k, v in [
        ("virtfleet.owner", OWNER_TAG), ("virtfleet.owner.uuid", INSTANCE_UUID),
        ("virtfleet.disk.root", "[ds1] web1/web1_root.vmdk"),
        ("virtfleet.tag.role", "web"), ("virtfleet.tag.old", "x"), ("virtfleet.cloud_init.digest", "sha256:abc"),
        # vcsim appends on reconfigure instead of replacing: the last value wins, "" means deleted.
        ("virtfleet.tag.role", "db"), ("virtfleet.tag.old", ""),
    ]]
    props = {
        "name": "web1", "config.uuid": "4210ABCD-0000-0000-0000-000000000001", "config.firmware": "efi",
        "config.hardware.numCPU": 2, "config.hardware.memoryMB": 2048, "config.hardware.device": devices,
        "config.extraConfig": extra, "config.cpuHotAddEnabled": True, "config.memoryHotAddEnabled": False,
        "config.files.vmPathName": "[ds1] web1/web1.vmx", "runtime.powerState": "poweredOn",
        "config.instanceUuid": INSTANCE_UUID.upper(),
    }
    props.update(overrides)
    return props


def state(props: dict[str, Any], power: str = "stopped") -> GuestState:
    from pyVmomi import vim

    current = vm_state(vim.VirtualMachine("vm-1"), props, {}, 16, 65536)
    current.power_state = power
    return current


# ---------------------------------------------------------------------------------------------- create
def test_create_config_holds_the_whole_guest_in_one_spec() -> None:
    from pyVmomi import vim

    config, dirs = new_backend().create_config(full_spec(), target())
    assert (config.name, config.numCPUs, config.memoryMB, config.firmware) == ("web1", 2, 2048, "efi")
    assert config.cpuHotAddEnabled and config.memoryHotAddEnabled  # growth stays live
    assert config.files.vmPathName == "[ds1]" and config.guestId == "otherLinux64Guest"
    changes = config.deviceChange
    controller, root, data, nic = (c.device for c in changes)
    assert isinstance(controller, vim.vm.device.ParaVirtualSCSIController) and changes[0].operation == "add"
    assert [(c.operation, c.fileOperation) for c in changes[1:3]] == [("add", "create"), ("add", "create")]
    assert (root.controllerKey, root.unitNumber, data.controllerKey, data.unitNumber) == (controller.key, 0,
                                                                                          controller.key, 1)
    assert root.capacityInKB == 10 * 1024 * 1024 and data.capacityInKB == 1536 * 1024
    assert root.backing.thinProvisioned and not root.backing.eagerlyScrub
    assert data.backing.eagerlyScrub and not data.backing.thinProvisioned
    assert root.backing.fileName == "[ds1] web1/web1_root.vmdk"
    assert data.backing.fileName == "[ds2] web1/web1_data.vmdk"
    assert dirs == {"[ds2] web1"}  # a disk away from the VM's datastore needs its directory made first
    assert isinstance(nic, vim.vm.device.VirtualVmxnet3)
    assert (nic.addressType, nic.macAddress, nic.backing.deviceName) == ("manual", MAC, "VM Network")
    extra = options(config)
    assert extra["virtfleet.owner"] == OWNER_TAG and extra["virtfleet.tag.role"] == "web"
    assert extra["virtfleet.disk.root"] == root.backing.fileName
    assert extra["virtfleet.cloud_init.digest"] == full_spec().cloud_init.digest()  # type: ignore[union-attr]
    assert base64.b64decode(extra["guestinfo.userdata"]).decode() == "#cloud-config\n"
    assert extra["guestinfo.userdata.encoding"] == extra["guestinfo.metadata.encoding"] == "base64"
    metadata = json.loads(base64.b64decode(extra["guestinfo.metadata"]))
    assert metadata["instance-id"] == "web1" and metadata["network.encoding"] == "base64"
    assert base64.b64decode(metadata["network"]).decode() == "version: 2\n"
    assert config.uuid is None


def test_created_guest_reads_back_as_the_spec_it_was_made_from() -> None:
    """Feed the devices and extraConfig of a create spec back through the reader: the spec comes out."""
    from pyVmomi import vim

    spec = full_spec()
    config, _dirs = new_backend().create_config(spec, target(), owner="team-a", instance_uuid=INSTANCE_UUID)
    devices = [c.device for c in config.deviceChange]
    for i, dev in enumerate(devices):
        dev.key = 1000 + i
        if dev.controllerKey and dev.controllerKey < 0:
            dev.controllerKey = 1000
    devices[-1].backing.network = None
    props = {"name": "web1", "config.uuid": "u-1", "config.firmware": config.firmware, "config.hardware.numCPU": 2,
             "config.hardware.memoryMB": 2048, "config.hardware.device": devices,
             "config.extraConfig": config.extraConfig, "config.cpuHotAddEnabled": True,
             "config.memoryHotAddEnabled": True, "runtime.powerState": "poweredOff",
             "config.instanceUuid": config.instanceUuid}
    got = vm_state(vim.VirtualMachine("vm-9"), props, {}, 8, 4096)
    assert got.spec.facts() == dict(spec.facts(), uuid="u-1")
    assert got.owner == "team-a" and got.owned_by("team-a") and not got.owned_by(OWNER_TAG)
    assert got.created_disks == ["root", "data"] and (got.max_vcpus, got.max_memory_mib) == (8, 4096)
    assert not got.interrupted_restart


# ---------------------------------------------------------------------------------------------- read
def test_read_back_normalises_names_formats_tags_and_ownership() -> None:
    current = state(vm_props(), power="running")
    spec = current.spec
    assert spec.uuid == "4210abcd-0000-0000-0000-000000000001" and spec.firmware == "uefi"
    assert [(d.name, d.size_gib, d.pool, d.format, d.bus) for d in spec.disks or []] == [
        ("root", 10.0, "ds1", "thin", "scsi"), ("Hard disk 2", 1.5, "ds2", "thick", "scsi")]
    assert spec.nics == [NicSpec(network="VM Network", mac=MAC, model="vmxnet3")]
    assert spec.tags == {"role": "db"}  # last value wins; "" is a deleted key
    assert spec.cloud_init is not None and spec.cloud_init.digest() == "sha256:abc"
    assert (spec.boot, spec.autostart) == (None, False)
    assert current.owner == OWNER_TAG and current.created_disks == ["root"]
    assert (current.max_vcpus, current.max_memory_mib) == (16, 2048)  # CPU hot-add on, memory hot-add off


def test_read_guests_is_one_bulk_read_and_skips_templates_and_other_datacenters() -> None:
    from pyVmomi import vim

    refs = {m: cls(m) for m, cls in [("dc-1", vim.Datacenter), ("dc-2", vim.Datacenter), ("f-1", vim.Folder),
                                     ("f-2", vim.Folder), ("cr-1", vim.ComputeResource), ("rp-1", vim.ResourcePool),
                                     ("host-1", vim.HostSystem), ("vm-1", vim.VirtualMachine),
                                     ("vm-2", vim.VirtualMachine), ("vm-3", vim.VirtualMachine)]}
    host = SimpleNamespace(numCpuThreads=8, memorySize=16 * 1024**3)
    props = {
        "dc-1": {"name": "DC1", "parent": None, "vmFolder": refs["f-1"]},
        "dc-2": {"name": "DC2", "parent": None, "vmFolder": refs["f-2"]},
        "f-1": {"name": "vm", "parent": refs["dc-1"]}, "f-2": {"name": "vm", "parent": refs["dc-2"]},
        "cr-1": {"name": "h1", "parent": refs["dc-1"], "resourcePool": refs["rp-1"], "host": [refs["host-1"]]},
        "rp-1": {"name": "Resources", "parent": refs["cr-1"]},
        "host-1": {"name": "h1", "parent": refs["cr-1"], "summary.hardware": host, "datastore": [], "network": []},
        "vm-1": vm_props(parent=refs["f-1"], **{"runtime.host": refs["host-1"]}),
        "vm-2": vm_props(name="tpl", parent=refs["f-1"], **{"config.template": True}),
        "vm-3": vm_props(name="elsewhere", parent=refs["f-2"]),
    }
    backend = new_backend()
    backend._inv.snap = backend_mod._Snapshot(props=props, refs=refs, vcenter=True)
    states = backend.read_guests(Placement(datacenter="DC1"))
    assert [s.spec.name for s in states] == ["web1"]
    assert states[0].max_vcpus == 8 and states[0].ref.vm is refs["vm-1"]
    capacity = backend.capacity(Placement(datacenter="DC1"))
    assert (capacity.vcpus, capacity.memory_mib, capacity.macs[MAC]) == (8, 16384, "web1")
    assert backend.calls == 0  # both answered from the one cached read
    with pytest.raises(ConfigError, match=r"datacenter='DC9': no such datacenter"):
        backend.capacity(Placement(datacenter="DC9"))


# ---------------------------------------------------------------------------------------------- update
def plan_of(current: GuestState, *changes: Change, power: Any = None) -> GuestPlan:
    return GuestPlan(desired=GuestSpec(name="web1"), current=current, action="update", changes=list(changes),
                     power=power, after=current.spec)


def test_grow_edits_only_that_disk() -> None:
    props = vm_props()
    current = state(props)
    config, _dirs = new_backend().update_config(
        current, plan_of(current, Change("disks[Hard disk 2].size_gib", 1.5, 3.0)), live_only=False)
    (edit,) = config.deviceChange
    assert (edit.operation, edit.fileOperation, edit.device.key) == ("edit", None, 2001)
    assert edit.device.capacityInKB == 3 * 1024 * 1024 and edit.device.capacityInBytes == 3 * 1024**3
    assert not config.extraConfig and config.numCPUs is None and config.memoryMB is None


def test_tag_removal_sets_an_empty_value_and_cpu_memory_firmware_map_directly() -> None:
    props = vm_props()
    current = state(props)
    config, _dirs = new_backend().update_config(current, plan_of(
        current, Change("tags", {"role": "db", "old": "x"}, {"role": "db", "new": "1"}), Change("vcpus", 2, 4),
        Change("memory_mib", 2048, 4096), Change("firmware", "uefi", "bios")), live_only=False)
    assert options(config) == {"virtfleet.tag.new": "1", "virtfleet.tag.old": ""}
    assert (config.numCPUs, config.memoryMB, config.firmware) == (4, 4096, "bios")
    assert not config.deviceChange


def test_new_disk_nic_and_model_change() -> None:
    from pyVmomi import vim

    props = vm_props()
    current = state(props)
    new_disk = {"name": "logs", "size_gib": 2, "pool": "ds1", "format": "thin", "source": None, "bus": "scsi"}
    new_nic = {"network": "VM Network", "mac": "00:50:56:0a:0b:0c", "model": "e1000e"}
    config, _dirs = new_backend().update_config(current, plan_of(
        current, Change("disks[logs]", None, new_disk), Change("nics[00:50:56:0a:0b:0c]", None, new_nic),
        Change(f"nics[{MAC}].model", "vmxnet3", "e1000", live=False)), live_only=False)
    disk, nic, removed, replacement = config.deviceChange
    assert (disk.operation, disk.fileOperation, disk.device.controllerKey, disk.device.unitNumber) == (
        "add", "create", 1000, 2)  # the existing controller's next free unit
    assert disk.device.backing.fileName == "[ds1] web1/web1_logs.vmdk"
    assert options(config) == {"virtfleet.disk.logs": "[ds1] web1/web1_logs.vmdk"}
    assert isinstance(nic.device, vim.vm.device.VirtualE1000e) and nic.device.macAddress == "00:50:56:0a:0b:0c"
    assert (removed.operation, removed.device.key) == ("remove", 4000)
    assert isinstance(replacement.device, vim.vm.device.VirtualE1000) and replacement.device.macAddress == MAC


def test_restart_only_change_on_a_running_guest_is_refused_before_any_call() -> None:
    props = vm_props()
    current = state(props, power="running")
    backend = new_backend()
    with pytest.raises(EndpointError, match=r"guest 'web1': firmware cannot change while it runs on vSphere"):
        backend.update_guest(current, plan_of(current, Change("firmware", "uefi", "bios", live=False)))
    assert backend.calls == 0


def test_restart_applies_offline_changes_between_an_explicit_stop_and_start_with_a_restart_mark() -> None:
    """No ConfigSpec is parked on the backend for a later call: update_guest applies the live changes, and the
    offline ones are applied by restart_guest between the stop and the start, inside a restart mark."""
    calls: list[str] = []

    class Ref:
        _moId = "vm-1"

        def ReconfigVM_Task(self, spec: Any) -> Any:
            extra = {o.key: o.value for o in spec.extraConfig or []}
            if "virtfleet.restarting" in extra:
                calls.append(f"mark {extra['virtfleet.restarting'] or 'cleared'}")
            else:
                calls.append(f"reconfig numCPUs={spec.numCPUs} firmware={spec.firmware}")
            return SimpleNamespace(info=SimpleNamespace(state="success", result=None))

        def ShutdownGuest(self) -> None:
            calls.append("shutdown")

        def PowerOnVM_Task(self) -> Any:
            calls.append("power on")
            return SimpleNamespace(info=SimpleNamespace(state="success", result=None))

        @property
        def runtime(self) -> Any:
            off = calls.count("shutdown") > calls.count("power on")
            return SimpleNamespace(powerState="poweredOff" if off else "poweredOn")

    props = vm_props()
    current = state(props, power="running")
    current.ref = VmRef(Ref(), props)
    backend = new_backend()
    assert not hasattr(backend, "_pending")
    plan = plan_of(current, Change("vcpus", 2, 4), Change("firmware", "uefi", "bios", live=False), power="restart")
    backend.update_guest(current, plan)
    assert calls == ["reconfig numCPUs=4 firmware=None"]
    backend.stop_guest(current, 5, force=False)  # a plain stop applies nothing it was not told to
    assert calls[1:] == ["shutdown"]
    calls.clear()
    backend.restart_guest(current, 5, False, plan)
    assert calls == ["mark " + INSTANCE_UUID, "shutdown", "reconfig numCPUs=None firmware=bios", "power on",
                     "mark cleared"]


def test_a_vm_another_run_stopped_meanwhile_is_stopped_and_removed_without_an_error() -> None:
    """Read as running; then another run powers it off just before our call. ShutdownGuest and PowerOffVM are
    refused for a VM that is off (InvalidPowerState): off is what was asked, for a stop and for a removal."""
    calls: list[str] = []

    class Ref:
        _moId = "vm-1"
        off = False

        @property
        def runtime(self) -> Any:
            return SimpleNamespace(powerState="poweredOff" if self.off else "poweredOn")

        def ShutdownGuest(self) -> None:
            calls.append("shutdown")
            self.off = True  # the other run's stop came first
            raise RuntimeError("InvalidPowerState: the VM is powered off")

        def PowerOffVM_Task(self) -> Any:
            calls.append("power off")
            self.off = True
            return SimpleNamespace(info=SimpleNamespace(state="error", error="InvalidPowerState"))

        def UnregisterVM(self) -> None:
            calls.append("unregister")

    props = vm_props()
    current = state(props, power="running")
    ref = Ref()
    current.ref = VmRef(ref, props)
    backend = new_backend()
    backend.stop_guest(current, 5, force=False)
    assert calls == ["shutdown"]
    calls.clear()
    ref.off = False
    backend.remove_guest(current, remove_storage=False)
    assert calls == ["power off", "unregister"]

    class Stuck(Ref):
        def PowerOffVM_Task(self) -> Any:  # refused, and the VM is still on
            calls.append("power off")
            return SimpleNamespace(info=SimpleNamespace(state="error", error="TaskInProgress"))

    calls.clear()
    current.ref = VmRef(Stuck(), props)
    with pytest.raises(EndpointError, match="PowerOffVM failed"):
        backend.remove_guest(current, remove_storage=False)
    assert calls == ["power off"], "nothing is unregistered while it runs"


def test_offline_changes_are_refused_on_a_running_vm() -> None:
    props = vm_props()
    current = state(props, power="running")
    current.ref = VmRef(SimpleNamespace(_moId="vm-1", runtime=SimpleNamespace(powerState="poweredOn")), props)
    backend = new_backend()
    plan = plan_of(current, Change("firmware", "uefi", "bios", live=False), power="stop")
    with pytest.raises(EndpointError, match=r"firmware need the VM powered off"):
        backend.apply_offline(current, plan)


def test_a_stopped_vm_with_a_restart_mark_reads_as_an_interrupted_restart() -> None:
    from pyVmomi import vim

    mark = [vim.option.OptionValue(key="virtfleet.restarting", value=INSTANCE_UUID)]
    props = vm_props(**{"runtime.powerState": "poweredOff"})
    props["config.extraConfig"] = list(props["config.extraConfig"]) + mark
    assert vm_state(vim.VirtualMachine("vm-1"), props, {}, 8, 4096).interrupted_restart
    running = vm_props()
    running["config.extraConfig"] = list(running["config.extraConfig"]) + mark
    assert not vm_state(vim.VirtualMachine("vm-1"), running, {}, 8, 4096).interrupted_restart
    # A copy of the VM (another instance UUID) carries the mark but was not being restarted.
    copy = vm_props(**{"runtime.powerState": "poweredOff",
                       "config.instanceUuid": "5010bbbb-0000-0000-0000-0000000000bb"})
    copy["config.extraConfig"] = list(copy["config.extraConfig"]) + mark
    assert not vm_state(vim.VirtualMachine("vm-2"), copy, {}, 8, 4096).interrupted_restart


def test_a_clone_copies_the_mark_but_owns_nothing() -> None:
    """A clone or a VM deployed from a collection-built template has the extraConfig, not the instance UUID."""
    from pyVmomi import vim

    clone = vm_props(**{"config.instanceUuid": "5010cccc-0000-0000-0000-0000000000cc"})
    got = vm_state(vim.VirtualMachine("vm-7"), clone, {}, 8, 4096)
    assert got.owner is None and not got.owned_by(OWNER_TAG) and got.created_disks == []
    assert [d.name for d in got.spec.disks or []] == ["root", "Hard disk 2"]  # still named by the records
    unmarked = vm_props(**{"config.instanceUuid": None})
    assert vm_state(vim.VirtualMachine("vm-8"), unmarked, {}, 8, 4096).owner is None


def test_unknown_change_kinds_are_refused_not_ignored() -> None:
    props = vm_props()
    current = state(props)
    with pytest.raises(EndpointError, match=r"boot\.kernel cannot be changed on vSphere"):
        new_backend().update_config(current, plan_of(current, Change("boot", None, "/k", key="kernel")),
                                    live_only=False)


# ---------------------------------------------------------------------------------------------- verify
@pytest.mark.parametrize(("extra", "message"), [
    ({"boot": {"kernel": "/vmlinuz"}}, r"guest 'g' boot=.*direct kernel boot is libvirt-only"),
    ({"disks": [{"name": "d", "size_gib": 1, "bus": "virtio"}]}, r"guest 'g' disks\[0\]\.bus='virtio'"),
    ({"disks": [{"name": "d", "size_gib": 1, "format": "qcow2"}]}, r"guest 'g' disks\[0\]\.format='qcow2'"),
    ({"disks": [{"name": "d", "source": "/img.vmdk"}]}, r"guest 'g' disks\[0\]\.source="),
    ({"nics": [{"network": "n", "model": "virtio"}]}, r"guest 'g' nics\[0\]\.model='virtio'"),
    ({"autostart": True}, r"guest 'g' autostart=True"),
    ({"cloud_init": {"meta_data": "- a list", "network_config": "version: 2"}}, r"guest 'g' cloud_init\.meta_data"),
])
def test_verify_spec_refuses_what_vsphere_cannot_do(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        new_backend().verify_spec(guest_spec_from_dict(dict({"name": "g"}, **extra)))


def test_verify_spec_accepts_a_plain_vsphere_guest() -> None:
    new_backend().verify_spec(guest_spec_from_dict({
        "name": "g", "disks": [{"name": "d", "size_gib": 1, "bus": "sata", "format": "thick"}],
        "nics": [{"network": "n", "model": "e1000"}], "autostart": False,
        "cloud_init": {"meta_data": "instance-id: g", "network_config": "version: 2"}}))
