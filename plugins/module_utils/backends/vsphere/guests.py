# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Guest convergence's reads on vSphere: every VM of the bulk read as GuestState (normalised by codec.py, the
same functions discovery uses), what a new guest would land on (capacity), what vSphere cannot do
(verify_spec) and the disk files kept from an earlier guest of the same name (leftover_disks)."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

from ..._errors import ConfigError, EndpointError
from ..._model import (
    CloudInit,
    DiskSpec,
    GuestSpec,
    GuestState,
    HostCapacity,
    NicSpec,
    Placement,
    mib,
)
from . import codec
from .codec import (
    CLOUD_INIT_DIGEST_KEY,
    DISK_PREFIX,
    NIC_CLASSES,
    OWNER_UUID_KEY,
    RESTARTING_KEY,
    VSPHERE_DISK_BUSES,
    VSPHERE_DISK_FORMATS,
)
from .configspec import disk_file, vm_dir_of
from .placement import Inventory, _Snapshot, _Target, in_scope
from .session import Connection, vim


class VmRef:
    """GuestState.ref on vSphere: the VM's moref (every call goes to it) and the properties it was read with,
    which an update edits. What read_guests read travels with the state it returned, so no later call depends
    on a copy kept on the backend."""

    __slots__ = ("props", "vm")

    def __init__(self, vm: Any, props: Optional[Dict[str, Any]] = None) -> None:
        self.vm = vm
        self.props: Dict[str, Any] = props or {}

    def __repr__(self) -> str:
        return f"VmRef({getattr(self.vm, '_moId', self.vm)!r})"


def props_of(inv: Inventory, current: GuestState) -> Dict[str, Any]:
    """The VM's properties as read with CURRENT, or (a state made elsewhere) from the bulk read."""
    ref: VmRef = current.ref
    return ref.props or inv.snapshot().props.get(ref.vm._moId, {})


# ---------------------------------------------------------------------------------------- reading a VM
def vm_state(ref: Any, props: Dict[str, Any], networks: Dict[str, str], host_cpus: Optional[int],
             host_mib: Optional[int]) -> GuestState:
    """One VM as GuestState, normalised so that a guest created from a planned spec reads back equal."""
    extra = codec.options(props.get("config.extraConfig"))
    devices = props.get("config.hardware.device") or []
    by_key = {d.key: d for d in devices}
    # The mark counts only on the VM it was written on (see OWNER_UUID_KEY); a copy owns nothing, and
    # neither the disks its records name.
    instance_uuid = (props.get("config.instanceUuid") or "").lower()
    marked_here = bool(instance_uuid) and extra.get(OWNER_UUID_KEY, "").lower() == instance_uuid
    disks, created = [], []
    for name, dev in codec.disks(props, extra):
        file_name = getattr(dev.backing, "fileName", None)
        disks.append(DiskSpec(name=name, size_gib=codec.disk_size_gib(getattr(dev, "capacityInBytes", None),
                                                                      dev.capacityInKB),
                              pool=codec.datastore_of(file_name), format=codec.disk_format(dev.backing), source=None,
                              bus=codec.bus(by_key.get(dev.controllerKey))))
        if marked_here and extra.get(DISK_PREFIX + name) == file_name:
            created.append(name)
    nics = [NicSpec(network=codec.backing_network(d.backing, networks) or "", mac=codec.mac(d.macAddress),
                    model=codec.nic_model(type(d).__name__))
            for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)]
    digest = extra.get(CLOUD_INIT_DIGEST_KEY)
    vcpus = codec.count(props.get("config.hardware.numCPU"))
    memory = codec.count(props.get("config.hardware.memoryMB"))
    spec = GuestSpec(
        name=props.get("name", ref._moId),
        uuid=(props.get("config.uuid") or "").lower() or None,
        vcpus=vcpus,
        memory_mib=memory,
        firmware="uefi" if props.get("config.firmware") == "efi" else "bios",
        disks=disks,
        nics=nics,
        cloud_init=CloudInit(stored_digest=digest) if digest else None,
        boot=None,
        autostart=False,
        tags=codec.tags(extra),
    )
    power_state = codec.power_state(str(props.get("runtime.powerState")))
    return GuestState(
        spec=spec,
        power_state=power_state,
        owner=codec.owner(extra, instance_uuid),
        created_disks=created,
        interrupted_restart=power_state == "stopped" and bool(instance_uuid)
        and extra.get(RESTARTING_KEY, "").lower() == instance_uuid,
        # Guests this collection creates have CPU and memory hot-add on: growth up to the host is live.
        max_vcpus=host_cpus if props.get("config.cpuHotAddEnabled") and host_cpus else vcpus,
        max_memory_mib=host_mib if props.get("config.memoryHotAddEnabled") and host_mib else memory,
        ref=VmRef(ref, props),
    )


