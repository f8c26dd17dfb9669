# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Where guests are on a vSphere endpoint, for convergence: the one bulk read of the inventory (_Snapshot),
and the user's placement names resolved against it (_Target): datacenter, cluster or host, resource pool,
folder, the datastores and networks the target hosts see, and the scope ``exclusive`` prunes within."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Dict, List, Optional, Set, Tuple

from ..._errors import ConfigError, EndpointError
from ..._model import Placement
from .session import Connection, vim

GUEST_VM_PROPS = [
    "name", "parent", "config.uuid", "config.template", "config.firmware", "config.hardware.numCPU",
    "config.hardware.memoryMB", "config.hardware.device", "config.extraConfig", "config.cpuHotAddEnabled",
    "config.memoryHotAddEnabled", "config.files.vmPathName", "config.instanceUuid", "runtime.powerState",
    "runtime.host", "resourcePool",
]


@dataclasses.dataclass
class _Snapshot:
    """One bulk read: every object's properties and moref, by moref id."""

    props: Dict[str, Dict[str, Any]]
    refs: Dict[str, Any]
    vcenter: bool

    def of(self, *types: Any) -> List[str]:
        return [moid for moid, ref in self.refs.items() if isinstance(ref, types)]

    def name(self, moid: str) -> str:
        return str(self.props.get(moid, {}).get("name", moid))

    def parent(self, moid: str) -> Optional[str]:
        ref = self.props.get(moid, {}).get("parent")
        return ref._moId if ref is not None else None

    def ancestor(self, moid: Optional[str], mo_type: Any) -> Optional[str]:
        seen = 0
        while moid is not None and seen < 64:
            if isinstance(self.refs.get(moid), mo_type):
                return moid
            moid = self.parent(moid)
            seen += 1
        return None

    def below(self, moid: Optional[str], top: str) -> bool:
        """MOID is TOP or inside it (walking parents)."""
        seen = 0
        while moid is not None and seen < 64:
            if moid == top:
                return True
            moid = self.parent(moid)
            seen += 1
        return False

    def networks(self) -> Dict[str, str]:
        return {m: self.name(m) for m in self.of(vim.Network)}

    def datacenter_of(self, moid: str) -> Any:
        return self.refs.get(self.ancestor(moid, vim.Datacenter) or "")

    def datastores(self, host: str) -> Set[str]:
        return {self.name(d._moId) for d in self.props.get(host, {}).get("datastore") or []}

    def visible(self, hosts: List[str]) -> Tuple[List[str], Dict[str, str]]:
        """The datastore names and the networks (name -> moid) that HOSTS see."""
        datastores: Set[str] = set()
        networks: Dict[str, str] = {}
        for host in hosts:
            datastores |= self.datastores(host)
            for net in self.props.get(host, {}).get("network") or []:
                networks.setdefault(self.name(net._moId), net._moId)
        return sorted(datastores), networks

    def browsers(self) -> Dict[str, Any]:
        """Datastore name -> its datastore browser."""
        return {self.name(m): self.props[m]["browser"] for m in self.of(vim.Datastore) if self.props[m].get("browser")}

    def files_in_use(self) -> Dict[str, str]:
        """Disk file -> the name of the VM it is attached to, over every VM."""
        used: Dict[str, str] = {}
        for moid in self.of(vim.VirtualMachine):
            for dev in self.props[moid].get("config.hardware.device") or []:
                file_name = getattr(getattr(dev, "backing", None), "fileName", None)
                if isinstance(dev, vim.vm.device.VirtualDisk) and file_name:
                    used.setdefault(file_name, self.name(moid))
        return used


@dataclasses.dataclass
class _Target:
    """A resolved placement: where a new guest goes and what it may use."""

    datacenter: Optional[str]
    folder: Any
    pool: Any  # resource pool moref; None when the datacenter has several and none was chosen
    host: Any  # host moref when esxi_host was given
    hosts: List[str]
    datastores: List[str]
    default_datastore: Optional[str]
    networks: Dict[str, str]  # name -> network moid, as the target hosts see them
    why_no_pool: str = ""
    # What the user placed guests in (moids; None = not given): only VMs under these are in scope.
    scope_hosts: Optional[Set[str]] = None  # cluster / esxi_host: the hosts a VM must run on
    scope_folder: Optional[str] = None  # folder: a VM must be in this folder's subtree
    scope_pool: Optional[str] = None  # resource_pool: a VM must be in this pool (or a pool below it)


