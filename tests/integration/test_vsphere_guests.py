# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""Guest convergence on vSphere against the lab's vcsim (vCenter 127.0.10.10 and ESXi esx01): create, check mode
predicts the read-back exactly, idempotence, live growth, restart-only changes, power, removal with and without
storage, exclusive runs that only remove guests this collection owns."""

from __future__ import annotations

import time
import uuid
from typing import Any, Iterator

import pytest

from ansible_collections.virtfleet.core.plugins.module_utils._converge import GuestResult, RunOptions, converge
from ansible_collections.virtfleet.core.plugins.module_utils._endpoints import (
    Credentials,
    parse_endpoint,
    with_credentials,
)
from ansible_collections.virtfleet.core.plugins.module_utils._errors import ConfigError
from ansible_collections.virtfleet.core.plugins.module_utils._model import Placement, guest_spec_from_dict
from ansible_collections.virtfleet.core.plugins.module_utils._plan import PlanOptions
from ansible_collections.virtfleet.core.plugins.module_utils.backends.vsphere import VsphereBackend

pytestmark = pytest.mark.lab
PREFIX = "vftest-vs-"
DATASTORE = "LocalDS_0"


def backend_for(lab: dict[str, Any], name: str) -> VsphereBackend:
    address = lab["vcsim"][name]["address"]
    endpoint = with_credentials(parse_endpoint(f"vsphere://{address}"),
                                Credentials(lab["username"], lab["password"], False))
    return VsphereBackend(endpoint, 10)


def run(lab: dict[str, Any], where: str, placement: Placement, guests: list[dict[str, Any]],
        **options: Any) -> list[GuestResult]:
    with backend_for(lab, where) as backend:
        results = converge(backend, [guest_spec_from_dict(g) for g in guests], placement, RunOptions(**options))
    return results


def one(lab: dict[str, Any], where: str, placement: Placement, guest: dict[str, Any], **options: Any) -> GuestResult:
    result = run(lab, where, placement, [guest], **options)[0]
    assert not result.failed, result.msg
    return result


def vms(lab: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """name -> a few facts of every VM, straight from the endpoint (not through the backend under test)."""
    from pyVmomi import vim

    with backend_for(lab, where) as backend:
        content = backend._login()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        return {vm.name: {"power": vm.runtime.powerState, "cpu_hot_add": vm.config.cpuHotAddEnabled,
                          "memory_hot_add": vm.config.memoryHotAddEnabled,
                          "extra": {o.key: o.value for o in vm.config.extraConfig},
                          "compute": vm.resourcePool.parent.name if vm.resourcePool else None,
                          "instance_uuid": vm.config.instanceUuid, "moid": vm._moId}
                for vm in view.view}


def datastore_files(lab: dict[str, Any], where: str, directory: str) -> list[str]:
    """File names in [LocalDS_0] DIRECTORY, through the datastore browser ([] when the directory is gone)."""
    from pyVmomi import vim

    with backend_for(lab, where) as backend:
        content = backend._login()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.Datastore], True)
        datastore = next(ds for ds in view.view if ds.name == DATASTORE)
        task = datastore.browser.SearchDatastore_Task(f"[{DATASTORE}] {directory}",
                                                      vim.host.DatastoreBrowser.SearchSpec(matchPattern=["*"]))
        while task.info.state in ("queued", "running"):
            time.sleep(0.05)
        if task.info.state == "error":
            return []
        return sorted(f.path for f in task.info.result.file or [])


def clean(lab: dict[str, Any], where: str, names: list[str]) -> None:
    """Destroy the VMs named NAMES and delete their files and directories (vcsim names a second directory of a
    name 'NAME (0)'), leaving everything else in the lab (the demo's guests, other tests') alone."""
    from pyVmomi import vim

    if not names:
        return
    with backend_for(lab, where) as backend:
        content = backend._login()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        for vm in view.view:
            if vm.name in names:
                if vm.runtime.powerState != "poweredOff":
                    wait(vm.PowerOffVM_Task())
                wait(vm.Destroy_Task())
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.Datastore], True)
        datastore = next(ds for ds in view.view if ds.name == DATASTORE)
        task = datastore.browser.SearchDatastore_Task(f"[{DATASTORE}]", vim.host.DatastoreBrowser.SearchSpec(
            matchPattern=[n + "*" for n in names]))
        wait(task)
        dcs = content.viewManager.CreateContainerView(content.rootFolder, [vim.Datacenter], True).view
        for info in (task.info.result.file or []) if task.info.state == "success" else []:
            # Not waited for: vcsim's task names the FileManager as its entity, which pyVmomi cannot read.
            content.fileManager.DeleteDatastoreFile_Task(f"[{DATASTORE}] {info.path}", dcs[0])


def wait(task: Any) -> Any:
    while task.info.state in ("queued", "running"):
        time.sleep(0.05)
    return task.info


@pytest.fixture()
def names(lab: dict[str, Any]) -> Iterator[Any]:
    """Unique guest names; the test's VMs and files (only those) are removed afterwards, whatever happened."""
    token = uuid.uuid4().hex[:6]
    made: list[str] = []

    def name(label: str) -> str:
        made.append(f"{PREFIX}{label}-{token}")
        return made[-1]

    yield name
    for where in ("vcenter", "esx01"):
        clean(lab, where, made)