def read_guests(snap: _Snapshot, target: _Target) -> List[GuestState]:
    """Every VM of TARGET's datacenter in SNAP (templates and inaccessible VMs left out), marked in scope or not."""
    networks = snap.networks()
    states = []
    for moid in snap.of(vim.VirtualMachine):
        props = snap.props[moid]
        if props.get("config.template") or "config.uuid" not in props:
            continue  # templates, and VMs whose configuration is not readable (inaccessible)
        host = props.get("runtime.host")
        where = snap.ancestor(snap.parent(moid), vim.Datacenter) or (
            snap.ancestor(host._moId, vim.Datacenter) if host is not None else None)
        if where != target.datacenter:
            continue
        hardware = snap.props.get(host._moId, {}).get("summary.hardware") if host is not None else None
        state = vm_state(snap.refs[moid], props, networks, getattr(hardware, "numCpuThreads", None),
                         mib(getattr(hardware, "memorySize", None)))
        state.in_scope = in_scope(snap, target, moid, props)
        states.append(state)
    return sorted(states, key=lambda s: s.spec.name)


def capacity(snap: _Snapshot, target: _Target, placement: Placement) -> HostCapacity:
    hardware = [snap.props.get(h, {}).get("summary.hardware") for h in target.hosts]
    threads = [getattr(hw, "numCpuThreads", None) for hw in hardware]
    memory = [mib(getattr(hw, "memorySize", None)) for hw in hardware]
    macs: Dict[str, str] = {}
    for moid in snap.of(vim.VirtualMachine):
        for dev in snap.props[moid].get("config.hardware.device") or []:
            if isinstance(dev, vim.vm.device.VirtualEthernetCard) and dev.macAddress:
                macs.setdefault(dev.macAddress.lower(), snap.name(moid))
    create_error = None
    if target.pool is None:
        create_error = ConfigError("cluster", placement.cluster, target.why_no_pool or "no resource pool to "
                                                                                       "create in")
    return HostCapacity(vcpus=max((t for t in threads if t), default=None),
                        memory_mib=max((m for m in memory if m), default=None),
                        networks=sorted(target.networks), pools=list(target.datastores),
                        default_pool=target.default_datastore, macs=macs, create_error=create_error)


def verify_spec(spec: GuestSpec) -> None:
    def bad(field: str, value: Any, problem: str) -> ConfigError:
        return ConfigError(f"guest {spec.name!r} {field}", value, problem)

    if spec.boot is not None:
        raise bad("boot", dataclasses.asdict(spec.boot), "direct kernel boot is libvirt-only")
    if spec.autostart:
        raise bad("autostart", spec.autostart, "not supported on vSphere (use the host's VM startup policy)")
    for i, disk in enumerate(spec.disks or []):
        if disk.bus is not None and disk.bus not in VSPHERE_DISK_BUSES:
            raise bad(f"disks[{i}].bus", disk.bus, f"vSphere disk buses are {', '.join(VSPHERE_DISK_BUSES)}")
        if disk.format is not None and disk.format not in VSPHERE_DISK_FORMATS:
            raise bad(f"disks[{i}].format", disk.format,
                      f"vSphere disk formats are {', '.join(VSPHERE_DISK_FORMATS)}")
        if disk.source is not None:
            raise bad(f"disks[{i}].source", disk.source,
                      "copying a disk image is not supported on vSphere; clone from a template instead")
    for i, nic in enumerate(spec.nics or []):
        if nic.model is not None and nic.model not in NIC_CLASSES:
            raise bad(f"nics[{i}].model", nic.model, f"vSphere NIC models are {', '.join(NIC_CLASSES)}")
    if spec.cloud_init is not None and spec.cloud_init.network_config is not None:
        try:
            codec.metadata(spec.cloud_init)
        except ValueError as exc:
            raise bad("cloud_init.meta_data", spec.cloud_init.meta_data,
                      f"must be a YAML/JSON mapping when network_config is set ({exc}); the VMware "
                      "datasource reads the network config from inside the meta-data") from None


