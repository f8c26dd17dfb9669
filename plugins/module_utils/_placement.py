# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Placement: a fleet's guests onto the discovered hypervisors, by capacity and constraints. Pure.

The shape follows OpenStack Nova's scheduler: filters (type, pin, labels, networks, storage, memory, vCPU with an
allocation ratio, anti-affinity) and then one weigher (``spread``: most free memory left; ``pack``: least).
Rules that keep a fleet safe come first:

- a guest that exists on a reachable hypervisor stays there (it is never moved);
- a guest that does not exist anywhere reachable, while a hypervisor that could hold it is unreachable, is not
  placed: it may be running there, and creating it elsewhere would make a second one;
- a guest placed on a hypervisor outside the limit is pending, not created elsewhere.

Same input, same output: hypervisors and guests are taken in a fixed order, ties broken by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from ._fleet import DEFAULT_CPU_RATIO, DEFAULT_MEMORY_RATIO, Fleet, FleetGuest

# libvirt's own default pool name: where nothing maps a guest's storage and the host has one, it is used.
LIBVIRT_DEFAULT_POOL = "default"


def hypervisor_type(discovered: Optional[str]) -> Optional[str]:
    """The fleet's two kinds: ESXi (standalone or under a vCenter) and KVM (libvirt with kvm or qemu); None for
    anything else (xen, lxc, libvirt's test driver), which is never given a new guest."""
    return {"esxi": "esxi", "kvm": "kvm", "qemu": "kvm"}.get(str(discovered))


@dataclasses.dataclass
class Existing:
    name: str
    vcpus: int
    memory_mib: int
    owner: Optional[str]


@dataclasses.dataclass
class Host:
    """One hypervisor as placement sees it, with the fleet's settings for it applied."""

    name: str
    type: Optional[str]
    uri: str
    memory_mib: int
    threads: int
    storage_free: Dict[str, float]
    networks: Set[str]
    # Where a new guest goes on this endpoint (the guest modules' placement options).
    placement: Dict[str, Any]
    labels: Set[str] = dataclasses.field(default_factory=set)
    cpu_ratio: float = DEFAULT_CPU_RATIO
    memory_ratio: float = DEFAULT_MEMORY_RATIO
    reserved_memory_mib: int = 0
    network_map: Dict[str, str] = dataclasses.field(default_factory=dict)
    storage_map: Dict[str, str] = dataclasses.field(default_factory=dict)
    default_storage: Optional[str] = None
    existing: List[Existing] = dataclasses.field(default_factory=list)
    in_limit: bool = True
    # Why no new guest goes here (a kind the fleet does not place on, a host its vCenter lost); existing guests
    # on it stay all the same.
    unusable: Optional[str] = None
    # Guests the hypervisor reported (even where the inventory was built without guest facts).
    reported_guests: int = 0
    datacenter: Optional[str] = None
    # Totals placement keeps while it goes. STORAGE_USED is one dict shared by every host: a vSphere datastore is
    # seen by every host of its vCenter that mounts it, and what one host's new guests take, the others lose.
    vcpus_used: int = 0
    memory_used: int = 0
    storage_used: Dict[Tuple[str, ...], float] = dataclasses.field(default_factory=dict)
    placed: List[str] = dataclasses.field(default_factory=list)

    def storage_id(self, pool: str) -> Tuple[str, ...]:
        """A pool's identity: on vSphere a datastore name is unique per datacenter of one endpoint."""
        return (self.uri, self.datacenter or "", pool) if self.type == "esxi" else (self.uri, self.name, pool)

    def planned_gib(self, pool: str) -> float:
        return self.storage_used.get(self.storage_id(pool), 0.0)

    @property
    def memory_capacity(self) -> float:
        return max(0.0, (self.memory_mib - self.reserved_memory_mib) * self.memory_ratio)

    @property
    def vcpu_capacity(self) -> float:
        return self.threads * self.cpu_ratio

    def memory_left(self) -> float:
        return self.memory_capacity - self.memory_used


def _get(data: Any, key: str, default: Any = None) -> Any:
    try:
        value = data.get(key, default)
    except AttributeError:
        return default
    return default if value is None else value


def _default_storage(hv_type: Optional[str], free: Dict[str, float]) -> Optional[str]:
    if not free:
        return None
    if hv_type == "kvm" and LIBVIRT_DEFAULT_POOL in free:
        return LIBVIRT_DEFAULT_POOL
    return sorted(free, key=lambda name: (-free[name], name))[0]


