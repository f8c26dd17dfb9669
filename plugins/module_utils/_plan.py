# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Desired guest + actual guest -> an ordered plan of changes. Pure: no hypervisor library, no I/O.

One step per attribute group (CPU, memory, firmware/boot, disks, NICs, first-boot data, tags, power):
verify the desired value against the host, compare it in normalised form with what is there, and
record a Change marked ``live`` (takes effect on the running guest) or not (needs a restart).
Only fields the user set are compared, so a hypervisor's defaults and rewriting never show as changes.
Every error is raised while planning, before any backend mutator runs.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from typing import Any, Dict, List, Optional, Set, Tuple

from ._changes import ACTIVE, BackendDefaults, Change, GuestPlan
from ._errors import ConfigError
from ._model import DEVICE_NAME, DiskSpec, GuestSpec, GuestState, HostCapacity, NicSpec

__all__ = ["ACTIVE", "BackendDefaults", "Change", "GuestPlan", "PlanOptions", "Planner", "generated_mac"]

# Defaults of a new guest for fields the user left out (the hypervisor's own defaults would make
# check mode guess; these make it exact).
NEW_GUEST_DEFAULTS: Dict[str, Any] = {"vcpus": 1, "memory_mib": 1024, "firmware": "bios", "autostart": False}


@dataclasses.dataclass
class PlanOptions:
    allow_restart: bool = False
    remove_storage: bool = False
    force: bool = False


def _err(name: str, field: str, value: Any, problem: str) -> ConfigError:
    return ConfigError(f"guest {name!r} {field}", value, problem)


def generated_mac(prefix: str, guest: str, index: int, taken: Set[str]) -> str:
    """A MAC derived from the guest name and NIC position: the same in check mode and the real run."""
    salt = 0
    while True:
        digest = hashlib.sha256(f"{guest}/{index}/{salt}".encode()).hexdigest()
        tail = ":".join(digest[i:i + 2] for i in range(0, 6, 2))
        if prefix == "00:50:56":  # VMware's manual range is 00:50:56:00:00:00-00:50:56:3f:ff:ff
            tail = f"{int(digest[0:2], 16) & 0x3F:02x}" + tail[2:]
        mac = f"{prefix}:{tail}"
        if mac not in taken:
            return mac
        salt += 1


