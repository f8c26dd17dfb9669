# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Building the ConfigSpec of a create or of a reconfigure: device specs (disks on free controller slots,
NICs on a network or distributed port group), the extraConfig bookkeeping (codec.py), and one small function
per (kind, attr) of a Change, found in _UPDATES."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

from ..._changes import BackendDefaults, Change
from ..._errors import ConfigError, EndpointError
from ..._model import DiskSpec, GuestSpec, NicSpec
from . import codec
from .codec import DISK_PREFIX, GUEST_ID, KEPT_PREFIX, NIC_CLASSES, OWNER_KEY, OWNER_UUID_KEY, TAG_PREFIX
from .placement import Inventory, _Target
from .session import vim

# Unit numbers a disk may take per bus (SCSI unit 7 is the controller itself; IDE has two per channel).
_UNITS = {"scsi": [u for u in range(16) if u != 7], "sata": list(range(30)), "nvme": list(range(15)), "ide": [0, 1]}


class _Slots:
    """Free (controller key, unit number) pairs for disks, over the VM's devices plus this spec's additions.
    A bus without a controller gets one, added to CHANGES with a new negative key."""

    def __init__(self, devices: List[Any], changes: List[Any], keys: Iterator[int]) -> None:
        self.changes = changes
        self.keys = keys
        self.controllers: Dict[str, List[int]] = {}
        self.used: Dict[int, Set[int]] = {}
        for dev in devices:
            if isinstance(dev, vim.vm.device.VirtualController):
                bus = codec.bus(dev)
                if bus:
                    self.controllers.setdefault(bus, []).append(dev.key)
            if dev.controllerKey is not None and dev.unitNumber is not None:
                self.used.setdefault(dev.controllerKey, set()).add(dev.unitNumber)

    def release(self, controller_key: int, unit: int) -> None:
        self.used.get(controller_key, set()).discard(unit)

    def take(self, bus: str) -> Tuple[int, int]:
        for key in self.controllers.get(bus, []):
            free = [u for u in _UNITS[bus] if u not in self.used.get(key, set())]
            if free:
                self.used.setdefault(key, set()).add(free[0])
                return key, free[0]
        if bus == "ide" or self.controllers.get(bus):
            raise ValueError(f"no free unit left on the {bus} controllers")
        key = next(self.keys)
        if bus == "scsi":
            controller: Any = vim.vm.device.ParaVirtualSCSIController(key=key, busNumber=0, sharedBus="noSharing")
        elif bus == "sata":
            controller = vim.vm.device.VirtualAHCIController(key=key, busNumber=0)
        else:
            controller = vim.vm.device.VirtualNVMEController(key=key, busNumber=0)
        self.changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=controller))
        self.controllers[bus] = [key]
        self.used[key] = {_UNITS[bus][0]}
        return key, _UNITS[bus][0]


def _new_keys() -> Iterator[int]:
    key = -100
    while True:
        yield key
        key -= 1


@dataclasses.dataclass
class _Build:
    """One ConfigSpec being built (a create or a reconfigure) and what goes with it, passed to the one function
    per change kind that adds to it. Lives for one call."""

    guest: str
    inv: Inventory  # the bulk read, for network morefs and distributed switches (read only if needed)
    defaults: BackendDefaults
    slots: _Slots
    keys: Iterator[int]
    vm_ds: Optional[str]  # the VM's datastore, and its directory there
    vm_dir: str
    networks: Dict[str, str]  # network name -> moid, as the VM's host(s) see them
    kept: Dict[str, Optional[float]]  # disk files already at this guest's disk paths -> GiB (None: unknown)
    changes: List[Any]  # device changes (shared with SLOTS, which adds controllers)
    extra: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
    dirs: Set[str] = dataclasses.field(default_factory=set)  # directories to make first
    created: List[str] = dataclasses.field(default_factory=list)  # disks whose files this spec creates
    grow: Dict[str, float] = dataclasses.field(default_factory=dict)  # reused files to grow afterwards -> GiB
    config: Any = None
    # reconfigure only: the VM's disks by name, its NICs, the NICs after the plan, NICs replaced (model change)
    disks: Dict[str, Any] = dataclasses.field(default_factory=dict)
    nics: List[Any] = dataclasses.field(default_factory=list)
    after_nics: Dict[str, NicSpec] = dataclasses.field(default_factory=dict)
    after: Optional[GuestSpec] = None
    replaced: Set[Optional[str]] = dataclasses.field(default_factory=set)

    @classmethod
    def new(cls, guest: str, inv: Inventory, defaults: BackendDefaults, devices: List[Any], vm_ds: Optional[str],
            vm_dir: str, networks: Dict[str, str], kept: Dict[str, Optional[float]]) -> _Build:
        changes: List[Any] = []
        keys = _new_keys()
        return cls(guest=guest, inv=inv, defaults=defaults, slots=_Slots(devices, changes, keys), keys=keys,
                   vm_ds=vm_ds, vm_dir=vm_dir, networks=networks, kept=kept, changes=changes)

    def config_and_dirs(self) -> Tuple[Any, Set[str]]:
        self.config.deviceChange = self.changes
        self.config.extraConfig = [vim.option.OptionValue(key=k, value=v) for k, v in self.extra]
        return self.config, self.dirs


