# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Guest convergence's mutators on vSphere: each is one task (CreateVM, ReconfigVM, power, Destroy) plus the
polls of that task, and drops the memoised bulk read (placement.Inventory) before it changes anything."""

from __future__ import annotations

import time
import uuid as _uuid
from typing import Any, Dict, List, Set, Tuple

from ..._changes import BackendDefaults, Change, GuestPlan
from ..._errors import ConfigError, EndpointError
from ..._model import GuestSpec, GuestState, Placement
from . import codec
from .codec import OWNER_UUID_KEY, RESTARTING_KEY
from .configspec import _Build, create_build, update_build
from .guests import VmRef, disk_paths, existing_files, props_of
from .placement import Inventory, _Target
from .session import Connection, vim, vmodl


def _moid_order(moid: str) -> Tuple[int, str]:
    """Creation order of VM morefs ('vm-12' before 'vm-103'): vCenter and vcsim number them as they come."""
    tail = moid.rsplit("-", 1)[-1]
    return (int(tail) if tail.isdigit() else 1 << 62, moid)


def make_dirs(conn: Connection, name: str, datacenter: Any, paths: Set[str]) -> Set[str]:
    """Make the directories of disks away from the VM's datastore (vSphere does not create them). Returns
    those this call made: one that was there already (a kept disk's, another run's) is not ours to delete."""
    made: Set[str] = set()
    if not paths:
        return made
    file_manager = conn.login().fileManager
    for path in sorted(paths):
        try:
            conn.invoke(name, "creating directory " + path, file_manager.MakeDirectory, path, datacenter, True)
            made.add(path)
        except EndpointError as exc:
            if "FileAlreadyExists" not in str(exc) and "already exists" not in str(exc):
                raise
    return made


# ---------------------------------------------------------------------------------------- create
def create_guest(conn: Connection, inv: Inventory, defaults: BackendDefaults, spec: GuestSpec, placement: Placement,
                 owner: str) -> GuestState:
    """CreateVM with the whole guest in one spec, marked as OWNER's on the instance UUID chosen here.

    Create-exclusive: vSphere refuses a second VM of a name in one folder (DuplicateName); vcsim 0.24 does
    not, so after CreateVM the folder's VMs of that name are read (one call) and, when another run made
    one too, the VM created first stays and the other run's copy is removed by that run, which fails.
    A failed CreateVM is rolled back by vSphere itself (the disk files it made go with it); the clean-up
    here removes only directories this call made, and only when they are still empty."""
    target = inv.target(placement)
    if target.pool is None:
        raise ConfigError("cluster", placement.cluster, target.why_no_pool or "no resource pool to create in")
    snap = inv.snapshot()
    datacenter = snap.refs.get(target.datacenter or "")
    instance_uuid = str(_uuid.uuid4())
    browsers = snap.browsers()
    # Decided now, from a fresh listing: which disk files are there to reuse.
    kept = existing_files(conn, browsers, spec.name, sorted(disk_paths(snap, spec, target).values()))
    used = snap.files_in_use()
    kept = {f: size for f, size in kept.items() if f not in used}
    build = create_build(inv, defaults, spec, target, owner, instance_uuid, kept)
    config, dirs = build.config_and_dirs()
    inv.invalidate()
    made = make_dirs(conn, spec.name, datacenter, dirs)
    try:
        vm = conn.task(spec.name, "CreateVM", target.folder.CreateVM_Task, config=config, pool=target.pool,
                       host=target.host, written_gib=codec.written_gib(config))
    except EndpointError:
        _remove_empty_dirs(conn, spec.name, datacenter, browsers, made)
        raise
    _settle_create(conn, inv, spec.name, target, vm, instance_uuid, build)
    if build.grow:
        _grow_files(conn, spec.name, vm, build.grow)
    return GuestState(spec=spec, power_state="stopped", owner=owner, created_disks=list(build.created),
                      ref=VmRef(vm))


def _remove_empty_dirs(conn: Connection, name: str, datacenter: Any, browsers: Dict[str, Any], made: Set[str]) -> None:
    """Best effort after a failed create: delete the directories this call made, if nothing is in them (a
    run that found one there meanwhile may have put its disk in it)."""
    for path in sorted(made):
        try:
            browser = browsers.get(codec.datastore_of(path) or "")
            if browser is None:
                continue
            listing = conn.task(name, "listing " + path, browser.SearchDatastore_Task, path,
                                vim.host.DatastoreBrowser.SearchSpec(matchPattern=["*"]))
            if getattr(listing, "file", None):
                continue
            conn.task(name, "clean-up of " + path, conn.login().fileManager.DeleteDatastoreFile_Task, path,
                      datacenter)
        except EndpointError:  # best effort: the creation error is what counts
            pass


def _settle_create(conn: Connection, inv: Inventory, name: str, target: _Target, vm: Any, instance_uuid: str,
                   build: _Build) -> None:
    """After CreateVM: make sure this is the only VM of the name in its folder (vcsim does not refuse a
    duplicate), and that the mark names the instance UUID the VM got (vCenter may pick another)."""
    pc = vmodl.query.PropertyCollector
    content = conn.login()
    spec = pc.FilterSpec(objectSet=[pc.ObjectSpec(obj=target.folder, skip=True, selectSet=[
        pc.TraversalSpec(name="children", type=vim.Folder, path="childEntity", skip=False)])],
        propSet=[pc.PropertySpec(type=vim.VirtualMachine, pathSet=["name", "config.instanceUuid"])])
    result = conn.invoke(name, "reading the folder", content.propertyCollector.RetrievePropertiesEx,
                         [spec], pc.RetrieveOptions())
    same: Dict[str, str] = {}
    while result is not None:
        for obj in result.objects:
            props = {p.name: p.val for p in obj.propSet}
            if props.get("name") == name:
                same[obj.obj._moId] = str(props.get("config.instanceUuid") or "")
        if not result.token:
            break
        result = conn.invoke(name, "reading the folder", content.propertyCollector.ContinueRetrievePropertiesEx,
                             result.token)
    others = sorted((m for m in same if m != vm._moId), key=_moid_order)
    if others and _moid_order(others[0]) < _moid_order(vm._moId):
        # Another run created this guest first. Our copy names the same files as the winner's (same name, same
        # paths), so it is unregistered, never destroyed: Destroy deletes a VM's files (vcsim: its whole
        # directory), which are the winner's disks. (Real vSphere refuses the second CreateVM before this.)
        try:
            conn.invoke(name, "UnregisterVM", vm.UnregisterVM)
        finally:
            inv.invalidate()
        raise EndpointError(conn.endpoint.label, f"guest {name!r}: another run created a VM of this name at "
                                                 f"the same time ({others[0]}); left that one alone")
    got = same.get(vm._moId, instance_uuid).lower()
    if got and got != instance_uuid.lower():
        conn.task(name, "ReconfigVM (ownership mark)", vm.ReconfigVM_Task, spec=vim.vm.ConfigSpec(
            extraConfig=[vim.option.OptionValue(key=OWNER_UUID_KEY, value=got)]))


def _grow_files(conn: Connection, name: str, vm: Any, sizes: Dict[str, float]) -> None:
    """Grow reused disks (by file) to SIZES after they were attached at their own size."""
    devices = conn.invoke(name, "reading devices", getattr, vm, "config").hardware.device
    edits = []
    for dev in devices:
        file_name = getattr(getattr(dev, "backing", None), "fileName", None)
        if isinstance(dev, vim.vm.device.VirtualDisk) and file_name in sizes:
            dev.capacityInKB = codec.kib(sizes[file_name])
            dev.capacityInBytes = dev.capacityInKB * 1024
            edits.append(vim.vm.device.VirtualDeviceSpec(operation="edit", device=dev))
    if edits:
        config = vim.vm.ConfigSpec(deviceChange=edits)
        conn.task(name, "growing kept disks", vm.ReconfigVM_Task, spec=config, written_gib=codec.written_gib(config))


# ---------------------------------------------------------------------------------------- reconfigure
def reconfigure(conn: Connection, inv: Inventory, defaults: BackendDefaults, current: GuestState,
                changes: List[Change], after: GuestSpec) -> None:
    """One ReconfigVM with CHANGES (when they change anything), after making the directories new disks need.
    The datacenter (MakeDirectory needs it on vCenter) is read before the bulk read is dropped."""
    name = current.spec.name
    build = update_build(inv, defaults, conn.endpoint.label, name, props_of(inv, current), changes, after)
    config, dirs = build.config_and_dirs()
    datacenter = inv.snapshot().datacenter_of(current.ref.vm._moId) if dirs else None
    inv.invalidate()
    if config.deviceChange or config.extraConfig or config.numCPUs or config.memoryMB or config.firmware:
        make_dirs(conn, name, datacenter, dirs)
        conn.task(name, "ReconfigVM", current.ref.vm.ReconfigVM_Task, spec=config,
                  written_gib=codec.written_gib(config))


def update_guest(conn: Connection, inv: Inventory, defaults: BackendDefaults, current: GuestState,
                 plan: GuestPlan) -> None:
    """The changes that can be made now: every change on a stopped VM, the live ones on a running VM. The
    others wait for apply_offline, which the caller runs once the VM is off (stop, or inside restart_guest)."""
    name = current.spec.name
    offline = [c for c in plan.changes if not c.live and c.kind != "power_state"]
    running = current.power_state != "stopped"
    if running and offline and plan.power not in ("stop", "restart"):
        # vSphere has no persistent-only configuration to stage these in, so they cannot wait for a restart.
        raise EndpointError(conn.endpoint.label, f"guest {name!r}: {', '.join(c.field for c in offline)} cannot "
                                                 "change while it runs on vSphere; set allow_restart: true or "
                                                 "stop it first")
    reconfigure(conn, inv, defaults, current, [c for c in plan.changes if c.live or not running],
                plan.after or plan.desired)


def apply_offline(conn: Connection, inv: Inventory, defaults: BackendDefaults, current: GuestState,
                  plan: GuestPlan) -> None:
    """PLAN's changes that need the VM off (not live), applied to the powered-off VM: the explicit step between
    the stop and the start. Refused while the VM runs (one power-state read)."""
    changes = [c for c in plan.changes if not c.live and c.kind not in ("guest", "power_state")]
    if not changes:
        return
    if power(conn, current) != "poweredOff":
        raise EndpointError(conn.endpoint.label, f"guest {current.spec.name!r}: "
                                                 f"{', '.join(c.field for c in changes)} need the VM powered off")
    reconfigure(conn, inv, defaults, current, changes, plan.after or plan.desired)


def set_restarting(conn: Connection, inv: Inventory, current: GuestState, value: str) -> None:
    inv.invalidate()
    conn.task(current.spec.name, "ReconfigVM (restart mark)", current.ref.vm.ReconfigVM_Task,
              spec=vim.vm.ConfigSpec(extraConfig=[vim.option.OptionValue(key=RESTARTING_KEY, value=value)]))


# ---------------------------------------------------------------------------------------- power and removal
def power(conn: Connection, current: GuestState) -> str:
    runtime = conn.invoke(current.spec.name, "reading the power state", getattr, current.ref.vm, "runtime")
    return str(runtime.powerState)


def _power_task(conn: Connection, current: GuestState, what: str, method: Any, wanted: str) -> None:
    """One power task. Refused because the VM is in the WANTED state already (another run got it there
    meanwhile, or it shut down by itself): that is what was asked."""
    try:
        conn.task(current.spec.name, what, method)
    except EndpointError:
        if power(conn, current) != wanted:
            raise


def start_guest(conn: Connection, inv: Inventory, current: GuestState) -> None:
    inv.invalidate()
    _power_task(conn, current, "PowerOnVM", current.ref.vm.PowerOnVM_Task, "poweredOn")
    if current.interrupted_restart:
        set_restarting(conn, inv, current, "")  # a restart an earlier run did not finish is finished now


def stop_guest(conn: Connection, inv: Inventory, current: GuestState, timeout: float, force: bool) -> None:
    inv.invalidate()
    if power(conn, current) != "poweredOff":
        _shutdown(conn, current, timeout, force)
    elif current.interrupted_restart:
        # Declared stopped: the mark of a restart an earlier run did not finish goes, so no later run starts it.
        set_restarting(conn, inv, current, "")


def _shutdown(conn: Connection, current: GuestState, timeout: float, force: bool) -> None:
    """Guest shutdown through VMware Tools, polled (delay doubling up to 2s) until off or TIMEOUT; then
    power off when FORCE. vcsim 0.24 powers a VM off at once on ShutdownGuest, Tools or not."""
    name = current.spec.name
    asked = True
    try:
        conn.invoke(name, "ShutdownGuest", current.ref.vm.ShutdownGuest)
    except EndpointError:
        asked = False  # Tools not running, or suspended: only a power off stops it
    deadline = time.monotonic() + timeout
    delay = 0.2
    while asked:
        if power(conn, current) == "poweredOff":
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(min(delay, max(deadline - time.monotonic(), 0.05)))
        delay = min(delay * 2, 2.0)
    if not asked and power(conn, current) == "poweredOff":
        return  # ShutdownGuest was refused because it was off already (another run stopped it meanwhile)
    if not force:
        raise EndpointError(conn.endpoint.label, f"guest {name!r} did not shut down within {timeout:g}s "
                                                 "(tools not running?); set force: true to power it off")
    _power_task(conn, current, "PowerOffVM", current.ref.vm.PowerOffVM_Task, "poweredOff")


def remove_guest(conn: Connection, inv: Inventory, current: GuestState, remove_storage: bool) -> None:
    name = current.spec.name
    vm = current.ref.vm
    inv.invalidate()
    try:
        if current.power_state != "stopped" and power(conn, current) != "poweredOff":
            _power_task(conn, current, "PowerOffVM", vm.PowerOffVM_Task, "poweredOff")
        if not remove_storage:
            conn.invoke(name, "UnregisterVM", vm.UnregisterVM)  # files stay on the datastore
            return
        props = props_of(inv, current)
        foreign = [dev for disk_name, dev in codec.disks(props, codec.options(props.get("config.extraConfig")))
                   if disk_name not in current.created_disks]
        if foreign:
            # Detach (no fileOperation) the disks this collection did not create, so Destroy keeps them.
            spec = vim.vm.ConfigSpec(deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="remove", device=d)
                                                   for d in foreign])
            conn.task(name, "detaching disks", vm.ReconfigVM_Task, spec=spec)
        conn.task(name, "Destroy", vm.Destroy_Task)
    except EndpointError as exc:
        if "ManagedObjectNotFound" in str(exc):
            return  # already gone: absent is what was asked
        raise