class Planner:
    """Plans guests against one host. Keeps the MACs already claimed so that two guests of one
    ``guests`` call cannot take the same address."""

    def __init__(self, capacity: HostCapacity, defaults: BackendDefaults, options: PlanOptions,
                 leftovers: Optional[Dict[Tuple[str, str], float]] = None) -> None:
        self.capacity = capacity
        self.defaults = defaults
        self.options = options
        self.leftovers = leftovers or {}
        self.claimed_macs: Dict[str, str] = dict(capacity.macs)

    # ------------------------------------------------------------------ entry point
    def plan(self, desired: GuestSpec, current: Optional[GuestState]) -> GuestPlan:
        plan = GuestPlan(desired=desired, current=current)
        if desired.state == "absent":
            if current is not None and desired.uuid is not None and desired.uuid != current.spec.uuid:
                # The uuid pins one incarnation of the guest: another one of that name is not the one to delete.
                raise _err(desired.name, "uuid", desired.uuid, f"the guest named {desired.name!r} has uuid "
                                                               f"{current.spec.uuid}; nothing is removed")
            if current is not None:
                plan.action = "remove"
                plan.remove_storage = self.options.remove_storage
                plan.changes.append(Change("guest", "present", "absent"))
            return plan
        if current is None:
            return self._plan_create(desired, plan)
        return self._plan_update(desired, current, plan)

    # ------------------------------------------------------------------ verify (shared by create and update)
    def _verify_host(self, spec: GuestSpec) -> None:
        cap = self.capacity
        if spec.vcpus is not None and cap.vcpus and spec.vcpus > cap.vcpus:
            raise _err(spec.name, "vcpus", spec.vcpus, f"more than the host's {cap.vcpus} logical CPUs")
        if spec.memory_mib is not None and cap.memory_mib and spec.memory_mib > cap.memory_mib:
            raise _err(spec.name, "memory_mib", spec.memory_mib, f"more than the host's {cap.memory_mib} MiB")
        for i, nic in enumerate(spec.nics or []):
            if cap.networks and nic.network not in cap.networks:
                raise _err(spec.name, f"nics[{i}].network", nic.network,
                           f"no such network on the host (known: {', '.join(sorted(cap.networks))})")

    def _verify_new_disk(self, name: str, index: int, disk: DiskSpec) -> DiskSpec:
        if DEVICE_NAME.fullmatch(disk.name):
            raise _err(name, f"disks[{index}].name", disk.name,
                       "is a device name (a target like vdb, a label like 'Hard disk 2'): it can name a disk the "
                       "guest has, but a new disk needs a name of its own")
        pool = disk.pool or self.capacity.default_pool
        if not pool:
            raise _err(name, f"disks[{index}].pool", disk.pool, "no pool/datastore given and the host has no default")
        if self.capacity.pools and pool not in self.capacity.pools:
            raise _err(name, f"disks[{index}].pool", pool,
                       f"no such pool/datastore on the host (known: {', '.join(sorted(self.capacity.pools))})")
        size = disk.size_gib
        kept = self.leftovers.get((name, disk.name))
        if kept is not None:
            # Storage kept from an earlier guest of this name is reused (and grown), never shrunk.
            if size is not None and size < kept - 0.005:
                raise _err(name, f"disks[{index}].size_gib", size,
                           f"a {kept:g} GiB disk kept from an earlier guest {name!r} would be reused and cannot "
                           "shrink; set size_gib to at least that or delete the kept volume")
            size = max(size or 0.0, kept)
        elif size is None and not disk.source:
            raise _err(name, f"disks[{index}].size_gib", None, "a new disk needs size_gib or source")
        return DiskSpec(name=disk.name, size_gib=size, pool=pool,
                        format=disk.format or self.defaults.disk_format, source=disk.source,
                        bus=disk.bus or self.defaults.disk_bus)

    def _claim_mac(self, name: str, index: int, nic: NicSpec, own: Set[str]) -> NicSpec:
        """A new NIC's MAC: the user's (checked free) or a generated one."""
        if nic.mac is not None:
            holder = self.claimed_macs.get(nic.mac)
            if holder is not None and holder != name:
                raise _err(name, f"nics[{index}].mac", nic.mac, f"already used by guest {holder!r}")
            mac = nic.mac
        else:
            mac = generated_mac(self.defaults.mac_prefix, name, index, set(self.claimed_macs) | own)
        self.claimed_macs[mac] = name
        return NicSpec(network=nic.network, mac=mac, model=nic.model or self.defaults.nic_model)

    # ------------------------------------------------------------------ create
    def _plan_create(self, desired: GuestSpec, plan: GuestPlan) -> GuestPlan:
        if self.capacity.create_error is not None:
            raise self.capacity.create_error
        after = copy.deepcopy(desired)
        for key, value in NEW_GUEST_DEFAULTS.items():
            if getattr(after, key) is None:
                setattr(after, key, value)
        self._verify_host(after)  # the desired values plus the defaults a new guest gets
        after.disks = [self._verify_new_disk(desired.name, i, d) for i, d in enumerate(desired.disks or [])]
        own: Set[str] = set()
        nics = []
        for i, nic in enumerate(desired.nics or []):
            claimed = self._claim_mac(desired.name, i, nic, own)
            own.add(claimed.mac or "")
            nics.append(claimed)
        after.nics = nics
        after.tags = dict(desired.tags or {})
        plan.action = "create"
        plan.after = after
        plan.changes.append(Change("guest", "absent", "present"))
        if desired.state == "running":
            plan.power = "start"
            plan.changes.append(Change("power_state", "stopped", "running"))
        return plan

    # ------------------------------------------------------------------ update
    def _plan_update(self, desired: GuestSpec, current: GuestState, plan: GuestPlan) -> GuestPlan:
        name = desired.name
        self._verify_host(desired)
        have = current.spec
        if desired.uuid is not None and have.uuid and desired.uuid != have.uuid:
            raise _err(name, "uuid", desired.uuid, f"the guest named {name!r} has uuid {have.uuid}")
        after = copy.deepcopy(have)
        running = current.power_state in ACTIVE
        changes = plan.changes

        def change(kind: str, before: Any, value: Any, live: bool, key: Optional[str] = None,
                   attr: Optional[str] = None) -> None:
            changes.append(Change(kind, before, value, live or not running, key=key, attr=attr))

        # CPU and memory: live when growing within what the guest can take without a restart.
        if desired.vcpus is not None and desired.vcpus != have.vcpus:
            grow = have.vcpus is not None and desired.vcpus > have.vcpus
            change("vcpus", have.vcpus, desired.vcpus, grow and desired.vcpus <= (current.max_vcpus or 0))
            after.vcpus = desired.vcpus
        if desired.memory_mib is not None and desired.memory_mib != have.memory_mib:
            grow = have.memory_mib is not None and desired.memory_mib > have.memory_mib
            change("memory_mib", have.memory_mib, desired.memory_mib,
                   grow and desired.memory_mib <= (current.max_memory_mib or 0))
            after.memory_mib = desired.memory_mib
        # Firmware and kernel boot are read at power-on only.
        if desired.firmware is not None and desired.firmware != have.firmware:
            change("firmware", have.firmware, desired.firmware, False)
            after.firmware = desired.firmware
        if desired.boot is not None:
            have_boot = have.boot or type(desired.boot)()
            for key in ("kernel", "initrd", "cmdline"):
                want = getattr(desired.boot, key)
                if want is not None and want != getattr(have_boot, key):
                    change("boot", getattr(have_boot, key), want, False, key=key)
                    if after.boot is None:
                        after.boot = type(desired.boot)()
                    setattr(after.boot, key, want)
        if desired.autostart is not None and desired.autostart != have.autostart:
            change("autostart", have.autostart, desired.autostart, True)
            after.autostart = desired.autostart
        if desired.tags is not None and desired.tags != (have.tags or {}):
            change("tags", have.tags or {}, desired.tags, True)
            after.tags = dict(desired.tags)
        # First-boot data: a new seed is read by cloud-init at the next boot.
        if desired.cloud_init is not None:
            want_digest = desired.cloud_init.digest()
            have_digest = have.cloud_init.digest() if have.cloud_init else None
            if want_digest != have_digest:
                change("cloud_init", have_digest, want_digest, False)
                after.cloud_init = desired.cloud_init
        self._plan_disks(desired, current, after, change)
        self._plan_nics(desired, current, after, change)

        # Also what an earlier run wrote to the persistent definition and is still waiting for a restart.
        plan.restart_required = any(not c.live for c in changes) or (running and bool(current.pending_restart))
        if changes:
            plan.action = "update"
        self._plan_power(desired, current, plan)
        plan.after = after
        return plan

    def _plan_disks(self, desired: GuestSpec, current: GuestState, after: GuestSpec, change: Any) -> None:
        have = {d.name: d for d in current.spec.disks or []}
        after_disks = after.disks if after.disks is not None else []
        for i, disk in enumerate(desired.disks or []):
            old = have.get(disk.name)
            if old is None:
                new = self._verify_new_disk(desired.name, i, disk)
                change("disks", None, dataclasses.asdict(new), new.bus in self.defaults.hotplug_buses, key=disk.name)
                after_disks.append(new)
                continue
            if disk.size_gib is not None and old.size_gib is not None:
                if disk.size_gib < old.size_gib - 0.005:
                    raise _err(desired.name, f"disks[{i}].size_gib", disk.size_gib,
                               f"disk {disk.name!r} is {old.size_gib:g} GiB; shrinking a disk is not supported")
                if disk.size_gib > old.size_gib + 0.005:
                    change("disks", old.size_gib, disk.size_gib, True, key=disk.name, attr="size_gib")
                    _replace(after_disks, disk.name, size_gib=disk.size_gib)
            if disk.bus is not None and old.bus is not None and disk.bus != old.bus:
                change("disks", old.bus, disk.bus, False, key=disk.name, attr="bus")
                _replace(after_disks, disk.name, bus=disk.bus)
        after.disks = after_disks

    def _plan_nics(self, desired: GuestSpec, current: GuestState, after: GuestSpec, change: Any) -> None:
        if desired.nics is None:
            return
        have = list(current.spec.nics or [])
        matched: Set[int] = set()
        after_nics = after.nics if after.nics is not None else []
        own = {n.mac for n in have if n.mac}
        for i, nic in enumerate(desired.nics):
            index = None
            for j, old in enumerate(have):
                if j in matched:
                    continue
                if (nic.mac is not None and old.mac == nic.mac) or (nic.mac is None and old.network == nic.network):
                    index = j
                    break
            if index is None:
                new = self._claim_mac(desired.name, i, nic, own)
                own.add(new.mac or "")
                change("nics", None, dataclasses.asdict(new), True, key=new.mac)
                after_nics.append(new)
                continue
            matched.add(index)
            old = have[index]
            if nic.network != old.network:
                change("nics", old.network, nic.network, True, key=old.mac or f"#{index}", attr="network")
                after_nics[index].network = nic.network
            if nic.model is not None and nic.model != old.model:
                change("nics", old.model, nic.model, False, key=old.mac or f"#{index}", attr="model")
                after_nics[index].model = nic.model
        after.nics = after_nics

    def _plan_power(self, desired: GuestSpec, current: GuestState, plan: GuestPlan) -> None:
        state = current.power_state
        if desired.state == "present" and current.interrupted_restart and state == "stopped":
            # An earlier run stopped this guest to restart it and never started it again: finish the restart.
            plan.power = "start"
            plan.changes.append(Change("power_state", state, "running"))
            plan.restart_required = False
        elif desired.state == "running":
            if state != "running":
                plan.power = "start"
                plan.changes.append(Change("power_state", state, "running"))
                if state not in ACTIVE:
                    plan.restart_required = False  # a cold start applies everything; a resume does not
            elif plan.restart_required and self.options.allow_restart:
                plan.power = "restart"
                plan.changes.append(Change("power_state", "running", "restarted"))
                plan.restart_required = False
        elif desired.state == "stopped":
            if state == "stopped" and current.interrupted_restart:
                # Down because a restart was interrupted, and meant to be: the stop only clears the restart mark,
                # so that a later `present` run does not start it.
                plan.power = "stop"
                plan.changes.append(Change("power_state", "stopped (restart interrupted)", "stopped"))
            elif state not in ("stopped",):
                plan.power = "stop"
                plan.changes.append(Change("power_state", state, "stopped"))
                plan.restart_required = False
        elif plan.restart_required and self.options.allow_restart and state == "running":
            plan.power = "restart"
            plan.changes.append(Change("power_state", "running", "restarted"))
            plan.restart_required = False
        if plan.changes and plan.action == "none":
            plan.action = "update"
        waiting = [c for c in plan.changes if not c.live]
        if (state in ACTIVE and waiting and plan.power not in ("stop", "restart")
                and not self.defaults.stages_restart_changes):
            raise _err(desired.name, waiting[0].field, waiting[0].after,
                       "cannot change while the guest runs on this hypervisor and cannot wait for a restart: set "
                       "allow_restart: true, or state: stopped")


def _replace(disks: List[DiskSpec], name: str, **values: Any) -> None:
    for i, disk in enumerate(disks):
        if disk.name == name:
            disks[i] = dataclasses.replace(disk, **values)