@pytest.fixture()
def owner() -> str:
    """An owner id of this test alone: an exclusive run prunes only what this test created."""
    return f"vftest-{uuid.uuid4().hex[:8]}"


def guest(name: str, **extra: Any) -> dict[str, Any]:
    data = {
        "name": name, "vcpus": 1, "memory_mib": 512,
        "disks": [{"name": "root", "size_gib": 2}, {"name": "data", "size_gib": 1.5}],
        "nics": [{"network": "VM Network"}],
        "tags": {"role": "web", "tier": "front"},
        "cloud_init": {"user_data": "#cloud-config\nhostname: web\n", "meta_data": "local-hostname: web\n",
                       "network_config": "version: 2\nethernets: {}\n"},
    }
    data.update(extra)
    return data


def without_uuid(facts: dict[str, Any] | None) -> dict[str, Any]:
    assert facts is not None
    return {k: v for k, v in facts.items() if k != "uuid"}


def test_lifecycle_on_a_vcenter_cluster(lab: dict[str, Any], names: Any) -> None:
    where, placement = "vcenter", Placement(cluster="DC0_C0")
    name = names("life")
    spec = guest(name)

    predicted = one(lab, where, placement, spec, check_mode=True)
    assert predicted.action == "create" and name not in vms(lab, where)  # check mode changed nothing
    created = one(lab, where, placement, spec)
    assert created.changed and created.action == "create"
    assert without_uuid(created.guest) == without_uuid(predicted.guest)  # check mode is exact
    assert created.guest is not None and created.guest["uuid"]
    assert created.guest["nics"][0]["mac"].startswith("00:50:56:")
    vm = vms(lab, where)[name]
    assert vm["cpu_hot_add"] and vm["memory_hot_add"]
    assert vm["extra"]["virtfleet.owner"] == "virtfleet.core"
    assert vm["extra"]["virtfleet.owner.uuid"] == vm["instance_uuid"]  # the mark names the VM it is on
    assert vm["extra"]["guestinfo.userdata.encoding"] == "base64"
    assert vm["extra"]["guestinfo.metadata.encoding"] == "base64"
    assert vm["compute"] == "DC0_C0"

    again = one(lab, where, placement, spec)
    assert not again.changed and again.changes == []

    running = one(lab, where, placement, dict(spec, state="running"))
    assert [c["field"] for c in running.changes] == ["power_state"]
    assert vms(lab, where)[name]["power"] == "poweredOn"

    # Growth is live on a running guest (hot-add is on), and only the named disk changes.
    disks = [{"name": "root", "size_gib": 2}, {"name": "data", "size_gib": 3}]
    grown = one(lab, where, placement, guest(name, state="running", vcpus=2, disks=disks))
    assert {c["field"]: c["live"] for c in grown.changes} == {"vcpus": True, "disks[data].size_gib": True}
    assert not grown.restart_required
    assert grown.guest is not None and grown.guest["vcpus"] == 2
    assert [d["size_gib"] for d in grown.guest["disks"]] == [2.0, 3.0]

    # Firmware is read at power-on: on a running guest it needs a restart, which vSphere cannot defer.
    uefi = guest(name, state="running", vcpus=2, firmware="uefi", disks=disks)
    # ... so it is refused while planning, before any call that changes something.
    with pytest.raises(ConfigError, match=r"firmware='uefi': cannot change while the guest runs"):
        run(lab, where, placement, [uefi])
    assert vms(lab, where)[name]["power"] == "poweredOn"
    restarted = one(lab, where, placement, uefi, plan=PlanOptions(allow_restart=True))
    assert [c["field"] for c in restarted.changes] == ["firmware", "power_state"]
    assert restarted.guest is not None and restarted.guest["firmware"] == "uefi"
    assert vms(lab, where)[name]["power"] == "poweredOn"

    untagged = one(lab, where, placement, guest(name, state="running", vcpus=2, tags={"role": "db"}, disks=disks))
    assert untagged.guest is not None and untagged.guest["tags"] == {"role": "db"}

    stopped = one(lab, where, placement, guest(name, state="stopped", vcpus=2, disks=disks))
    assert stopped.changed and vms(lab, where)[name]["power"] == "poweredOff"

    # absent without remove_storage: the VM is unregistered, its disks stay on the datastore.
    gone = one(lab, where, placement, {"name": name, "state": "absent"})
    assert gone.action == "remove" and name not in vms(lab, where)
    assert {f"{name}_root.vmdk", f"{name}_data.vmdk"} <= set(datastore_files(lab, where, name))


