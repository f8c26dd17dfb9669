# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Normalised facts about hypervisors and their guests, the same shape for every backend.

Backends fill these dataclasses from libvirt or vSphere; everything above the backends (inventory,
modules) reads only these. Units are fixed: MiB for memory, GiB for storage, MHz for CPU clocks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

POWER_STATES = ("running", "stopped", "paused", "suspended", "unknown")


@dataclasses.dataclass
class Hardware:
    vendor: Optional[str] = None
    model: Optional[str] = None
    serial: Optional[str] = None


@dataclasses.dataclass
class Cpu:
    model: Optional[str] = None
    sockets: Optional[int] = None
    cores: Optional[int] = None
    threads: Optional[int] = None
    mhz: Optional[int] = None


@dataclasses.dataclass
class Storage:
    name: str
    type: Optional[str] = None
    capacity_gib: Optional[float] = None
    free_gib: Optional[float] = None


@dataclasses.dataclass
class GuestCounts:
    total: int = 0
    running: int = 0
    stopped: int = 0


@dataclasses.dataclass
class HypervisorFacts:
    """One hypervisor host. A vCenter endpoint yields one per ESXi host it manages."""

    name: str
    type: str
    api: str
    endpoint: str
    product: Optional[str] = None
    version: Optional[str] = None
    build: Optional[str] = None
    manager: Optional[str] = None
    datacenter: Optional[str] = None
    cluster: Optional[str] = None
    hardware: Hardware = dataclasses.field(default_factory=Hardware)
    cpu: Cpu = dataclasses.field(default_factory=Cpu)
    memory_mib: Optional[int] = None
    memory_free_mib: Optional[int] = None
    storage: List[Storage] = dataclasses.field(default_factory=list)
    networks: List[str] = dataclasses.field(default_factory=list)
    guests: GuestCounts = dataclasses.field(default_factory=GuestCounts)
    connection_state: Optional[str] = None
    # Backend-internal key that guests use to name their host (e.g. a vSphere moref); not exported.
    key: str = ""

    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("key")
        return data


@dataclasses.dataclass
class GuestDisk:
    name: str
    size_gib: Optional[float] = None
    source: Optional[str] = None
    bus: Optional[str] = None


@dataclasses.dataclass
class GuestNic:
    mac: Optional[str] = None
    network: Optional[str] = None
    model: Optional[str] = None


@dataclasses.dataclass
class GuestFacts:
    name: str
    uuid: Optional[str]
    power_state: str
    # Filled by the caller with the inventory name of the hypervisor; backends set host_key.
    hypervisor: Optional[str] = None
    vcpus: Optional[int] = None
    memory_mib: Optional[int] = None
    guest_os: Optional[str] = None
    ip_addresses: List[str] = dataclasses.field(default_factory=list)
    disks: List[GuestDisk] = dataclasses.field(default_factory=list)
    nics: List[GuestNic] = dataclasses.field(default_factory=list)
    tags: Dict[str, str] = dataclasses.field(default_factory=dict)
    template: bool = False
    host_key: str = ""

    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("host_key")
        return data


@dataclasses.dataclass
class Identity:
    """What an endpoint says it is, learned before (or without) logging in."""

    api: str  # vsphere | libvirt | redfish
    type: str  # esxi | vcenter | kvm | qemu | xen | lxc | test | bmc
    product: Optional[str] = None
    version: Optional[str] = None
    build: Optional[str] = None
    vendor: Optional[str] = None
    instance_uuid: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Discovery:
    """Everything one endpoint answered: its identity, the hypervisors behind it, their guests."""

    identity: Identity
    hypervisors: List[HypervisorFacts] = dataclasses.field(default_factory=list)
    guests: List[GuestFacts] = dataclasses.field(default_factory=list)
    # Redfish BMC facts (vendor, product, redfish_version, systems) when the endpoint is a BMC.
    bmc: Optional[Dict[str, Any]] = None
    calls: int = 0


def count_guests(hypervisors: List[HypervisorFacts], guests: List[GuestFacts]) -> None:
    """Set each hypervisor's guest counts from the guest list (templates are not guests)."""
    by_key = {h.key: h for h in hypervisors}
    for host in hypervisors:
        host.guests = GuestCounts()
    for guest in guests:
        owner = by_key.get(guest.host_key)
        if owner is None or guest.template:
            continue
        owner.guests.total += 1
        if guest.power_state == "running":
            owner.guests.running += 1
        elif guest.power_state == "stopped":
            owner.guests.stopped += 1


def mib(value_bytes: Optional[float]) -> Optional[int]:
    return None if value_bytes is None else int(value_bytes // (1024 * 1024))


def gib(value_bytes: Optional[float]) -> Optional[float]:
    return None if value_bytes is None else round(value_bytes / (1024**3), 2)