# ---------------------------------------------------------------------------------------- devices
def backing(inv: Inventory, network: str, networks: Dict[str, str]) -> Any:
    """The NIC backing for a network name: a distributed port group needs its switch's UUID."""
    snap = inv.snapshot()
    moid = networks.get(network)
    ref = snap.refs.get(moid or "")
    if isinstance(ref, vim.dvs.DistributedVirtualPortgroup):
        dvs = snap.props[moid or ""].get("config.distributedVirtualSwitch")
        uuid = snap.props.get(dvs._moId, {}).get("uuid") if dvs is not None else None
        port = vim.dvs.PortConnection(switchUuid=uuid, portgroupKey=snap.props[moid or ""].get("key", moid))
        return vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(port=port)
    return vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName=network, network=ref)


def nic_add(build: _Build, nic: NicSpec) -> Any:
    card = getattr(vim.vm.device, NIC_CLASSES[nic.model or build.defaults.nic_model])
    device = card(key=next(build.keys), addressType="manual", macAddress=nic.mac,
                  backing=backing(build.inv, nic.network, build.networks),
                  connectable=vim.vm.device.VirtualDevice.ConnectInfo(startConnected=True, allowGuestControl=True,
                                                                      connected=False))
    return vim.vm.device.VirtualDeviceSpec(operation="add", device=device)


def disk_add(disk: DiskSpec, key: int, slot: Tuple[int, int], file_name: str, create: bool = True) -> Any:
    """A new disk's device spec: CREATE its file, or attach the file already there (a kept disk)."""
    disk_backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
        diskMode="persistent", fileName=file_name, thinProvisioned=disk.format == "thin",
        eagerlyScrub=disk.format == "eagerzeroedthick")
    size = codec.kib(disk.size_gib)
    device = vim.vm.device.VirtualDisk(key=key, controllerKey=slot[0], unitNumber=slot[1], capacityInKB=size,
                                       capacityInBytes=size * 1024, backing=disk_backing)
    return vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create" if create else None, device=device)


def disk_file(guest: str, disk: str, pool: str, vm_ds: Optional[str], vm_dir: str) -> str:
    """Where this collection puts disk DISK of GUEST: in the VM's directory on the VM's datastore, else in a
    directory named like the guest. The one rule for creating, reusing (kept disks) and finding them."""
    directory = vm_dir if pool == vm_ds else guest
    return f"[{pool}] {directory}/{guest}_{disk}.vmdk"


def vm_dir_of(vmx: str, guest: str) -> str:
    """The VM's directory from config.files.vmPathName ('[ds1] web1/web1.vmx' -> 'web1')."""
    return vmx.split("] ", 1)[-1].rsplit("/", 1)[0] if "/" in vmx else guest


