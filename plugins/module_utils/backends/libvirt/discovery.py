# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""What a libvirt host is and has: identity, host facts (capabilities, hardware, storage pools, networks and
their DHCP leases) and every guest as GuestFacts, read in bulk (getAllDomainStats, one XMLDesc per domain,
leases per network)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any, Dict, List, Optional, Tuple

from ..._model import (
    Cpu,
    Discovery,
    GuestDisk,
    GuestFacts,
    GuestNic,
    Hardware,
    HypervisorFacts,
    Identity,
    Storage,
    count_guests,
    gib,
    mib,
)
from .codec import view
from .session import Session, libvirt


def _version(number: int) -> str:
    """libvirt encodes versions as major * 1,000,000 + minor * 1,000 + micro."""
    return f"{number // 1000000}.{(number // 1000) % 1000}.{number % 1000}"


def capabilities(session: Session) -> ET.Element:
    session.calls += 1
    return ET.fromstring(session.connect().getCapabilities())  # noqa: S314


def hv_type(driver: str, caps: ET.Element) -> str:
    if driver.upper() == "QEMU":
        kvm = caps.findall("./guest/arch/domain[@type='kvm']")
        return "kvm" if kvm else "qemu"
    return driver.lower()


def identify(session: Session) -> Identity:
    conn = session.connect()
    try:
        driver = conn.getType()
        hv_version = _version(conn.getVersion())
        caps = capabilities(session)
    except libvirt.libvirtError as exc:
        raise session.error("libvirt", exc) from None
    session.calls += 2
    return Identity(api="libvirt", type=hv_type(driver, caps), product=driver, version=hv_version, build=None,
                    vendor=None)


def _hardware(session: Session) -> Hardware:
    try:
        session.calls += 1
        root = ET.fromstring(session.connect().getSysinfo(0))  # noqa: S314
    except (libvirt.libvirtError, ET.ParseError):
        return Hardware()

    def entry(name: str) -> Optional[str]:
        value = root.findtext(f"./system/entry[@name='{name}']")
        return value.strip() if value and value.strip() else None

    return Hardware(vendor=entry("manufacturer"), model=entry("product"), serial=entry("serial"))


def _storage(session: Session) -> List[Storage]:
    out = []
    session.calls += 1
    for pool in session.connect().listAllStoragePools(0):
        session.calls += 2
        state, capacity, _alloc, available = pool.info()
        pool_type = ET.fromstring(pool.XMLDesc(0)).get("type")  # noqa: S314
        active = state == libvirt.VIR_STORAGE_POOL_RUNNING
        out.append(Storage(name=pool.name(), type=pool_type, capacity_gib=gib(capacity) if active else None,
                           free_gib=gib(available) if active else None))
    return sorted(out, key=lambda s: s.name)


def _networks(session: Session) -> Tuple[List[str], Dict[str, List[str]]]:
    """Network names, and MAC -> addresses from the DHCP leases of active networks (one call per network)."""
    names: List[str] = []
    leases: Dict[str, List[str]] = {}
    session.calls += 1
    for net in session.connect().listAllNetworks(0):
        names.append(net.name())
        if not net.isActive():
            continue
        try:
            session.calls += 1
            for lease in net.DHCPLeases():
                leases.setdefault(lease["mac"].lower(), []).append(lease["ipaddr"])
        except libvirt.libvirtError:
            continue
    return sorted(names), leases


def guest_facts(xml: str, stats: Dict[str, Any], host_key: str, leases: Dict[str, List[str]]) -> GuestFacts:
    # The same parse as convergence state (guests.read_guests): disks named, sized and sourced the same way.
    dom = view(ET.fromstring(xml), stats)  # noqa: S314
    disks = [GuestDisk(name=d.name or "?", size_gib=dom.sizes.get(d.dev), source=dom.sources.get(d.name), bus=d.bus)
             for d in dom.disks]
    nics, addresses = [], []
    for mac, network, model in dom.nics:
        nics.append(GuestNic(mac=mac, network=network, model=model))
        if mac:
            addresses.extend(leases.get(mac, []))
    return GuestFacts(
        name=dom.name,
        uuid=dom.uuid,
        power_state=dom.power_state,
        vcpus=dom.vcpus,
        memory_mib=dom.memory_mib,
        guest_os=dom.guest_os,
        ip_addresses=sorted(set(addresses)),
        disks=disks,
        nics=nics,
        tags=dom.tags,
        owner=dom.owner,
        host_key=host_key,
    )


def guests(session: Session, host_key: str, leases: Dict[str, List[str]]) -> List[GuestFacts]:
    """Every domain as GuestFacts: one getAllDomainStats, one XMLDesc per domain."""
    session.calls += 1
    stats = session.connect().getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_BLOCK, 0)
    out = []
    for dom, values in stats:
        session.calls += 1
        try:
            xml = dom.XMLDesc(0)
        except libvirt.libvirtError:
            continue  # undefined between the two calls
        out.append(guest_facts(xml, values, host_key, leases))
    return sorted(out, key=lambda g: g.name)


def discover(session: Session, with_guests: bool = True) -> Discovery:
    conn = session.connect()
    endpoint = session.endpoint
    try:
        caps = capabilities(session)
        driver = conn.getType()
        hv_version = _version(conn.getVersion())
        lib_version = _version(conn.getLibVersion())
        hostname = conn.getHostname()
        model, memory_mib, _cpus, mhz, nodes, sockets, cores, threads = conn.getInfo()
        free = conn.getFreeMemory()
        session.calls += 6
        kind = hv_type(driver, caps)
        cpu_model = caps.findtext("./host/cpu/model")
        networks, leases = _networks(session)
        host = HypervisorFacts(
            name=endpoint.host or hostname,
            type=kind,
            api="libvirt",
            endpoint=endpoint.uri,
            product=f"{driver} (libvirt {lib_version})",
            version=hv_version,
            build=lib_version,
            hardware=_hardware(session),
            cpu=Cpu(model=cpu_model or model, sockets=nodes * sockets, cores=nodes * sockets * cores,
                    threads=nodes * sockets * cores * threads, mhz=mhz or None),
            memory_mib=memory_mib,
            memory_free_mib=mib(free),
            storage=_storage(session),
            networks=networks,
            connection_state="connected",
            key=hostname,
        )
        guest_list = guests(session, host.key, leases) if with_guests else []
    except libvirt.libvirtError as exc:
        raise session.error("libvirt", exc) from None
    if with_guests:
        count_guests([host], guest_list)
    else:
        session.calls += 1
        host.guests.total = conn.numOfDomains() + conn.numOfDefinedDomains()
        host.guests.running = conn.numOfDomains()
        host.guests.stopped = conn.numOfDefinedDomains()
    identity = Identity(api="libvirt", type=kind, product=driver, version=hv_version)
    return Discovery(identity=identity, hypervisors=[host], guests=guest_list, calls=session.calls)
