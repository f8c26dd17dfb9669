# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Storage volumes: the names this collection gives them, creating (create-exclusive), growing, looking up,
the seed ISO's volume, volumes kept from an earlier guest of the same name, and deleting exactly what was
created."""

from __future__ import annotations

import functools
import time
import xml.etree.ElementTree as ET
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..._errors import ConcurrentRunError, ConfigError, EndpointError
from ..._model import CloudInit, DiskSpec, GuestSpec, gib
from .codec import Disk, build_seed_iso, sub, to_xml
from .session import Session, libvirt

VOL_EXT = {"qcow2": "qcow2", "raw": "img"}
MISSING = -1.0  # a volume lookup that found no such volume (not: a volume that could not be read)
Where = Tuple[str, str]  # (pool, volume)


def volume_name(guest: str, disk: DiskSpec) -> str:
    # '+' cannot occur in guest or disk names, so no two (guest, disk) pairs share a volume name.
    return f"{guest}+{disk.name}.{VOL_EXT.get(disk.format or 'qcow2', 'img')}"


def seed_volume_name(guest: str) -> str:
    return f"{guest}+cidata.iso"


def pool_names(session: Session) -> List[str]:
    return sorted(p.name() for p in session.call("storage pools", session.connect().listAllStoragePools, 0))


def default_pool(pools: List[str], chosen: Optional[str]) -> Optional[str]:
    """The pool a disk without one goes to: CHOSEN (the placement's), else 'default', else the first."""
    return chosen or ("default" if "default" in pools else (sorted(pools)[0] if pools else None))


def seed_pool(session: Session, spec: GuestSpec, chosen: Optional[str]) -> str:
    """Where SPEC's cloud-init seed goes: the pool of its first disk that names one, else the default pool."""
    for disk in spec.disks or []:
        if disk.pool:
            return disk.pool
    pool = default_pool(pool_names(session), chosen)
    if not pool:
        raise session.fail(f"guest {spec.name!r}: no storage pool for the cloud-init seed")
    return pool


def _pool(session: Session, name: str) -> Any:
    return session.call(f"storage pool {name!r}", session.connect().storagePoolLookupByName, name)


def disk_volume(session: Session, disk: Disk) -> Any:
    """The storage volume behind a disk (by pool and volume name, else by path); raises libvirtError."""
    conn = session.connect()
    session.calls += 2
    if disk.pool and disk.volume:
        return conn.storagePoolLookupByName(disk.pool).storageVolLookupByName(disk.volume)
    return conn.storageVolLookupByPath(disk.path)


def volume_gib(session: Session, disk: Disk, cache: Dict[Tuple[str, str, str], Optional[float]]) -> Optional[float]:
    """The volume's size, None when it cannot be read, MISSING when its pool says it has no such volume."""
    if disk.where not in cache:
        try:
            cache[disk.where] = gib(disk_volume(session, disk).info()[1])
        except libvirt.libvirtError as exc:
            missing = bool(disk.pool and disk.volume) and exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL
            cache[disk.where] = MISSING if missing else None
    return cache[disk.where]


def existing_volume(session: Session, pool_name: str, volume: str) -> Optional[Any]:
    pool = _pool(session, pool_name)
    try:
        session.calls += 1
        return pool.storageVolLookupByName(volume)
    except libvirt.libvirtError:
        return None


def _volume_xml(name: str, size: int, fmt: str) -> str:
    vol_xml = ET.Element("volume")
    sub(vol_xml, "name", name)
    sub(vol_xml, "capacity", str(size), unit="bytes")
    sub(sub(vol_xml, "target"), "format", type=fmt)
    return to_xml(vol_xml)


def make_volume(session: Session, guest: str, disk: DiskSpec, pool_name: str, volume: str,
                kept: Optional[Any]) -> Tuple[Any, bool]:
    """Grow KEPT (a volume kept from an earlier guest of this name) to the disk's size, or create VOLUME
    (cloned from DISK.source when set). Returns (volume, whether this call created it). Create-exclusive:
    a volume of that name that appeared meanwhile was made by another run; it is an error, not ours."""
    pool = _pool(session, pool_name)
    size = int((disk.size_gib or 0) * 1024**3)
    if kept is not None:
        grow_to(session, kept, f"volume {volume!r}", size)
        return kept, False
    vol_xml = _volume_xml(volume, size, disk.format or "qcow2")
    source = None
    if disk.source:
        conn = session.connect()
        source = (session.call(f"disk source {disk.source!r}", conn.storageVolLookupByPath, disk.source)
                  if disk.source.startswith("/") else
                  session.call(f"disk source {disk.source!r}", pool.storageVolLookupByName, disk.source))
    try:
        session.calls += 1
        vol = pool.createXMLFrom(vol_xml, source, 0) if source is not None else pool.createXML(vol_xml, 0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_STORAGE_VOL_EXIST:
            raise ConcurrentRunError(session.endpoint.label, f"guest {guest!r} disk {disk.name!r}: volume {volume!r} "
                                     "was created meanwhile by another run") from None
        raise session.error(f"clone of {disk.source!r}" if source is not None else f"volume {volume!r}",
                            exc) from None
    if source is not None and size:
        try:
            grow_to(session, vol, f"volume {volume!r}", size)
        except EndpointError:
            undo_create(None, [vol])  # the clone this call made, not half-made for the caller to lose track of
            raise
    return vol, True


BUSY_WAIT = 10.0  # seconds a volume another run is still creating or writing is waited for


def settled(session: Session, vol: Any, what: str, func: Callable[..., Any], *args: Any) -> Any:
    """FUNC(*ARGS) on VOL, a volume that another run converging the same guest may still be creating or writing:
    libvirt refuses with VIR_ERR_OPERATION_INVALID ("still being allocated", "still in use") until it is done, so
    that is retried for up to BUSY_WAIT seconds while VOL's pool is active (the other thing that code says). Any
    other error, or that one for longer, is one line."""
    deadline = time.monotonic() + BUSY_WAIT
    while True:
        session.calls += 1
        try:
            return func(*args)
        except libvirt.libvirtError as exc:
            if (exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID or time.monotonic() >= deadline
                    or not _pool_active(vol)):
                raise session.error(what, exc) from None
        time.sleep(0.1)


def _pool_active(vol: Any) -> bool:
    try:
        return bool(vol.storagePoolLookupByVolume().isActive())
    except libvirt.libvirtError:
        return False


def grow_to(session: Session, vol: Any, what: str, size: int) -> None:
    """Resize VOL to SIZE bytes unless it is that big already. A grow never shrinks: the size was read before the
    plan, and a volume grown meanwhile (another run converging the same guest, or a person) is left as it is, also
    when it grows between this look and the resize (libvirt refuses a volume a smaller size without its SHRINK
    flag)."""
    if settled(session, vol, what, lambda: vol.info()[1]) >= size:
        return
    try:
        settled(session, vol, what, vol.resize, size, 0)
    except EndpointError:
        if settled(session, vol, what, lambda: vol.info()[1]) >= size:
            return
        raise


def grow_volume(session: Session, disk: Disk, size: int) -> None:
    vol = session.call(f"volume of disk {disk.name!r}", disk_volume, session, disk)
    grow_to(session, vol, f"grow disk {disk.name!r}", size)


def grow_running(session: Session, dom: Any, disk: Disk, size: int) -> None:
    """Grow the image a running guest has open. QEMU resizes it, and a blockResize to a smaller size shrinks it, so
    its capacity is read first (blockInfo) and a disk that big already is left as it is. That narrows, but cannot
    close, the window for another run's grow to land between the look and the resize: libvirt has no grow-only
    resize of a running image. A guest stopped meanwhile has its volume grown instead."""
    what = f"grow disk {disk.name!r} (live)"
    try:
        session.calls += 1
        if dom.blockInfo(disk.dev, 0)[0] >= size:
            return
        session.calls += 1
        dom.blockResize(disk.dev, size, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
    except libvirt.libvirtError as exc:
        if session.call("guest state", dom.isActive):
            raise session.error(what, exc) from None
        grow_volume(session, disk, size)


def write_seed(session: Session, cloud_init: CloudInit, pool_name: str, name: str) -> List[Any]:
    """Write the seed ISO to POOL_NAME/NAME; returns the volume when this call created it. A volume only
    grows: ISO readers ignore bytes after the image."""
    data = build_seed_iso(cloud_init)
    pool = _pool(session, pool_name)
    created = []
    vol = session.lookup(pool.storageVolLookupByName, name)
    if vol is None:
        try:
            session.calls += 1
            created.append(pool.createXML(_volume_xml(name, len(data), "raw"), 0))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_STORAGE_VOL_EXIST:
                raise session.error("seed volume", exc) from None
            # Another run converging this guest made it meanwhile: the seed is generated from the same options,
            # so both write the same bytes; the volume is that run's, never ours to delete on an undo.
        vol = created[0] if created else session.call("seed volume", pool.storageVolLookupByName, name)
    if not created:
        grow_to(session, vol, "seed resize", len(data))
    stream = session.connect().newStream(0)
    settled(session, vol, "seed upload", vol.upload, stream, 0, len(data), 0)
    session.call("seed upload", stream.send, data)
    session.call("seed upload", stream.finish)
    return created


def leftover_disks(session: Session, specs: List[GuestSpec], pool: Optional[str],
                   holders: Callable[[], Dict[Where, str]]) -> Dict[Tuple[str, str], float]:
    """(guest, disk) -> GiB of volumes named like a disk of these guests already in their pools (POOL for a disk
    that names none): one listing per pool. HOLDERS reads which guest's definition uses which volume; it is
    called only when such a volume exists, and a volume another guest uses is refused."""
    wanted: Dict[Where, Tuple[str, str]] = {}
    for spec in specs:
        for disk in spec.disks or []:
            where = disk.pool or pool
            if where:
                full = DiskSpec(name=disk.name, format=disk.format or "qcow2")
                wanted[(where, volume_name(spec.name, full))] = (spec.name, disk.name)
    found: Dict[Tuple[str, str], float] = {}
    in_use: Optional[Dict[Where, str]] = None
    for pool_name in sorted({where for where, _vol in wanted}):
        try:
            lookup = session.connect().storagePoolLookupByName(pool_name)
            names = set(lookup.listVolumes())
            session.calls += 2
        except libvirt.libvirtError:
            continue  # an unknown pool is the planner's to report
        for (where, volume), key in wanted.items():
            if where != pool_name or volume not in names:
                continue
            if in_use is None:
                in_use = holders()
            holder = in_use.get((where, volume))
            if holder is not None and holder != key[0]:
                problem = f"its volume {volume!r} in pool {where!r} is in use by guest {holder!r}"
                raise ConfigError(f"guest {key[0]!r} disks", key[1], problem)
            if holder is None:
                vol = session.call("volume", lookup.storageVolLookupByName, volume)
                found[key] = gib(session.call("volume info", vol.info)[1]) or 0.0
    return found


def undo_create(dom: Optional[Any], made: List[Any]) -> None:
    """Remove what one call made: the domain it defined (when DOM) and the volumes it created (never a kept
    one, nor one another run made). Best effort: the error that got us here is the one to report."""
    steps: List[Callable[[], Any]] = [functools.partial(vol.delete, 0) for vol in made]
    if dom is not None:
        steps.insert(0, functools.partial(dom.undefineFlags, libvirt.VIR_DOMAIN_UNDEFINE_NVRAM))
    for step in steps:
        try:
            step()
        except libvirt.libvirtError:
            pass


def delete_disks(session: Session, guest: str, root: ET.Element, created: List[str], remove_storage: bool) -> None:
    """On removal: delete the seed (generated from the guest's options, never user data) and, with
    REMOVE_STORAGE, the volumes of the disks in CREATED (those this collection made), nothing else. Each only
    while the disk still points at the volume this collection made for it (GUEST+DISK): a disk re-pointed
    elsewhere by hand, or a clone's disk that shares another guest's volume, is never followed."""
    for element in root.findall("./devices/disk"):
        disk = Disk(element)
        if disk.is_seed:
            ours = disk.volume == seed_volume_name(guest)
        else:
            ours = remove_storage and disk.name in created and disk.volume == volume_name(
                guest, DiskSpec(name=disk.name, format=disk.format if disk.format in VOL_EXT else "raw"))
        if not ours:
            continue
        try:
            disk_volume(session, disk).delete(0)
        except libvirt.libvirtError:
            continue  # already gone