def test_remove_storage_deletes_only_created_disks_and_exclusive_spares_foreign_vms(
        lab: dict[str, Any], names: Any, owner: str) -> None:
    where, placement = "esx01", Placement()
    keep, drop = names("keep"), names("drop")
    results = run(lab, where, placement, [guest(keep), guest(drop, disks=[{"name": "root", "size_gib": 1}])],
                  owner=owner)
    unowned = {n for n, vm in vms(lab, where).items() if vm["extra"].get("virtfleet.owner") != owner}
    assert [r.action for r in results] == ["create", "create"] and not any(r.failed for r in results)
    assert f"{drop}_root.vmdk" in datastore_files(lab, where, drop)

    # Exclusive: guests owned by this owner and not listed go (here with their storage); the simulator's own
    # VMs (ha-host_VM0, ...) carry no ownership mark, and other owners' guests (the demo's) are not this run's.
    results = run(lab, where, placement, [guest(keep)], exclusive=True, plan=PlanOptions(remove_storage=True),
                  owner=owner)
    by_name = {r.name: r for r in results}
    assert by_name[keep].action == "none"
    assert by_name[drop].action == "remove" and not by_name[drop].failed
    after = set(vms(lab, where))
    assert drop not in after and keep in after
    assert unowned <= after  # no guest without this collection's ownership mark was touched
    assert {r.name for r in results if r.action == "remove"}.isdisjoint(unowned)
    assert datastore_files(lab, where, drop) == []


def test_no_op_converge_of_twenty_guests_is_a_constant_number_of_calls(lab: dict[str, Any], names: Any) -> None:
    where, placement = "esx01", Placement()
    specs = [{"name": names(f"n{i:02d}"), "vcpus": 1, "memory_mib": 64, "disks": [{"name": "root", "size_gib": 1}],
              "nics": [{"network": "VM Network"}]} for i in range(20)]
    results = run(lab, where, placement, specs)
    assert all(r.action == "create" and not r.failed for r in results), [r.msg for r in results if r.failed]
    with backend_for(lab, where) as backend:
        results = converge(backend, [guest_spec_from_dict(s) for s in specs], placement, RunOptions())
        calls = backend.calls
    assert not any(r.changed for r in results)
    assert calls == 4  # service content, login, one view, one RetrievePropertiesEx


def test_bad_placement_names_the_option(lab: dict[str, Any], names: Any) -> None:
    from ansible_collections.virtfleet.core.plugins.module_utils._errors import ConfigError

    with pytest.raises(ConfigError, match=r"cluster='nope': no such cluster in datacenter 'DC0' \(known: DC0_C0\)"):
        run(lab, "vcenter", Placement(cluster="nope"), [guest(names("bad"))], check_mode=True)
    with pytest.raises(ConfigError, match=r"pool='nope': no such datastore"):
        run(lab, "esx01", Placement(pool="nope"), [guest(names("bad"))], check_mode=True)
    with pytest.raises(ConfigError, match=r"guest '.*' boot=.*direct kernel boot is libvirt-only"):
        run(lab, "esx01", Placement(), [guest(names("bad"), boot={"kernel": "/vmlinuz"})], check_mode=True)


def test_guests_module_on_esxi_check_diff_rerun_and_bad_input(lab: dict[str, Any], names: Any,
                                                              run_module: Any) -> None:
    """The module end to end on a simulated ESXi: check mode and diff, then the real run, then a no-op rerun."""
    first, second = names("mod-a"), names("mod-b")
    conn = {"uri": f"vsphere://{lab['vcsim']['esx01']['address']}", "username": lab["username"],
            "password": lab["password"], "validate_certs": False, "datastore": DATASTORE}
    wanted = [{"name": n, "vcpus": 1, "memory_mib": 64, "disks": [{"name": "root", "size_gib": 1}],
               "nics": [{"network": "VM Network"}], "tags": {"suite": "module"}, "state": "running"}
              for n in (first, second)]
    planned = run_module("guests", {**conn, "guests": wanted}, check=True, diff=True)
    assert planned["changed"] is True and first not in vms(lab, "esx01")
    assert '"vmxnet3"' in planned["_diff_text"] and lab["password"] not in planned["_diff_text"]
    done = run_module("guests", {**conn, "guests": wanted}, diff=True)
    assert [g["changes"] for g in done["guests"]] == [g["changes"] for g in planned["guests"]]
    for real, predicted in zip(done["guests"], planned["guests"]):
        assert {k: v for k, v in real["guest"].items() if k != "uuid"} == \
            {k: v for k, v in predicted["guest"].items() if k != "uuid"}
    assert vms(lab, "esx01")[first]["power"] == "poweredOn"
    assert run_module("guests", {**conn, "guests": wanted})["changed"] is False

    bad = run_module("guests", {**conn, "guests": [*wanted, {**wanted[0], "name": names("mod-c"),
                                                             "nics": [{"network": "No Such Net"}]}]})
    assert bad["_status"] == "FAILED!" and "nics[0].network='No Such Net'" in bad["msg"]
    assert names("mod-c") not in vms(lab, "esx01")
    assert lab["password"] not in str(bad)