def build_hosts(fleet: Fleet, hypervisors: Sequence[Dict[str, Any]], guests: Sequence[Dict[str, Any]],
                limit: Optional[Sequence[str]]) -> List[Host]:
    """HYPERVISORS (the inventory's ``virtfleet_hypervisor`` facts, each with ``address``: its ``ansible_host``)
    and GUESTS (``virtfleet_guest`` facts, with ``owner``) as placement hosts, the fleet's rules applied in order
    (later rules override earlier ones; labels add up)."""
    limit_set = None if limit is None else {str(n) for n in limit}
    hosts: Dict[str, Host] = {}
    shared: Dict[Tuple[str, ...], float] = {}
    for hv in sorted(hypervisors, key=lambda h: str(_get(h, "name", ""))):
        name = str(_get(hv, "name", ""))
        if not name or name in hosts:
            continue
        kind = hypervisor_type(_get(hv, "type"))
        cluster = _get(hv, "cluster")
        free = {str(_get(s, "name")): float(_get(s, "free_gib", 0.0)) for s in _get(hv, "storage", [])
                if _get(s, "name")}
        placement: Dict[str, Any] = {}
        if _get(hv, "api") == "vsphere":
            placement["datacenter"] = _get(hv, "datacenter")
            if _get(hv, "manager"):
                # Under a vCenter: the host by its vCenter name (the inventory name may carry a clash suffix).
                placement["esxi_host"] = str(_get(hv, "address", name))
                if cluster:
                    placement["cluster"] = cluster
        host = Host(name=name, type=kind, uri=str(_get(hv, "endpoint", "")),
                    memory_mib=int(_get(hv, "memory_mib", 0)), threads=int(_get(_get(hv, "cpu", {}), "threads", 0)),
                    storage_free=free, networks={str(n) for n in _get(hv, "networks", [])}, placement=placement,
                    in_limit=limit_set is None or name in limit_set, datacenter=_get(hv, "datacenter"),
                    reported_guests=int(_get(_get(hv, "guests", {}), "total", 0)), storage_used=shared)
        state = _get(hv, "connection_state")
        if kind is None:
            host.unusable = f"type {_get(hv, 'type')!r} is not one the fleet places guests on"
        elif state not in (None, "connected"):
            host.unusable = f"connection state {state!r}"
        for rule in fleet.hypervisors:
            if not rule.matches(name, kind, cluster):
                continue
            settings = rule.settings
            host.labels |= set(settings.get("labels") or [])
            for attr in ("cpu_ratio", "memory_ratio", "reserved_memory_mib"):
                if attr in settings:
                    setattr(host, attr, settings[attr])
            host.network_map.update(settings.get("networks") or {})
            host.storage_map.update(settings.get("storage") or {})
            for option in ("domain_type", "folder", "resource_pool"):
                if option in settings:
                    host.placement[option] = settings[option]
        host.default_storage = _default_storage(kind, free)
        hosts[name] = host
    for guest in sorted(guests, key=lambda g: (str(_get(g, "hypervisor", "")), str(_get(g, "name", "")))):
        host_name = _get(guest, "hypervisor")
        if host_name in hosts:
            existing = Existing(name=str(_get(guest, "name")), vcpus=int(_get(guest, "vcpus", 0)),
                                memory_mib=int(_get(guest, "memory_mib", 0)), owner=_get(guest, "owner"))
            hosts[host_name].existing.append(existing)
            hosts[host_name].vcpus_used += existing.vcpus
            hosts[host_name].memory_used += existing.memory_mib
    return list(hosts.values())


@dataclasses.dataclass
class Placed:
    guest: FleetGuest
    host: Host
    existing: bool
    # The guest as the guest modules on HOST are given it: logical networks and storage made real.
    options: Dict[str, Any]


@dataclasses.dataclass
class PlacementResult:
    placed: List[Placed]
    unplaceable: List[Dict[str, str]]
    unreachable: List[Dict[str, Any]]
    pending: List[Dict[str, str]]
    notes: List[Dict[str, str]]
    hosts: List[Host]


def _real_network(host: Host, logical: str) -> Optional[str]:
    real = host.network_map.get(logical, logical if not host.network_map or logical in host.networks else None)
    return real if real in host.networks else None


def _real_storage(host: Host, logical: Optional[str]) -> Optional[str]:
    if logical is None:
        return host.default_storage
    real = host.storage_map.get(logical, logical)
    return real if real in host.storage_free else None


def _storage_need(guest: FleetGuest, host: Host) -> Tuple[Optional[str], Dict[str, float]]:
    """(why not, GiB per real pool) for the disks GUEST would create on HOST."""
    need: Dict[str, float] = {}
    for disk in guest.spec.disks or []:
        pool = _real_storage(host, disk.pool)
        if pool is None:
            return (f"storage {disk.pool!r} not mapped" if disk.pool else "no storage"), {}
        need[pool] = need.get(pool, 0.0) + float(disk.size_gib or 0.0)
    return None, need


