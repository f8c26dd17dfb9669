# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Guest convergence on libvirt: the reads the planner needs (capacity, every guest as GuestState, what the host
cannot do), then the mutators: create, update (through apply.APPLY), start, stop, restart, remove. Every function
takes the session and what an earlier read produced as arguments; nothing is left behind for a later call."""

from __future__ import annotations

import dataclasses
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from typing import Any, Callable, Dict, List, Optional, Set, Tuple
from urllib.parse import urlsplit

from ..._changes import GuestPlan
from ..._errors import ConcurrentRunError, ConfigError, EndpointError
from ..._model import OWNER_TAG, CloudInit, DiskSpec, GuestSpec, GuestState, HostCapacity, NicSpec, Placement
from . import storage
from .apply import APPLY, Edit
from .codec import (
    METADATA_NS,
    RESTART_NS,
    domain_xml,
    metadata,
    ns,
    restart_view,
    set_digest,
    stored_mismatch,
    to_xml,
    view,
    volumes_of,
    without_namespace,
)
from .session import Session, libvirt

DomainCaps = Tuple[Set[str], Optional[bool]]  # (disk buses, whether UEFI firmware is there)
_ACTIVE = ("running", "paused", "suspended")


# ------------------------------------------------------------------------------------------ reads
def definitions(session: Session) -> List[Tuple[Any, ET.Element]]:
    """(domain, persistent definition) of every domain: one listing, one XMLDesc per domain."""
    out = []
    for dom in session.call("domains", session.connect().listAllDomains, 0):
        try:
            session.calls += 1
            out.append((dom, ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))))  # noqa: S314
        except libvirt.libvirtError:
            continue  # undefined meanwhile
    return out


def volumes_in_use(session: Session) -> Dict[storage.Where, str]:
    """(pool, volume) -> the guest whose definition names it."""
    return {where: root.findtext("name") or "" for _dom, root in definitions(session) for where in volumes_of(root)}


def capacity(session: Session, placement: Placement) -> HostCapacity:
    conn = session.connect()
    info = session.call("host info", conn.getInfo)
    networks = [n.name() for n in session.call("networks", conn.listAllNetworks, 0)]
    pools = storage.pool_names(session)
    # MACs in use come from read_guests (every domain of the host), which the runner reads anyway.
    return HostCapacity(vcpus=info[2], memory_mib=info[1], networks=sorted(networks), pools=pools,
                        default_pool=storage.default_pool(pools, placement.pool))


def read_guests(session: Session) -> List[GuestState]:
    conn = session.connect()
    flags = libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_BLOCK
    stats = session.call("domain stats", conn.getAllDomainStats, flags, 0)
    autostarting = session.call("domains", conn.listAllDomains, libvirt.VIR_CONNECT_LIST_DOMAINS_AUTOSTART)
    autostart = {d.UUIDString() for d in autostarting}
    volumes: Dict[Tuple[str, str, str], Optional[float]] = {}
    states = []
    for dom, values in stats:
        try:
            session.calls += 1
            xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        except libvirt.libvirtError:
            continue  # undefined meanwhile
        root = ET.fromstring(xml)  # noqa: S314
        state = _state(session, dom, root, values, autostart, volumes)
        if state.power_state in _ACTIVE:
            # What a restart would change: compare the persistent definition with the running one.
            try:
                session.calls += 1
                live = ET.fromstring(dom.XMLDesc(0))  # noqa: S314
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    continue  # undefined meanwhile, as above
                raise session.error("live definition", exc) from None
            wanted, running = restart_view(root), restart_view(live)
            state.pending_restart = sorted(k for k in wanted if wanted[k] != running[k])
        states.append(state)
    return sorted(states, key=lambda s: s.spec.name)


def _state(session: Session, dom: Any, root: ET.Element, stats: Dict[str, Any], autostart: Set[str],
           volumes: Dict[Tuple[str, str, str], Optional[float]]) -> GuestState:
    seen = view(root, stats)
    disks = []
    for disk in seen.disks:
        size = seen.sizes.get(disk.dev)
        if size is None:
            size = storage.volume_gib(session, disk, volumes)
        if size == storage.MISSING:
            if disk.name in seen.recorded:
                # Our guest names a volume it never got (a run stopped between the define and creating it):
                # reported as missing, so the next run creates it for the definition that already names it.
                continue
            size = None
        disks.append(DiskSpec(name=disk.name, size_gib=size, pool=disk.pool, format=disk.format,
                              source=seen.sources.get(disk.name), bus=disk.bus))
    spec = GuestSpec(
        name=seen.name,
        uuid=seen.uuid,
        vcpus=seen.vcpus,
        memory_mib=seen.memory_mib,
        firmware=seen.firmware,
        disks=disks,
        nics=[NicSpec(network=network or "", mac=mac, model=model) for mac, network, model in seen.nics],
        # The digest is recorded only once the seed is written, so a seed cut short is written again.
        cloud_init=CloudInit(stored_digest=seen.digest) if seen.digest else None,
        boot=seen.boot,
        autostart=seen.uuid in autostart,
        tags=seen.tags,
    )
    return GuestState(spec=spec, power_state=seen.power_state, owner=seen.owner,
                      created_disks=[name for name, created in seen.recorded.items() if created],
                      max_vcpus=seen.max_vcpus, max_memory_mib=seen.max_memory_mib,
                      interrupted_restart=seen.restart_marked and seen.power_state == "stopped", ref=dom)


def domain_caps(session: Session) -> DomainCaps:
    """(disk buses, whether UEFI firmware is there) from the host's domain capabilities for the machine type
    guests are created with. Empty/None when the host cannot say (nothing refused)."""
    try:
        session.calls += 1
        caps = ET.fromstring(session.connect().getDomainCapabilities(None, "x86_64", "pc", None, 0))  # noqa: S314
    except (libvirt.libvirtError, ET.ParseError):
        return set(), None
    buses = {v.text or "" for v in caps.findall("./devices/disk/enum[@name='bus']/value")}
    efi = caps.findall("./os/enum[@name='firmware']/value[.='efi']") or caps.findall("./os/loader/value")
    return buses - {"fdc", "usb"}, bool(efi)


def verify_spec(spec: GuestSpec, caps: DomainCaps) -> None:
    for i, disk in enumerate(spec.disks or []):
        # Disk names (reserved ones, device names, what round-trips through an alias) are _model's to check.
        if disk.format is not None and disk.format not in storage.VOL_EXT:
            raise ConfigError(f"guest {spec.name!r} disks[{i}].format", disk.format, "libvirt volumes are qcow2 or raw")
    for i, nic in enumerate(spec.nics or []):
        if nic.model in ("vmxnet3", "pcnet32"):
            raise ConfigError(f"guest {spec.name!r} nics[{i}].model", nic.model,
                              "a VMware NIC model; use virtio, e1000, e1000e or rtl8139 on libvirt")
    buses, uefi = caps
    for i, disk in enumerate(spec.disks or []):
        if disk.bus is not None and buses and disk.bus not in buses:
            raise ConfigError(f"guest {spec.name!r} disks[{i}].bus", disk.bus,
                              f"this libvirt host cannot attach {disk.bus} disks (it offers "
                              f"{', '.join(sorted(buses))})")
    if spec.firmware == "uefi" and uefi is False:
        raise ConfigError(f"guest {spec.name!r} firmware", spec.firmware,
                          "this libvirt host offers no UEFI firmware (no efi loader in its domain capabilities)")


# ------------------------------------------------------------------------------------------ writes, checked
def _put_metadata(session: Session, dom: Any, name: str, meta: Optional[ET.Element], running: bool,
                  uri: str = METADATA_NS) -> None:
    """Write (or, when META is None, remove) one of our metadata elements without re-defining the domain: a
    re-define from a copy would be a chance to lose what that copy lacks."""
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if running else 0)
    text = without_namespace(meta) if meta is not None else None
    key = "vf" if uri == METADATA_NS else "vfr"
    session.call(f"guest {name!r}: metadata", dom.setMetadata, libvirt.VIR_DOMAIN_METADATA_ELEMENT, text,
                 key if text is not None else None, uri, flags)


def _check_stored(session: Session, dom: Any, sent: ET.Element, name: str, undo: Callable[[], None]) -> None:
    """Compare every disk sent with what libvirt stored (codec.stored_mismatch); on a difference UNDO the define
    and say which disk."""
    stored = ET.fromstring(session.call(f"read guest {name!r} back", dom.XMLDesc,  # noqa: S314
                                        libvirt.VIR_DOMAIN_XML_INACTIVE))
    mismatch = stored_mismatch(sent, stored)
    if mismatch is not None:
        undo()
        raise session.fail(f"guest {name!r} disk {mismatch[0]!r}: {mismatch[1]}; the definition was rolled back")


def _domain_type(session: Session, placement: Placement) -> str:
    if placement.domain_type:
        return placement.domain_type
    caps = ET.fromstring(session.call("capabilities", session.connect().getCapabilities))  # noqa: S314
    return "kvm" if caps.findall("./guest/arch/domain[@type='kvm']") else "qemu"


def _define_new(session: Session, spec: GuestSpec, root: ET.Element, user_uuid: bool) -> Any:
    """Define a new domain, never over another: libvirt refuses a second domain of that name under another
    uuid; a uuid the user gave is looked up first (a define under the same name and uuid would replace)."""
    conn = session.connect()
    name = spec.name
    meanwhile = f"guest {name!r} was created meanwhile by another run; nothing was changed (run again)"
    if user_uuid and session.lookup(conn.lookupByUUIDString, spec.uuid) is not None:
        raise session.fail(meanwhile)
    try:
        session.calls += 1
        dom = conn.defineXML(to_xml(root))
    except libvirt.libvirtError as exc:
        if session.lookup(conn.lookupByName, name) is not None:
            raise session.fail(meanwhile) from None
        raise session.error(f"define guest {name!r}", exc) from None
    _check_stored(session, dom, root, name, undo=lambda: storage.undo_create(dom, []))
    return dom


# ------------------------------------------------------------------------------------------ mutators
def create_guest(session: Session, spec: GuestSpec, placement: Placement, owner: str) -> GuestState:
    """Define first, with metadata that lists the volumes it is about to get, then make them: a run stopped
    at any point leaves a guest that knows its volumes (created ones stay removable, missing ones are made
    by the next run, a seed without its recorded digest is written again)."""
    user_uuid = spec.uuid is not None
    spec = dataclasses.replace(spec, uuid=spec.uuid or str(uuidlib.uuid4()))  # the mark must name it
    name = spec.name
    names = {d.name: storage.volume_name(name, d) for d in spec.disks or []}
    kept = {d.name: storage.existing_volume(session, d.pool or "", names[d.name]) for d in spec.disks or []}
    reused = {disk for disk, vol in kept.items() if vol is not None}
    seed = None
    if spec.cloud_init is not None:
        seed = (storage.seed_pool(session, spec, placement.pool), storage.seed_volume_name(name))
    host_cpus = session.call("host info", session.connect().getInfo)[2]
    root = domain_xml(spec, _domain_type(session, placement), owner, reused, names, seed, host_cpus,
                      serial_log=urlsplit(session.endpoint.uri).path.rstrip("/") == "/system")
    dom = _define_new(session, spec, root, user_uuid)
    made: List[Any] = []
    try:
        for disk in spec.disks or []:
            vol, created = storage.make_volume(session, name, disk, disk.pool or "", names[disk.name], kept[disk.name])
            if created:
                made.append(vol)
        if spec.cloud_init is not None and seed is not None:
            made.extend(storage.write_seed(session, spec.cloud_init, *seed))
            meta = metadata(root)
            set_digest(meta, spec.cloud_init.digest())
            _put_metadata(session, dom, name, meta, running=False)
        if spec.autostart:
            session.call("autostart", dom.setAutostart, 1)
    except ConcurrentRunError:
        # Another run has taken this (defined, marked) guest over and is making its storage: undoing would undefine
        # the guest it converges, or delete volumes its definition names. Left as it is, it converges.
        raise
    except Exception:
        storage.undo_create(dom, made)
        raise
    return GuestState(spec=spec, power_state="stopped", owner=owner,
                      created_disks=[d.name for d in spec.disks or [] if d.name not in reused], ref=dom)


def update_guest(session: Session, current: GuestState, plan: GuestPlan) -> None:
    """Each change is applied by its own function (apply.APPLY, keyed by kind and attribute) to the persistent
    definition, read with its secrets (VIR_DOMAIN_XML_SECURE) so a re-define keeps console passwords. Then, in
    this order: define only if something beyond our metadata changed (else setMetadata), check what was stored,
    make the storage it names (undone with the define if that fails, unless another run made that volume
    meanwhile), write the seed and record its digest, then autostart and the running guest's changes."""
    dom = current.ref
    name = current.spec.name
    previous = session.call("read definition", dom.XMLDesc,
                            libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
    edit = Edit(session, current, plan, ET.fromstring(previous))  # noqa: S314
    for change in plan.changes:
        if change.kind in ("power_state", "guest"):
            continue  # power is the caller's (start/stop/restart), never a definition change
        apply = APPLY.get((change.kind, change.attr))
        if apply is None:
            raise session.fail(f"guest {name!r}: cannot apply {change.field} on libvirt")
        apply(edit, change)
    old_meta = ET.fromstring(previous).find(f"./metadata/{ns('guest')}")  # noqa: S314

    def undo() -> None:
        if edit.redefine:
            session.call(f"restore guest {name!r}", session.connect().defineXML, previous)
        else:
            _put_metadata(session, dom, name, old_meta, running=False)

    if edit.redefine:
        session.call(f"define guest {name!r}", session.connect().defineXML, to_xml(edit.root))
        _check_stored(session, dom, edit.root, name, undo)
    elif edit.meta_changed:
        _put_metadata(session, dom, name, edit.meta, running=False)
    made: List[Any] = []
    try:
        for _what, func, args in edit.storage:
            vol, created = func(*args)
            if created:
                made.append(vol)
    except ConcurrentRunError:
        # Another run converging this guest made the volume: its definition names it as ours does, and restoring
        # the definition read before would drop that run's disk. Left as it is, it converges (as in create_guest).
        raise
    except Exception:
        undo()
        storage.undo_create(None, made)
        raise
    if edit.seed is not None:
        cloud_init, pool, volume = edit.seed
        storage.write_seed(session, cloud_init, pool or storage.seed_pool(session, edit.after, None),
                           volume or storage.seed_volume_name(name))
        set_digest(edit.meta, cloud_init.digest())
        _put_metadata(session, dom, name, edit.meta, running=edit.running)
    elif edit.meta_changed and edit.running:
        _put_metadata(session, dom, name, edit.meta, running=True)  # discovery reads the running guest's copy
    for what, func, args in edit.then:
        session.call(f"guest {name!r}: {what}", func, *args)


def _wait_state(session: Session, dom: Any, wanted: Tuple[int, ...], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if session.call("guest state", dom.state)[0] in wanted:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def _clear_restart_mark(session: Session, current: GuestState, running: bool) -> None:
    _put_metadata(session, current.ref, current.spec.name, None, running=running, uri=RESTART_NS)


def start_guest(session: Session, current: GuestState) -> None:
    dom = current.ref
    state = session.call("guest state", dom.state)[0]
    if state == libvirt.VIR_DOMAIN_PAUSED:
        session.call(f"resume guest {current.spec.name!r}", dom.resume)
    elif state == libvirt.VIR_DOMAIN_PMSUSPENDED:
        session.call(f"wake guest {current.spec.name!r}", dom.pMWakeup, 0)
    elif state != libvirt.VIR_DOMAIN_RUNNING:
        session.call(f"start guest {current.spec.name!r}", dom.create)
    if current.interrupted_restart:  # the restart an earlier run began is complete now
        _clear_restart_mark(session, current, running=True)


def _shut_down(session: Session, current: GuestState, timeout: float, force: bool) -> bool:
    """Stop the guest (ACPI, then power off if FORCE); False when it was already off."""
    dom = current.ref
    name = current.spec.name
    off = (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED)
    if session.call("guest state", dom.state)[0] in off:
        return False
    try:
        session.calls += 1
        dom.shutdown()
    except libvirt.libvirtError:
        pass  # e.g. a paused guest cannot take ACPI; the wait below decides
    if _wait_state(session, dom, off, timeout):
        return True
    if not force:
        raise session.fail(f"guest {name!r} did not shut down within {timeout:g}s (ACPI ignored?); set force: true "
                           "to power it off")
    _power_off(session, dom, name)
    return True


def _power_off(session: Session, dom: Any, name: str) -> None:
    """Power the guest off; one that went off meanwhile (it shut down, another run stopped it) is what was asked."""
    try:
        session.calls += 1
        dom.destroy()
    except libvirt.libvirtError as exc:
        if session.call("guest state", dom.state)[0] not in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED):
            raise session.error(f"power off guest {name!r}", exc) from None


def stop_guest(session: Session, current: GuestState, timeout: float, force: bool) -> None:
    """Stop the guest. A stopped guest stays as it is, except that an interrupted restart's mark is cleared:
    the user declared it stopped, so no later run may start it to finish that restart."""
    stopped = _shut_down(session, current, timeout, force)
    if not stopped and current.interrupted_restart:
        _clear_restart_mark(session, current, running=False)


def restart_guest(session: Session, current: GuestState, timeout: float, force: bool) -> None:
    """Mark the guest (its persistent metadata, no re-define) before stopping it and clear the mark once it runs
    again: a run killed, or a start that failed, in between leaves a stopped guest with the mark, which the next
    run reads as interrupted_restart and starts. The plan's offline changes are already in the persistent
    definition (update_guest), so there is nothing to apply in between."""
    mark = ET.Element("restart", {"by": OWNER_TAG})
    _put_metadata(session, current.ref, current.spec.name, mark, running=False, uri=RESTART_NS)
    try:
        _shut_down(session, current, timeout, force)
    except EndpointError:
        # Still running: no restart is under way, and a mark left behind would make a later run start the guest
        # after someone stopped it on purpose.
        _clear_restart_mark(session, current, running=False)
        raise
    start_guest(session, dataclasses.replace(current, interrupted_restart=True))


def remove_guest(session: Session, current: GuestState, remove_storage: bool) -> None:
    try:
        _remove(session, current, remove_storage)
    except EndpointError:
        # Another run removing the same guest at the same time: absent is what both were asked for. Only when
        # libvirt says so (no such domain), never because it cannot be asked.
        try:
            session.connect().lookupByUUIDString(current.spec.uuid)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return
        raise


def _remove(session: Session, current: GuestState, remove_storage: bool) -> None:
    dom = current.ref
    name = current.spec.name
    root = ET.fromstring(session.call("read definition", dom.XMLDesc, libvirt.VIR_DOMAIN_XML_INACTIVE))  # noqa: S314
    if session.call("guest state", dom.state)[0] not in (libvirt.VIR_DOMAIN_SHUTOFF,):
        _power_off(session, dom, name)
    flags = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
             | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    # Storage first, the definition last: a run stopped in between leaves a guest that still lists what it
    # created, so the next removal deletes the rest (missing volumes are skipped) and then undefines it.
    storage.delete_disks(session, name, root, current.created_disks, remove_storage)
    session.call(f"undefine guest {name!r}", dom.undefineFlags, flags)
