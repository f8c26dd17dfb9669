# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""vSphere safety against the lab's vcsim: two runs converging one vCenter at once, kept disks picked up again,
clones that copy the ownership mark, and exclusive pruning only inside the placement.

What vcsim 0.24 does (simulator/folder.go, virtual_machine.go): CreateVM does NOT refuse a second VM of a name in
one folder (only CreateFolder checks names), so a second VM directory becomes 'NAME (0)'; a disk file that exists
fails CreateVM with FileAlreadyExists, and a failed CreateVM leaves its directory behind (no roll-back). The backend
therefore re-reads the folder after CreateVM: of two same-named VMs the later one is removed by the run that made it.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import test_vsphere_guests
from test_vsphere_guests import DATASTORE, backend_for, datastore_files, guest, vms, wait

from ansible_collections.virtfleet.core.plugins.module_utils._converge import GuestResult, RunOptions, converge
from ansible_collections.virtfleet.core.plugins.module_utils._model import GuestSpec, GuestState, Placement
from ansible_collections.virtfleet.core.plugins.module_utils._model import guest_spec_from_dict as spec_of
from ansible_collections.virtfleet.core.plugins.module_utils.backends.vsphere import VsphereBackend
from ansible_collections.virtfleet.core.plugins.module_utils.backends.vsphere.guests import existing_files

pytestmark = pytest.mark.lab
# The fixtures of the guest tests: unique names (and clean-up of exactly those), an owner id per test.
names = test_vsphere_guests.names
owner = test_vsphere_guests.owner


def converge_on(backend: VsphereBackend, placement: Placement, guests: list[dict[str, Any]],
                **options: Any) -> list[GuestResult]:
    with backend:
        return converge(backend, [spec_of(g) for g in guests], placement, RunOptions(**options))