def _why_not(guest: FleetGuest, host: Host, groups: Dict[str, Set[str]]) -> Optional[str]:
    """The first filter HOST fails for a new GUEST (None: it fits)."""
    if host.unusable:
        return host.unusable
    if guest.hypervisor_type and guest.hypervisor_type != host.type:
        return f"type is not {guest.hypervisor_type}"
    if guest.pin and guest.pin != host.name:
        return "not the pinned hypervisor"
    missing = [label for label in guest.labels if label not in host.labels]
    if missing:
        return f"label {missing[0]!r} missing"
    for nic in guest.spec.nics or []:
        if _real_network(host, nic.network) is None:
            return f"network {nic.network!r} not mapped"
    why, need = _storage_need(guest, host)
    if why:
        return why
    for pool, gib in need.items():
        if host.planned_gib(pool) + gib > host.storage_free.get(pool, 0.0):
            return f"storage {pool!r} full"
    if host.memory_used + guest.memory_mib > host.memory_capacity:
        return "memory full"
    if host.vcpus_used + guest.vcpus > host.vcpu_capacity:
        return "vCPUs full"
    if guest.anti_affinity and host.name in groups.get(guest.anti_affinity, set()):
        return f"anti_affinity {guest.anti_affinity!r} already there"
    return None


# Marks a guest whose cloud_init.user_data stays in the fleet file: placement output (facts, events, plans) never
# holds it; fleet_guests reads it from the fleet file just before converging.
USER_DATA_MARK = "fleet_user_data"


def _options_for(guest: FleetGuest, host: Host, existing: bool) -> Dict[str, Any]:
    options = dict(guest.options)
    cloud_init = options.get("cloud_init")
    if isinstance(cloud_init, dict) and cloud_init.get("user_data") is not None:
        options["cloud_init"] = {k: v for k, v in cloud_init.items() if k != "user_data"}
        options[USER_DATA_MARK] = True
    if options.get("nics"):
        options["nics"] = [dict(nic, network=_real_network(host, nic["network"]) or nic["network"])
                           for nic in options["nics"]]
    if options.get("disks"):
        disks = []
        for disk in options["disks"]:
            disk = {k: v for k, v in disk.items() if k != "datastore"}
            if disk.get("pool") is not None:
                disk["pool"] = _real_storage(host, disk["pool"]) or disk["pool"]
            elif not existing:
                disk["pool"] = host.default_storage  # the plan names the pool a new disk lands in
            disks.append(disk)
        options["disks"] = disks
    return options


def _maybe_on(guest: FleetGuest, lost: Sequence[Dict[str, Any]]) -> List[str]:
    """The unreachable hypervisors GUEST may be running on. Its pin and labels do not narrow this: a guest is never
    moved to follow its pin, so it may run anywhere of its type."""
    return [u["name"] for u in lost if not guest.hypervisor_type or u["type"] in (None, guest.hypervisor_type)]


def _count_growth(guest: FleetGuest, current: Existing, host: Host, notes: List[Dict[str, str]]) -> None:
    """An existing guest declared larger than it runs: the growth counts against its host before any new guest
    is placed there, and a host it would overfill is named in the notes (the update itself is not held back)."""
    if guest.spec.state == "absent":
        return
    if guest.spec.memory_mib and guest.spec.memory_mib > current.memory_mib:
        host.memory_used += guest.spec.memory_mib - current.memory_mib
    if guest.spec.vcpus and guest.spec.vcpus > current.vcpus:
        host.vcpus_used += guest.spec.vcpus - current.vcpus
    if host.memory_used > host.memory_capacity or host.vcpus_used > host.vcpu_capacity:
        notes.append({"name": guest.name, "note": f"after its update {host.name} is over its memory or vCPU "
                                                  "capacity; no new guest is placed there"})


def _summary(reasons: Dict[str, str]) -> str:
    if not reasons:
        return "no hypervisor in the fleet"
    counts: Dict[str, List[str]] = {}
    for host, why in sorted(reasons.items()):
        counts.setdefault(why, []).append(host)
    parts = [f"{why} on {hosts[0]}" if len(hosts) == 1 else f"{why} on {len(hosts)} ({', '.join(hosts[:3])}"
             f"{', ...' if len(hosts) > 3 else ''})" for why, hosts in sorted(counts.items())]
    return "fits nowhere: " + "; ".join(parts)


