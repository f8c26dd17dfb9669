# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""One function per attribute a planned change can name, found in APPLY by (kind, attribute): each edits the
persistent definition of one update_guest call (Edit) and queues what has to happen once it is stored (volumes
to make, the seed to write, autostart and the running guest's changes)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..._changes import Change, GuestPlan
from ..._model import CloudInit, DiskSpec, GuestState, NicSpec
from . import storage
from .codec import Disk, disk_element, free_dev, metadata, mib_of, nic_element, ns, seed_element, set_tags, sub, to_xml
from .session import Session, libvirt

Step = Tuple[str, Callable[..., Any], Tuple[Any, ...]]


class Edit:
    """One update_guest call: the persistent definition being edited, and what follows once it is stored."""

    def __init__(self, session: Session, current: GuestState, plan: GuestPlan, root: ET.Element) -> None:
        self.session = session
        self.dom = current.ref
        self.name = current.spec.name
        self.plan = plan
        self.after = plan.after or current.spec
        self.root = root
        self.running = current.power_state in ("running", "paused", "suspended")  # QEMU holds the images open
        devices = root.find("devices")
        self.devices = devices if devices is not None else sub(root, "devices")
        self.disks = {d.name: d for d in map(Disk, root.findall("./devices/disk"))}
        self.redefine = False  # the definition changed beyond our metadata element: defineXML
        self.meta_changed = False  # only our metadata element changed: setMetadata
        self.storage: List[Tuple[str, Callable[..., Tuple[Any, bool]], Tuple[Any, ...]]] = []  # volumes to make
        self.seed: Optional[Tuple[CloudInit, Optional[str], Optional[str]]] = None  # (data, pool, volume)
        self.then: List[Step] = []  # autostart, the running guest

    @property
    def meta(self) -> ET.Element:
        return metadata(self.root)

    def hot(self, change: Change) -> bool:
        return self.running and change.live

    def live(self, what: str, func: Callable[..., Any], *args: Any) -> None:
        """Queue a change of the running guest (after the define; libvirt's AFFECT_LIVE flag appended)."""
        self.then.append((f"{what} (live)", func, (*args, libvirt.VIR_DOMAIN_AFFECT_LIVE)))


def _apply_vcpus(edit: Edit, change: Change) -> None:
    vcpu = edit.root.find("vcpu")
    if vcpu is None:
        vcpu = sub(edit.root, "vcpu")
    if int(vcpu.text or 1) < change.after:
        vcpu.text = str(change.after)
    vcpu.set("current", str(change.after))
    edit.redefine = True
    if edit.hot(change):
        edit.live("vcpus", edit.dom.setVcpusFlags, change.after)


def _apply_memory(edit: Edit, change: Change) -> None:
    kib = str(change.after * 1024)
    memory = edit.root.find("memory")
    if memory is None:
        memory = ET.Element("memory")
        edit.root.insert(2, memory)
    # <memory> is both the maximum and what a guest without a balloon driver gets: it follows the new value,
    # except while a running guest takes more within that maximum.
    if not edit.hot(change) or (mib_of(memory) or 0) < change.after:
        memory.text, memory.attrib["unit"] = kib, "KiB"
    current_memory = edit.root.find("currentMemory")
    if current_memory is None:
        current_memory = ET.Element("currentMemory")
        edit.root.insert(list(edit.root).index(memory) + 1, current_memory)
    current_memory.text, current_memory.attrib["unit"] = kib, "KiB"
    edit.redefine = True
    if edit.hot(change):
        edit.live("memory", edit.dom.setMemoryFlags, change.after * 1024)


def _apply_firmware(edit: Edit, change: Change) -> None:
    os_el = edit.root.find("os")
    if os_el is None:
        return
    if change.after == "uefi":
        os_el.set("firmware", "efi")
    else:
        os_el.attrib.pop("firmware", None)
        for loader in os_el.findall("loader") + os_el.findall("nvram"):
            os_el.remove(loader)
    edit.redefine = True


def _apply_boot(edit: Edit, change: Change) -> None:
    os_el = edit.root.find("os")
    if os_el is None or change.key not in ("kernel", "initrd", "cmdline"):
        return
    element = os_el.find(change.key)
    if element is None:
        element = sub(os_el, change.key)
    element.text = change.after
    for boot_dev in os_el.findall("boot"):
        os_el.remove(boot_dev)
    edit.redefine = True


def _apply_autostart(edit: Edit, change: Change) -> None:
    edit.then.append(("autostart", edit.dom.setAutostart, (1 if change.after else 0,)))  # no re-define


def _apply_tags(edit: Edit, change: Change) -> None:
    set_tags(edit.meta, change.after)
    edit.meta_changed = True


def _apply_cloud_init(edit: Edit, change: Change) -> None:
    cloud_init = edit.after.cloud_init or edit.plan.desired.cloud_init
    if cloud_init is None:
        return
    # The old digest goes until the new seed is written: a run stopped in between writes it again.
    for old in edit.meta.findall(ns("cloud-init")):
        edit.meta.remove(old)
    edit.meta_changed = True
    seed = next((d for d in edit.disks.values() if d.is_seed), None)
    if seed is not None:
        edit.seed = (cloud_init, seed.pool, seed.volume)
        return
    pool = storage.seed_pool(edit.session, edit.after, None)
    edit.devices.append(seed_element(pool, storage.seed_volume_name(edit.name), free_dev(edit.root, "virtio")))
    edit.redefine = True
    edit.seed = (cloud_init, pool, None)


def _add_disk(edit: Edit, change: Change) -> None:
    disk = DiskSpec(**change.after)
    element = edit.disks[disk.name].element if disk.name in edit.disks else None
    if element is not None and edit.disks[disk.name].volume:
        # Our definition names this disk but its volume was never made (see guests.read_guests): make it, define
        # nothing.
        pool, volume = edit.disks[disk.name].pool or "", edit.disks[disk.name].volume or ""
    else:
        pool, volume = disk.pool or "", storage.volume_name(edit.name, disk)
        element = disk_element(disk.name, disk.format, pool, volume, free_dev(edit.root, disk.bus or "virtio"),
                               disk.bus)
        edit.devices.append(element)
        edit.redefine = True
    kept = storage.existing_volume(edit.session, pool, volume)
    # Recorded before the volume is made, so that a run stopped in between leaves a guest that knows it.
    records = [r for r in edit.meta.findall(ns("disk")) if r.get("name") == disk.name]
    if not records or kept is None:
        # A record that exists already was written by the run that defined this disk, before its volume was made:
        # a volume found now is that run's (still creating this guest), so its record stays as written.
        record = records[0] if records else sub(edit.meta, ns("disk"), name=disk.name, source=disk.source)
        record.set("created", "no" if kept is not None else "yes")
        edit.meta_changed = True
    edit.storage.append((f"disk {disk.name!r}", storage.make_volume, (edit.session, edit.name, disk, pool, volume,
                                                                      kept)))
    if edit.hot(change):
        edit.live(f"attach disk {disk.name!r}", edit.dom.attachDeviceFlags, to_xml(element))


def _grow_disk(edit: Edit, change: Change) -> None:
    target = edit.disks[str(change.key)]
    size = int(change.after * 1024**3)
    if edit.running:  # QEMU resizes the image it has open
        edit.then.append((f"grow disk {target.name!r} (live)", storage.grow_running,
                          (edit.session, edit.dom, target, size)))
    else:
        edit.then.append((f"grow disk {target.name!r}", storage.grow_volume, (edit.session, target, size)))


def _move_disk_bus(edit: Edit, change: Change) -> None:
    disk = edit.disks[str(change.key)]
    target_el = disk.element.find("target")
    if not disk.alias.startswith("ua-"):
        # The disk was named by its target, which is about to change: give it an alias to keep its name.
        sub(disk.element, "alias", name=f"ua-{disk.name}")
    if target_el is not None:
        target_el.set("bus", change.after)
        target_el.set("dev", free_dev(edit.root, change.after))
        address = disk.element.find("address")
        if address is not None:
            disk.element.remove(address)
    edit.redefine = True


def _add_nic(edit: Edit, change: Change) -> None:
    element = nic_element(NicSpec(**change.after))
    edit.devices.append(element)
    edit.redefine = True
    if edit.hot(change):
        edit.live("attach NIC", edit.dom.attachDeviceFlags, to_xml(element))


def _interface(edit: Edit, key: Optional[str]) -> Optional[ET.Element]:
    """The <interface> a NIC change names: by MAC, or '#N' (the Nth) for a NIC without one."""
    interfaces = edit.root.findall("./devices/interface")
    if key and key.startswith("#"):
        index = int(key[1:])
        return interfaces[index] if index < len(interfaces) else None
    for iface in interfaces:
        mac_el = iface.find("mac")
        if mac_el is not None and mac_el.get("address", "").lower() == key:
            return iface
    return None


def _move_nic(edit: Edit, change: Change) -> None:
    iface = _interface(edit, change.key)
    if iface is None:
        return
    iface.set("type", "network")
    for source in iface.findall("source"):
        iface.remove(source)
    iface.insert(1, ET.Element("source", {"network": change.after}))
    edit.redefine = True
    if edit.hot(change):
        edit.live("NIC network", edit.dom.updateDeviceFlags, to_xml(iface))


def _set_nic_model(edit: Edit, change: Change) -> None:
    iface = _interface(edit, change.key)
    if iface is None:
        return
    model = iface.find("model")
    if model is None:
        model = sub(iface, "model")
    model.set("type", change.after)
    address = iface.find("address")
    if address is not None:
        iface.remove(address)
    edit.redefine = True


APPLY: Dict[Tuple[str, Optional[str]], Callable[[Edit, Change], None]] = {
    ("vcpus", None): _apply_vcpus,
    ("memory_mib", None): _apply_memory,
    ("firmware", None): _apply_firmware,
    ("boot", None): _apply_boot,
    ("autostart", None): _apply_autostart,
    ("tags", None): _apply_tags,
    ("cloud_init", None): _apply_cloud_init,
    ("disks", None): _add_disk,
    ("disks", "size_gib"): _grow_disk,
    ("disks", "bus"): _move_disk_bus,
    ("nics", None): _add_nic,
    ("nics", "network"): _move_nic,
    ("nics", "model"): _set_nic_model,
}