def _new_disk(build: _Build, disk: DiskSpec, pool: str) -> None:
    """Add the device spec of a new disk and its extraConfig record, and (off the VM's datastore) the
    directory to make. A file already at the disk's path (KEPT, from an earlier guest of this name removed
    without remove_storage) is attached instead of created: recorded as reused, never as created. The file
    name is ours, so the record needs no read after creation."""
    if pool != build.vm_ds:
        build.dirs.add(f"[{pool}] {build.guest}")
    file_name = disk_file(build.guest, disk.name, pool, build.vm_ds, build.vm_dir)
    try:
        slot = build.slots.take(disk.bus or build.defaults.disk_bus)
    except ValueError as exc:
        raise ConfigError(f"guest {build.guest!r} disks", disk.name, str(exc)) from None
    reused = file_name in build.kept
    build.changes.append(disk_add(disk, next(build.keys), slot, file_name, create=not reused))
    build.extra.append(((KEPT_PREFIX if reused else DISK_PREFIX) + disk.name, file_name))
    kept = build.kept.get(file_name)
    if reused and kept is not None and (disk.size_gib or 0) > kept + 0.005:
        build.grow[file_name] = disk.size_gib or 0.0  # attached at its size, grown right after
    if not reused:
        build.created.append(disk.name)


# ---------------------------------------------------------------------------------------- create
def create_build(inv: Inventory, defaults: BackendDefaults, spec: GuestSpec, target: _Target, owner: str,
                 instance_uuid: Optional[str], kept: Dict[str, Optional[float]]) -> _Build:
    """The ConfigSpec of a new guest (config_and_dirs(): and the directories to make first). OWNER's mark names
    INSTANCE_UUID, which the spec gives the VM. KEPT: disk files already at this guest's disk paths -> their GiB
    (None: unknown), attached instead of created."""
    vm_ds = (spec.disks[0].pool if spec.disks else None) or target.default_datastore
    if not vm_ds:
        raise ConfigError(f"guest {spec.name!r} pool", None, "no datastore given and the host has none")
    # IDE controllers 200/201 are default devices of every new VM.
    ide = [vim.vm.device.VirtualIDEController(key=200), vim.vm.device.VirtualIDEController(key=201)]
    build = _Build.new(spec.name, inv, defaults, ide, vm_ds, spec.name, target.networks, kept)
    build.extra.append((OWNER_KEY, owner))
    if instance_uuid:
        build.extra.append((OWNER_UUID_KEY, instance_uuid))
    for disk in spec.disks or []:
        _new_disk(build, disk, disk.pool or vm_ds)
    for nic in spec.nics or []:
        build.changes.append(nic_add(build, nic))
    build.extra += [(TAG_PREFIX + k, v) for k, v in sorted((spec.tags or {}).items())]
    if spec.cloud_init is not None:
        build.extra += codec.cloud_init_options(spec.cloud_init, clear=False)
    build.config = vim.vm.ConfigSpec(
        name=spec.name, numCPUs=spec.vcpus or 1, memoryMB=spec.memory_mib or 1024,
        firmware="efi" if spec.firmware == "uefi" else "bios", guestId=GUEST_ID,
        # Hot-add on, so that growing vCPUs and memory later is live (the planner reads max_vcpus/max_memory).
        cpuHotAddEnabled=True, memoryHotAddEnabled=True,
        files=vim.vm.FileInfo(vmPathName=f"[{vm_ds}]"))
    if spec.uuid:
        build.config.uuid = spec.uuid
    if instance_uuid:
        build.config.instanceUuid = instance_uuid
    return build


# ---------------------------------------------------------------------------------------- reconfigure
def update_build(inv: Inventory, defaults: BackendDefaults, label: str, guest: str, props: Dict[str, Any],
                 changes: List[Change], after: GuestSpec) -> _Build:
    """ONE ConfigSpec for CHANGES to the VM whose properties (as read) are PROPS. Devices the changes do not name
    are never touched. Each change is applied by the one function _UPDATES names for its (kind, attr)."""
    devices = list(props.get("config.hardware.device") or [])
    extra_now = codec.options(props.get("config.extraConfig"))
    host = props.get("runtime.host")
    networks = inv.snapshot().visible([host._moId])[1] if host is not None else {}
    vmx = props.get("config.files.vmPathName") or ""
    build = _Build.new(guest, inv, defaults, devices, codec.datastore_of(vmx), vm_dir_of(vmx, guest), networks, {})
    build.config = vim.vm.ConfigSpec()
    build.disks = dict(codec.disks(props, extra_now))
    build.nics = [d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)]
    build.after_nics = {n.mac: n for n in after.nics or [] if n.mac}
    build.after = after
    # A NIC whose model changes is replaced, and the replacement gets the new network too.
    build.replaced = {c.key for c in changes if c.kind == "nics" and c.attr == "model" and c.key}
    for change in changes:
        if change.kind in ("guest", "power_state"):
            continue
        apply = _UPDATES.get((change.kind, change.attr))
        if apply is None:
            raise EndpointError(label, f"guest {guest!r}: {change.field} cannot be changed on vSphere")
        apply(build, change)
    return build