# ---------------------------------------------------------------------------------------- kept disks
def disk_paths(snap: _Snapshot, spec: GuestSpec, target: _Target) -> Dict[str, str]:
    """disk name -> the file a new disk of SPEC would get (for a guest that exists: in its directory)."""
    same = [m for m in snap.of(vim.VirtualMachine) if snap.props[m].get("name") == spec.name
            and not snap.props[m].get("config.template")]
    vm_ds, vm_dir, have = (spec.disks[0].pool if spec.disks else None) or target.default_datastore, spec.name, set()
    if len(same) > 1:
        return {}  # ambiguous: the planner reports it
    if same:
        props = snap.props[same[0]]
        vmx = props.get("config.files.vmPathName") or ""
        vm_ds = codec.datastore_of(vmx)
        vm_dir = vm_dir_of(vmx, spec.name)
        have = {n for n, _dev in codec.disks(props, codec.options(props.get("config.extraConfig")))}
    return {d.name: disk_file(spec.name, d.name, d.pool or target.default_datastore or "", vm_ds, vm_dir)
            for d in spec.disks or [] if d.name not in have and (d.pool or target.default_datastore)}


def existing_files(conn: Connection, browsers: Dict[str, Any], name: str, files: List[str]
                   ) -> Dict[str, Optional[float]]:
    """Which of FILES exist -> their capacity in GiB (None when the datastore does not say: vcsim). One
    SearchDatastore per directory, all started before the first is waited for."""
    by_dir: Dict[str, List[str]] = {}
    for file_name in files:
        by_dir.setdefault(file_name.rsplit("/", 1)[0], []).append(file_name)
    tasks = []
    for directory, names in sorted(by_dir.items()):
        browser = browsers.get(codec.datastore_of(directory) or "")
        if browser is None:
            continue  # an unknown datastore is the planner's to report
        query = vim.host.DatastoreBrowser.SearchSpec(
            matchPattern=[n.rsplit("/", 1)[-1] for n in names], query=[vim.host.DatastoreBrowser.VmDiskQuery(
                details=vim.host.DatastoreBrowser.VmDiskQuery.Details(capacityKb=True))],
            details=vim.host.DatastoreBrowser.FileInfo.Details(fileSize=True, fileType=True))
        tasks.append((directory, conn.invoke(name, "searching " + directory, browser.SearchDatastore_Task,
                                             directory, query)))
    found: Dict[str, Optional[float]] = {}
    for directory, task in tasks:
        try:
            result = conn.wait(task, name, "searching " + directory)
        except EndpointError as exc:
            if "FileNotFound" in str(exc) or "not found" in str(exc).lower():
                continue  # no such directory: nothing kept there
            raise
        for info in getattr(result, "file", None) or []:
            size = getattr(info, "capacityKb", None)
            found[f"{directory}/{info.path}"] = size / 1024 / 1024 if size else None
    return found


def leftover_disks(conn: Connection, snap: _Snapshot, target: _Target, specs: List[GuestSpec]
                   ) -> Dict[Tuple[str, str], float]:
    """(guest, disk) -> GiB of a disk file at the path this collection would create for that disk, kept when
    a guest of the name was removed without remove_storage: creating the disk attaches it (and grows it).
    0.0 when the datastore does not report the size (vcsim). A file attached to another VM is refused."""
    paths = {(s.name, disk): path for s in specs if s.state != "absent"
             for disk, path in disk_paths(snap, s, target).items()}
    if not paths:
        return {}
    found = existing_files(conn, snap.browsers(), "leftover disks", sorted(set(paths.values())))
    used = snap.files_in_use()
    out: Dict[Tuple[str, str], float] = {}
    for (guest, disk), path in paths.items():
        if path not in found:
            continue
        holder = used.get(path)
        if holder is not None and holder != guest:
            raise ConfigError(f"guest {guest!r} disks", disk, f"its file {path} is attached to VM {holder!r}")
        if holder is None:
            out[(guest, disk)] = found[path] or 0.0
    return out
