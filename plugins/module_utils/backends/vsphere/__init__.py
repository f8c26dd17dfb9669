# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""vSphere backend (ESXi or vCenter), in bulk. VsphereBackend composes the parts, each of one role:

- session.py     pyVmomi (imported on first use), login/logout, remote calls and task waits, the TLS context
- discovery.py   identity, host and guest facts over raw SOAP (_vsphere_raw), without pyVmomi
- codec.py       what a VM's configuration means in the model: one function per field, shared by discovery
                 and convergence; extraConfig bookkeeping keys; cloud-init options
- placement.py   convergence's one bulk read (_Snapshot) and placement names resolved against it (_Target)
- configspec.py  the ConfigSpec of a create or a reconfigure; one function per (kind, attr) of a Change
- guests.py      convergence's reads: GuestState, capacity, verify_spec, kept disks
- lifecycle.py   convergence's mutators: create, reconfigure, power, remove

Discovery: the service content, a login, one ContainerView, one RetrievePropertiesEx for the inventory and the
VM list, the VMs' properties by explicit lists (in concurrent parts on a large endpoint), a logout. Guest
convergence reads hosts, datastores, networks, the inventory tree and every VM in one RetrievePropertiesEx
over one view, memoised until a mutator runs; each mutator is one task plus the polls of that task.
"""

from __future__ import annotations

import ssl
import threading
from typing import Any, Dict, List, Optional, Set, Tuple

from ..._changes import BackendDefaults, GuestPlan
from ..._endpoints import Endpoint
from ..._errors import EndpointError
from ..._model import (
    OWNER_TAG,
    Discovery,
    GuestSpec,
    GuestState,
    HostCapacity,
    Identity,
    Placement,
    count_guests,
)
from ..base import GuestBackend
from . import discovery, guests, lifecycle
from .configspec import create_build, update_build
from .discovery import _SERIAL_KEYS, VM_PROPS, VM_STATE_PROPS
from .placement import Inventory, _Snapshot, _Target
from .session import HAS_PYVMOMI, PAGE_SIZE, Connection, fail, ssl_context
from .session import preload as preload_pyvmomi

__all__ = ["HAS_PYVMOMI", "PAGE_SIZE", "VM_CHUNKS", "VM_CHUNK_MIN", "_SERIAL_KEYS", "VsphereBackend", "_Snapshot",
           "_Target"]

# Discovery reads a large endpoint's VMs in up to this many concurrent parts of at least VM_CHUNK_MIN VMs.
VM_CHUNKS = 4
VM_CHUNK_MIN = 250


class VsphereBackend(GuestBackend):
    api = "vsphere"
    defaults = BackendDefaults(disk_format="thin", disk_bus="scsi", nic_model="vmxnet3", mac_prefix="00:50:56",
                               stages_restart_changes=False, hotplug_buses=("scsi", "sata", "nvme"))

    @classmethod
    def preload(cls) -> None:
        preload_pyvmomi()

    def __init__(self, endpoint: Endpoint, timeout: float = 10.0) -> None:
        super().__init__(endpoint, timeout)
        self._lock = threading.Lock()
        # Discovery's SOAP session (no pyVmomi) and convergence's pyVmomi session, each opened on first use.
        self._soap = discovery.SoapSession(endpoint, timeout, self._count)
        self._conn = Connection(endpoint, timeout, self._count)
        # Convergence's bulk read and resolved placements, memoised until a mutator runs.
        self._inv = Inventory(self._conn)

    def _count(self, n: int = 1) -> None:
        with self._lock:
            self.calls += n

    # ------------------------------------------------------------------ connection
    def _ssl_context(self) -> ssl.SSLContext:
        return ssl_context(self.endpoint)

    def _fail(self, exc: BaseException) -> EndpointError:
        return fail(self.endpoint, self.timeout, exc)

    def _login(self) -> Any:
        """pyVmomi's service content, logged in."""
        return self._conn.login()

    def close(self) -> None:
        self._conn.close()
        self._soap.close()

    # ------------------------------------------------------------------ discovery
    # Kept as static methods so that a test can stand in for one reader.
    _inventory = staticmethod(discovery.inventory)
    _guest_from_raw = staticmethod(discovery.guest_from_raw)

    def identify(self) -> Identity:
        return discovery.identity(self.endpoint, self._soap.open()[1])

    def discover(self, guests: bool = True) -> Discovery:
        try:
            identity = self.identify()
            session, content = self._soap.login()
            by_type, vm_ids = self._inventory(session, content)
            networks = discovery.network_names(by_type)
            guest_list = discovery.read_vms(session, content, vm_ids, VM_PROPS if guests else VM_STATE_PROPS,
                                            networks, guests, VM_CHUNKS, VM_CHUNK_MIN)
        except EndpointError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc) from None
        hosts = discovery.hosts(self.endpoint, identity, by_type, networks)
        count_guests(hosts, guest_list)
        return Discovery(identity=identity, hypervisors=sorted(hosts, key=lambda h: h.name),
                         guests=sorted((g for g in guest_list if not g.template), key=lambda g: g.name)
                         if guests else [], calls=self.calls)

    # ------------------------------------------------------------------ convergence: reads
    def capacity(self, placement: Placement) -> HostCapacity:
        return guests.capacity(self._inv.snapshot(), self._inv.target(placement), placement)

    def read_guests(self, placement: Placement) -> List[GuestState]:
        return guests.read_guests(self._inv.snapshot(), self._inv.target(placement))

    def leftover_disks(self, specs: List[GuestSpec], placement: Placement) -> Dict[Tuple[str, str], float]:
        target = self._inv.target(placement)
        return guests.leftover_disks(self._conn, self._inv.snapshot(), target, specs)

    def verify_spec(self, spec: GuestSpec) -> None:
        guests.verify_spec(spec)

    def create_config(self, spec: GuestSpec, target: _Target, owner: str = OWNER_TAG,
                      instance_uuid: Optional[str] = None, kept: Optional[Dict[str, Optional[float]]] = None
                      ) -> Tuple[Any, Set[str]]:
        """The ConfigSpec of a new guest and the directories to make first (see configspec.create_build)."""
        return create_build(self._inv, self.defaults, spec, target, owner, instance_uuid, kept or {}).config_and_dirs()

    def update_config(self, current: GuestState, plan: GuestPlan, live_only: bool) -> Tuple[Any, Set[str]]:
        """ONE ConfigSpec for the plan's changes (LIVE_ONLY: only those marked live), and the directories to make
        first (see configspec.update_build)."""
        changes = [c for c in plan.changes if c.live or not live_only]
        return update_build(self._inv, self.defaults, self.endpoint.label, current.spec.name,
                            guests.props_of(self._inv, current), changes, plan.after or plan.desired).config_and_dirs()

    # ------------------------------------------------------------------ convergence: mutators
    def create_guest(self, spec: GuestSpec, placement: Placement, owner: str = OWNER_TAG) -> GuestState:
        return lifecycle.create_guest(self._conn, self._inv, self.defaults, spec, placement, owner)

    def update_guest(self, current: GuestState, plan: GuestPlan) -> None:
        lifecycle.update_guest(self._conn, self._inv, self.defaults, current, plan)

    def apply_offline(self, current: GuestState, plan: GuestPlan) -> None:
        lifecycle.apply_offline(self._conn, self._inv, self.defaults, current, plan)

    def restart_guest(self, current: GuestState, timeout: float, force: bool,
                      plan: Optional[GuestPlan] = None) -> None:
        """Mark the VM as restarting (extraConfig RESTARTING_KEY), stop it, apply PLAN's offline changes, start it,
        clear the mark. A run killed or failing in between leaves a powered-off VM with the mark, which the next
        read reports as interrupted_restart, so that run starts it again."""
        name = current.spec.name
        instance_uuid = str(guests.props_of(self._inv, current).get("config.instanceUuid") or "").lower() or "yes"
        lifecycle.set_restarting(self._conn, self._inv, current, instance_uuid)
        try:
            self.stop_guest(current, timeout, force)
        except EndpointError:
            # Still running (it did not shut down): no restart is under way, so no mark may stay behind to make a
            # later run start the guest after someone stopped it on purpose.
            lifecycle.set_restarting(self._conn, self._inv, current, "")
            raise
        if plan is not None:
            self.apply_offline(current, plan)
        self.start_guest(current)
        try:
            lifecycle.set_restarting(self._conn, self._inv, current, "")
        except EndpointError as exc:  # the guest runs again; a stale mark on a running VM means nothing
            raise EndpointError(self.endpoint.label, f"guest {name!r} restarted, but clearing its restart mark "
                                                     f"failed: {exc.reason}") from None

    def start_guest(self, current: GuestState) -> None:
        lifecycle.start_guest(self._conn, self._inv, current)

    def stop_guest(self, current: GuestState, timeout: float, force: bool) -> None:
        lifecycle.stop_guest(self._conn, self._inv, current, timeout, force)

    def remove_guest(self, current: GuestState, remove_storage: bool) -> None:
        lifecycle.remove_guest(self._conn, self._inv, current, remove_storage)