def read_snapshot(conn: Connection) -> _Snapshot:
    """Everything guest convergence reads, in one RetrievePropertiesEx over one view."""
    try:
        content = conn.login()
        compute = ["name", "parent", "resourcePool", "host"]
        props: List[Tuple[Any, List[str]]] = [
            (vim.HostSystem, ["name", "parent", "datastore", "network", "summary.hardware"]),
            (vim.Datastore, ["name", "browser"]),
            (vim.Network, ["name"]),
            (vim.dvs.DistributedVirtualPortgroup, ["name", "key", "config.distributedVirtualSwitch"]),
            (vim.DistributedVirtualSwitch, ["uuid"]),
            (vim.Folder, ["name", "parent"]),
            (vim.Datacenter, ["name", "parent", "vmFolder"]),
            (vim.ComputeResource, compute),
            (vim.ClusterComputeResource, compute),
            (vim.ResourcePool, ["name", "parent", "owner"]),
            (vim.VirtualMachine, GUEST_VM_PROPS),
        ]
        view_types = [vim.HostSystem, vim.Datastore, vim.Network, vim.DistributedVirtualSwitch, vim.Folder,
                      vim.Datacenter, vim.ComputeResource, vim.ResourcePool, vim.VirtualMachine]
        by_id: Dict[str, Dict[str, Any]] = {}
        refs: Dict[str, Any] = {}
        for obj in conn.retrieve(content, [(view_types, props)]):
            by_id.setdefault(obj.obj._moId, {}).update({p.name: p.val for p in obj.propSet})
            refs[obj.obj._moId] = obj.obj
        vcenter = content.about.apiType == "VirtualCenter"
    except (EndpointError, ConfigError):
        raise
    except Exception as exc:  # noqa: BLE001
        raise conn.fail(exc) from None
    return _Snapshot(props=by_id, refs=refs, vcenter=vcenter)