def _set_vcpus(build: _Build, change: Change) -> None:
    build.config.numCPUs = change.after


def _set_memory(build: _Build, change: Change) -> None:
    build.config.memoryMB = change.after


def _set_firmware(build: _Build, change: Change) -> None:
    build.config.firmware = "efi" if change.after == "uefi" else "bios"


def _set_autostart(build: _Build, change: Change) -> None:
    """verify_spec refuses autostart: true and a guest reads back false, so this never changes anything."""


def _set_tags(build: _Build, change: Change) -> None:
    before, wanted = change.before or {}, change.after or {}
    build.extra += [(TAG_PREFIX + k, v) for k, v in sorted(wanted.items()) if before.get(k) != v]
    build.extra += [(TAG_PREFIX + k, "") for k in sorted(set(before) - set(wanted))]  # "" deletes the key


def _set_cloud_init(build: _Build, change: Change) -> None:
    if build.after is not None and build.after.cloud_init is not None:
        build.extra += codec.cloud_init_options(build.after.cloud_init, clear=True)


def _add_disk(build: _Build, change: Change) -> None:
    disk = DiskSpec(**change.after)
    _new_disk(build, disk, disk.pool or build.vm_ds or "")


def _grow_disk(build: _Build, change: Change) -> None:
    dev = build.disks[change.key or ""]
    dev.capacityInKB = codec.kib(change.after)
    dev.capacityInBytes = dev.capacityInKB * 1024
    build.changes.append(vim.vm.device.VirtualDeviceSpec(operation="edit", device=dev))


def _move_disk(build: _Build, change: Change) -> None:
    dev = build.disks[change.key or ""]
    build.slots.release(dev.controllerKey, dev.unitNumber)
    try:
        dev.controllerKey, dev.unitNumber = build.slots.take(change.after)
    except ValueError as exc:
        raise ConfigError(f"guest {build.guest!r} disks", change.field, str(exc)) from None
    build.changes.append(vim.vm.device.VirtualDeviceSpec(operation="edit", device=dev))


def _nic(build: _Build, key: Optional[str]) -> Any:
    """The NIC a change names: by MAC, or '#<n>' (the n-th NIC) for one without a MAC."""
    if key and key.startswith("#"):
        return build.nics[int(key[1:])]
    return next(d for d in build.nics if (d.macAddress or "").lower() == key)


def _add_nic(build: _Build, change: Change) -> None:
    build.changes.append(nic_add(build, NicSpec(**change.after)))


def _set_nic_network(build: _Build, change: Change) -> None:
    if change.key in build.replaced:
        return  # the replacement NIC (_set_nic_model) gets the new network
    dev = _nic(build, change.key)
    dev.backing = backing(build.inv, change.after, build.networks)
    build.changes.append(vim.vm.device.VirtualDeviceSpec(operation="edit", device=dev))


def _set_nic_model(build: _Build, change: Change) -> None:
    # A NIC cannot change its type: remove it and add one of the new model with the same MAC.
    dev = _nic(build, change.key)
    mac = codec.mac(dev.macAddress)
    build.changes.append(vim.vm.device.VirtualDeviceSpec(operation="remove", device=dev))
    nic = build.after_nics.get(mac or "") or NicSpec(
        network=codec.backing_network(dev.backing, build.inv.snapshot().networks()) or "")
    build.changes.append(nic_add(build, NicSpec(network=nic.network, mac=mac, model=change.after)))


_UPDATES: Dict[Tuple[str, Optional[str]], Callable[[_Build, Change], None]] = {
    ("vcpus", None): _set_vcpus,
    ("memory_mib", None): _set_memory,
    ("firmware", None): _set_firmware,
    ("autostart", None): _set_autostart,
    ("tags", None): _set_tags,
    ("cloud_init", None): _set_cloud_init,
    ("disks", None): _add_disk,
    ("disks", "size_gib"): _grow_disk,
    ("disks", "bus"): _move_disk,
    ("nics", None): _add_nic,
    ("nics", "network"): _set_nic_network,
    ("nics", "model"): _set_nic_model,
}