def place(fleet: Fleet, hosts: List[Host], unreachable: Sequence[Dict[str, Any]]) -> PlacementResult:
    """Every fleet guest on a host, or in unplaceable/unreachable/pending with its reason."""
    by_name = {h.name: h for h in hosts}
    where: Dict[str, List[Host]] = {}
    for host in hosts:
        for seen in host.existing:
            where.setdefault(seen.name, []).append(host)
    lost = [{"name": str(_get(u, "name")), "type": _get(u, "type")} for u in unreachable]
    lost_names = {u["name"] for u in lost}
    unreachable_guests: Dict[str, List[str]] = {u["name"]: [] for u in lost}
    groups: Dict[str, Set[str]] = {}
    placed: List[Placed] = []
    unplaceable: List[Dict[str, str]] = []
    pending: List[Dict[str, str]] = []
    notes: List[Dict[str, str]] = []
    new: List[FleetGuest] = []

    # 1. Guests that exist stay where they are; their anti-affinity groups hold those hosts.
    for guest in sorted(fleet.guests, key=lambda g: g.name):
        found = where.get(guest.name, [])
        if guest.pin and len(found) > 1:
            found = [h for h in found if h.name == guest.pin] or found
        if len(found) > 1:
            unplaceable.append({"name": guest.name, "reason": "exists on several hypervisors ("
                                + ", ".join(h.name for h in found) + "); pin it to the one to keep"})
            continue
        if found:
            host = found[0]
            current = next(e for e in host.existing if e.name == guest.name)
            owner = current.owner
            if owner is not None and owner != fleet.name:
                unplaceable.append({"name": guest.name, "reason": f"the name is taken on {host.name} by a guest of "
                                                                  f"owner {owner!r}; it is not adopted"})
                continue
            if guest.pin and guest.pin != host.name:
                notes.append({"name": guest.name, "note": f"pinned to {guest.pin} but runs on {host.name}; "
                                                          "a guest is never moved"})
            placed.append(Placed(guest, host, True, _options_for(guest, host, True)))
            host.placed.append(guest.name)
            _count_growth(guest, current, host, notes)
            if guest.anti_affinity:
                groups.setdefault(guest.anti_affinity, set()).add(host.name)
        elif guest.spec.state == "absent":
            # It may be on an unreachable hypervisor: reported there, not called gone.
            for name in _maybe_on(guest, lost):
                unreachable_guests[name].append(guest.name)
        else:
            new.append(guest)

    # 2. New guests, largest first (first-fit decreasing packs better), ties by name.
    for guest in sorted(new, key=lambda g: (-g.memory_mib, -g.vcpus, g.name)):
        if guest.pin and guest.pin not in by_name and guest.pin not in lost_names:
            unplaceable.append({"name": guest.name, "reason": f"pin: no hypervisor named {guest.pin!r}"})
            continue
        maybe_there = _maybe_on(guest, lost)
        if maybe_there:
            for name in maybe_there:
                unreachable_guests[name].append(guest.name)
            continue
        reasons: Dict[str, str] = {}
        fits: List[Host] = []
        for host in hosts:
            why = _why_not(guest, host, groups)
            if why is None:
                fits.append(host)
            else:
                reasons[host.name] = why
        if not fits:
            unplaceable.append({"name": guest.name, "reason": _summary(reasons)})
            continue
        if fleet.strategy == "pack":
            host = min(fits, key=lambda h: (h.memory_left() - guest.memory_mib, h.name))
        else:
            host = min(fits, key=lambda h: (-(h.memory_left() - guest.memory_mib) / max(h.memory_capacity, 1.0),
                                            len(h.placed) + len(h.existing), h.name))
        need = _storage_need(guest, host)[1]
        for pool, gib in need.items():
            key = host.storage_id(pool)
            host.storage_used[key] = host.storage_used.get(key, 0.0) + gib
        host.memory_used += guest.memory_mib
        host.vcpus_used += guest.vcpus
        host.placed.append(guest.name)
        if guest.anti_affinity:
            groups.setdefault(guest.anti_affinity, set()).add(host.name)
        if host.in_limit:
            placed.append(Placed(guest, host, False, _options_for(guest, host, False)))
        else:
            pending.append({"name": guest.name, "hypervisor": host.name,
                            "reason": "placed on a hypervisor outside the limit; created by a run that includes it"})

    placed.sort(key=lambda p: (p.host.name, p.guest.name))
    return PlacementResult(
        placed=placed, unplaceable=sorted(unplaceable, key=lambda u: u["name"]),
        unreachable=[{"hypervisor": name, "guests": sorted(guests)}
                     for name, guests in sorted(unreachable_guests.items())],
        pending=sorted(pending, key=lambda p: p["name"]), notes=notes, hosts=hosts)