class Inventory:
    """The bulk read memoised until a mutator drops it (so capacity + read_guests + leftover_disks of one run
    retrieve once), and the placements resolved from it (the inventory tree does not change under us). A
    memo only: every method reads what it needs when nothing is memoised."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.snap: Optional[_Snapshot] = None
        self.targets: Dict[Tuple[Any, ...], _Target] = {}

    def snapshot(self) -> _Snapshot:
        with self.lock:
            if self.snap is not None:
                return self.snap
        snap = read_snapshot(self.conn)
        with self.lock:
            self.snap = snap
        return snap

    def target(self, placement: Placement) -> _Target:
        key = dataclasses.astuple(placement)
        with self.lock:
            cached = self.targets.get(key)
        if cached is not None:
            return cached
        target = resolve(self.snapshot(), placement, self.conn.endpoint.label)
        with self.lock:
            self.targets[key] = target
        return target

    def invalidate(self) -> None:
        with self.lock:
            self.snap = None


# ---------------------------------------------------------------------------------------- resolution
def _one(snap: _Snapshot, option: str, value: str, candidates: List[str], where: str) -> str:
    found = [m for m in candidates if snap.name(m) == value]
    if len(found) == 1:
        return found[0]
    known = ", ".join(sorted({snap.name(m) for m in candidates})) or "none"
    if not found:
        raise ConfigError(option, value, f"no such {option.replace('_', ' ')} {where} (known: {known})")
    raise ConfigError(option, value, f"{len(found)} objects {where} have this name; it is ambiguous")


def resolve(snap: _Snapshot, placement: Placement, label: str) -> _Target:
    """Placement names -> morefs. On ESXi there is one datacenter, host and root pool: only ``pool`` and
    ``resource_pool`` mean something there. LABEL names the endpoint in errors."""
    if not snap.vcenter:
        placement = Placement(pool=placement.pool, resource_pool=placement.resource_pool)
    dcs = snap.of(vim.Datacenter)
    if placement.datacenter:
        dc = _one(snap, "datacenter", placement.datacenter, dcs, f"on {label}")
    elif len(dcs) == 1:
        dc = dcs[0]
    else:
        raise ConfigError("datacenter", None, f"{label} has {len(dcs)} datacenters "
                                              f"({', '.join(sorted(snap.name(d) for d in dcs))}); set datacenter")
    in_dc = f"in datacenter {snap.name(dc)!r}"
    hosts_in_dc = [h for h in snap.of(vim.HostSystem) if snap.ancestor(h, vim.Datacenter) == dc]
    computes = [c for c in snap.of(vim.ComputeResource) if snap.ancestor(c, vim.Datacenter) == dc]
    clusters = [c for c in computes if isinstance(snap.refs[c], vim.ClusterComputeResource)]
    compute: Optional[str] = None
    host: Optional[str] = None
    if placement.cluster:
        compute = _one(snap, "cluster", placement.cluster, clusters, in_dc)
    if placement.esxi_host:
        scope = [h for h in hosts_in_dc if compute is None or snap.parent(h) == compute]
        where = f"in cluster {placement.cluster!r}" if compute else in_dc
        host = _one(snap, "esxi_host", placement.esxi_host, scope, where)
        compute = snap.parent(host)
    pools = [p for p in snap.of(vim.ResourcePool) if snap.ancestor(p, vim.Datacenter) == dc]
    pool: Optional[str] = None
    if placement.resource_pool:
        scope = [p for p in pools if compute is None or snap.ancestor(p, vim.ComputeResource) == compute]
        pool = _resource_pool(snap, placement.resource_pool, scope, in_dc)
        compute = snap.ancestor(pool, vim.ComputeResource)
    why = ""
    if compute is None and len(computes) == 1:
        compute = computes[0]
    if compute is not None:
        hosts = [host] if host else [h._moId for h in snap.props[compute].get("host") or []]
        if pool is None:
            root = snap.props[compute].get("resourcePool")
            pool = root._moId if root is not None else None
    else:
        hosts = hosts_in_dc
        why = (f"datacenter {snap.name(dc)!r} has {len(computes)} clusters/hosts; set cluster or esxi_host "
               "to say where new guests go")
    folder = snap.props[dc].get("vmFolder")
    scope_folder = None
    if placement.folder and folder is not None:
        scope_folder = _folder(snap, dc, folder._moId, placement.folder)
        folder = snap.refs[scope_folder]
    datastores, networks = snap.visible(hosts)
    if placement.pool and placement.pool not in datastores:
        raise ConfigError("pool", placement.pool, f"no such datastore on the target host(s) (known: "
                                                  f"{', '.join(datastores) or 'none'})")
    shared = sorted(set.intersection(*[snap.datastores(h) for h in hosts])) if hosts else []
    default = placement.pool or (shared[0] if shared else (datastores[0] if datastores else None))
    scope_hosts = set(hosts) if placement.cluster or placement.esxi_host else None
    return _Target(datacenter=dc, folder=folder, pool=snap.refs.get(pool) if pool else None,
                   host=snap.refs[host] if host else None, hosts=hosts, datastores=datastores,
                   default_datastore=default, networks=networks, why_no_pool=why, scope_hosts=scope_hosts,
                   scope_folder=scope_folder, scope_pool=pool if placement.resource_pool else None)


def in_scope(snap: _Snapshot, target: _Target, moid: str, props: Dict[str, Any]) -> bool:
    """Whether a VM is inside what the user placed guests in (see _Target.scope_*)."""
    if target.scope_hosts is not None:
        host = props.get("runtime.host")
        if host is None or host._moId not in target.scope_hosts:
            return False
    if target.scope_folder is not None and not snap.below(snap.parent(moid), target.scope_folder):
        return False
    if target.scope_pool is not None:
        pool = props.get("resourcePool")
        if pool is None or not snap.below(pool._moId, target.scope_pool):
            return False
    return True


def _resource_pool(snap: _Snapshot, value: str, scope: List[str], where: str) -> str:
    """A resource pool by name or by path below the cluster/host ('Resources/' prefix optional)."""
    parts = [p for p in value.strip("/").split("/") if p]
    if parts and parts[0] == "Resources":
        parts = parts[1:]
    if not parts:  # the root pool itself
        roots = [p for p in scope if isinstance(snap.refs.get(snap.parent(p) or ""), vim.ComputeResource)]
        return _one(snap, "resource_pool", "Resources", roots, where)

    def path(moid: str) -> List[str]:
        names = []
        while moid in snap.props and isinstance(snap.refs.get(moid), vim.ResourcePool):
            names.append(snap.name(moid))
            moid = snap.parent(moid) or ""
        return list(reversed(names[:-1]))  # without the root pool

    found = [p for p in scope if path(p)[-len(parts):] == parts]
    if len(found) == 1:
        return found[0]
    known = ", ".join(sorted("/".join(path(p)) for p in scope if path(p))) or "none"
    problem = "is ambiguous; give its path" if found else f"no such resource pool {where} (known: {known})"
    raise ConfigError("resource_pool", value, problem)


def _folder(snap: _Snapshot, dc: str, vm_folder: str, value: str) -> str:
    """A VM folder path, relative to the datacenter's VM folder ('/DC/vm/' prefix optional)."""
    parts = [p for p in value.strip("/").split("/") if p]
    if parts and parts[0] == snap.name(dc):
        parts = parts[1:]
    if parts and parts[0] == snap.name(vm_folder):
        parts = parts[1:]
    node = vm_folder
    for part in parts:
        children = [f for f in snap.of(vim.Folder) if snap.parent(f) == node and snap.name(f) == part]
        if len(children) != 1:
            raise ConfigError("folder", value, f"no such VM folder in datacenter {snap.name(dc)!r}")
        node = children[0]
    return node