def test_two_runs_converging_one_vcenter_at_once_end_in_the_declared_state(lab: dict[str, Any], names: Any) -> None:
    """Two runs (threads, each with its own backend and session) plan the same guests, then both create them at
    the same moment (a barrier per guest inside create_guest). Each guest ends up once, running, with its disk;
    per guest one run reports the creation and the other fails with a line that says why; nothing else in the
    lab is touched."""
    placement = Placement(cluster="DC0_C0")
    with_disk, diskless = names("race-disk"), names("race-nodisk")
    wanted = [guest(with_disk, state="running", disks=[{"name": "root", "size_gib": 1}], tags={"run": "race"}),
              {"name": diskless, "vcpus": 1, "memory_mib": 64, "nics": [{"network": "VM Network"}],
               "state": "running"}]
    before = {n: v["moid"] for n, v in vms(lab, "vcenter").items()}
    barriers = {with_disk: threading.Barrier(2, timeout=60), diskless: threading.Barrier(2, timeout=60)}

    class Racing(VsphereBackend):
        def create_guest(self, spec: GuestSpec, placement: Placement, owner: str = "virtfleet.core") -> GuestState:
            barriers[spec.name].wait()  # both runs planned a create and call CreateVM together
            return super().create_guest(spec, placement, owner)

    results: dict[str, list[GuestResult]] = {}

    def one_run(label: str) -> None:
        backend = backend_for(lab, "vcenter")
        racing = Racing(backend.endpoint, backend.timeout)
        results[label] = converge_on(racing, placement, wanted)

    threads = [threading.Thread(target=one_run, args=(label,)) for label in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert set(results) == {"a", "b"}, "a run did not finish"

    after = vms(lab, "vcenter")
    # What was there before is all still there, unchanged in identity.
    assert {n: after[n]["moid"] for n in before} == before
    for name in (with_disk, diskless):
        outcomes = [next(r for r in results[label] if r.name == name) for label in ("a", "b")]
        assert all(r.action == "create" for r in outcomes)  # both planned the creation
        made = [r for r in outcomes if not r.failed]
        refused = [r for r in outcomes if r.failed]
        assert len(made) == 1 and len(refused) == 1, [(r.failed, r.msg) for r in outcomes]
        assert made[0].changed and made[0].guest is not None and made[0].guest["name"] == name
        assert refused[0].msg and name in refused[0].msg and (
            "another run created a VM of this name" in refused[0].msg or "FileAlreadyExists" in refused[0].msg
            or "DuplicateName" in refused[0].msg), refused[0].msg
        # The VM exists once, in the declared state.
        copies = [v for n, v in vms(lab, "vcenter").items() if n == name]
        assert len(copies) == 1 and copies[0]["power"] == "poweredOn"
    # The surviving VM kept its disk, at this collection's path, recorded as created by it.
    with backend_for(lab, "vcenter") as backend:
        (state,) = [s for s in backend.read_guests(placement) if s.spec.name == with_disk]
        assert [d.name for d in state.spec.disks or []] == ["root"] and state.created_disks == ["root"]
        path = f"[{DATASTORE}] {with_disk}/{with_disk}_root.vmdk"
        browsers = backend._inv.snapshot().browsers()
        assert existing_files(backend._conn, browsers, with_disk, [path]) == {path: None}

    # And a third run finds nothing to do.
    again = converge_on(backend_for(lab, "vcenter"), placement, wanted)
    assert [(r.changed, r.failed) for r in again] == [(False, False), (False, False)], [r.msg for r in again]


def test_a_recreated_guest_picks_up_its_kept_disks(lab: dict[str, Any], names: Any) -> None:
    """absent without remove_storage keeps the disks; the same guest declared again attaches them (before: CreateVM
    failed with FileAlreadyExists on vcsim); they are not counted as created by the new guest."""
    where, placement = "esx01", Placement()
    name = names("kept")
    wanted = guest(name, disks=[{"name": "root", "size_gib": 1}, {"name": "data", "size_gib": 1}])
    first = converge_on(backend_for(lab, where), placement, [wanted])[0]
    assert first.action == "create" and not first.failed, first.msg
    gone = converge_on(backend_for(lab, where), placement, [{"name": name, "state": "absent"}])[0]
    assert gone.action == "remove" and not gone.failed, gone.msg
    assert {f"{name}_root.vmdk", f"{name}_data.vmdk"} <= set(datastore_files(lab, where, name))

    again = converge_on(backend_for(lab, where), placement, [wanted])[0]
    assert again.action == "create" and not again.failed, again.msg
    extra = vms(lab, where)[name]["extra"]
    assert extra["virtfleet.kept.root"] == f"[{DATASTORE}] {name}/{name}_root.vmdk"
    assert "virtfleet.disk.root" not in extra
    assert again.guest is not None and [d["name"] for d in again.guest["disks"]] == ["root", "data"]
    with backend_for(lab, where) as backend:
        (state,) = [s for s in backend.read_guests(placement) if s.spec.name == name]
    assert state.created_disks == [] and state.owner == "virtfleet.core"
    assert not converge_on(backend_for(lab, where), placement, [wanted])[0].changed


def test_a_clone_of_an_owned_guest_owns_nothing_and_exclusive_spares_it(lab: dict[str, Any], names: Any,
                                                                        owner: str) -> None:
    """A clone copies extraConfig (vcsim copies only what the clone spec gives, so the test gives it what vSphere
    copies): the mark names the original's instance UUID, so the clone is not owned, has no created disks, and an
    exclusive run of the same owner leaves it."""
    from pyVmomi import vim

    where, placement = "vcenter", Placement(cluster="DC0_C0")
    source, copy = names("golden"), names("clone")
    made = converge_on(backend_for(lab, where), placement, [guest(source)], owner=owner)[0]
    assert not made.failed, made.msg
    with backend_for(lab, where) as backend:
        (original,) = [s for s in backend.read_guests(placement) if s.spec.name == source]
    assert original.owned_by(owner) and original.created_disks == ["root", "data"]
    with backend_for(lab, where) as backend:
        content = backend._login()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        vm = next(v for v in view.view if v.name == source)
        spec = vim.vm.CloneSpec(location=vim.vm.RelocateSpec(pool=vm.resourcePool),
                                config=vim.vm.ConfigSpec(extraConfig=list(vm.config.extraConfig)))
        info = wait(vm.CloneVM_Task(folder=vm.parent, name=copy, spec=spec))
        assert info.state == "success", info.error
    extra = vms(lab, where)[copy]["extra"]
    assert extra["virtfleet.owner"] == owner and extra["virtfleet.owner.uuid"] != vms(lab, where)[copy]["instance_uuid"]
    with backend_for(lab, where) as backend:
        states = {s.spec.name: s for s in backend.read_guests(placement)}
    # (vcsim 0.24's clone clears the source's disk file names in place, so the source's disk records no longer
    # match its devices here; real vSphere leaves the source alone.)
    assert states[source].owned_by(owner)
    assert states[copy].owner is None and states[copy].created_disks == []

    results = converge_on(backend_for(lab, where), placement, [{"name": source}], owner=owner, exclusive=True)
    assert [(r.name, r.action) for r in results] == [(source, "none")]
    assert copy in vms(lab, where)


def test_exclusive_prunes_only_inside_the_placement(lab: dict[str, Any], names: Any, owner: str) -> None:
    """Owned guests in cluster DC0_C0 and on the standalone host DC0_H0 of one datacenter: an exclusive run placed
    in the cluster removes the cluster's unlisted guest only (before: every owned guest of the datacenter)."""
    where = "vcenter"
    listed, unlisted, elsewhere = names("scope-a"), names("scope-b"), names("scope-h")
    small = {"vcpus": 1, "memory_mib": 64, "nics": [{"network": "VM Network"}]}
    cluster, host = Placement(cluster="DC0_C0"), Placement(esxi_host="DC0_H0")
    for placement, name in ((cluster, listed), (cluster, unlisted), (host, elsewhere)):
        result = converge_on(backend_for(lab, where), placement, [dict(small, name=name)], owner=owner)[0]
        assert not result.failed, result.msg
    results = converge_on(backend_for(lab, where), cluster, [dict(small, name=listed)], owner=owner, exclusive=True)
    assert sorted((r.name, r.action) for r in results) == sorted([(listed, "none"), (unlisted, "remove")])
    present = vms(lab, where)
    assert listed in present and elsewhere in present and unlisted not in present
