# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""Two runs converging the same libvirt host at once (two AWX jobs, a pipeline and a person): both `guests`
module runs really run at the same time against the lab's libvirtd, with the same guest list.

The collection relies on create-exclusive semantics rather than a lock: libvirt refuses a second domain of a name
under another uuid, and a volume that exists already; what the other run made is then not ours to delete. So the
end state is the declared one, every guest exists once, no volume is lost, and each run either reports the
change or fails that guest with "created meanwhile by another run".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

import pytest

libvirt = pytest.importorskip("libvirt")

BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"


@pytest.fixture()
def guest_names(names: list[str]) -> list[str]:
    """Four unique names, removed with their volumes afterwards (the shared `names` fixture)."""
    tag = uuid.uuid4().hex[:6]
    names.extend(f"vftest-race-{tag}-{i}" for i in range(4))
    return names


def guests_args(lab: dict[str, Any], names: list[str], vcpus: int) -> dict[str, Any]:
    return {"uri": lab["libvirt"]["uri"], "datastore": lab["libvirt"]["pool"], "domain_type": lab["domain_type"],
            "guests": [{"name": n, "vcpus": vcpus, "memory_mib": 64, "disks": [{"name": "root", "size_gib": 0.01}],
                        "nics": [{"network": lab["libvirt"]["network"]}],
                        "cloud_init": {"meta_data": {"instance-id": n}}, "tags": {"suite": "race"}} for n in names]}


def at_once(args: dict[str, Any], env: dict[str, str], runs: int = 2) -> list[dict[str, Any]]:
    """RUNS `guests` module processes started together; their results. None outlives the call (a run left
    behind would still be changing the lab while the next test, or the teardown, reads it)."""
    cmd = [str(BIN / "ansible"), "localhost", "-m", "virtfleet.core.guests", "-a", json.dumps(args)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for _unused in range(runs)]
    try:
        return [_result(proc) for proc in procs]
    finally:
        for proc in procs:  # each run's process group: ansible, its worker and the module it runs
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(60)


def _result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=600)
    head, sep, body = out.partition(" => ")
    assert sep, f"no result: rc={proc.returncode}\n{out}\n{err}"
    result: dict[str, Any] = json.loads(body[body.index("{"):])
    result["_status"] = head.rsplit("|", 1)[-1].strip()
    return result


def after_first_read(backend: Any, action: Callable[[], Any]) -> None:
    """BACKEND runs ACTION once, right after its first read_guests (the read its plan is made from): what another
    run or a person does between a run's read and its apply. Later reads (the read-back) see the result as it is."""
    read = backend.read_guests
    done: list[bool] = []

    def read_then(placement: Any) -> Any:
        states = read(placement)
        if not done:
            done.append(True)
            action()
        return states

    backend.read_guests = read_then


def per_guest(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["name"]: g for g in result.get("guests", [])}


def assert_declared(conn: Any, lab: dict[str, Any], names: list[str], vcpus: int) -> None:
    listed = [d.name() for d in conn.listAllDomains(0)]
    pool = conn.storagePoolLookupByName(lab["libvirt"]["pool"])
    pool.refresh(0)
    vols = {v.name() for v in pool.listAllVolumes(0)}
    for name in names:
        assert listed.count(name) == 1
        root = ET.fromstring(conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        vcpu = root.find("vcpu")
        assert vcpu is not None and (vcpu.get("current") or vcpu.text) == str(vcpus), name
        assert len(root.findall("./devices/disk/alias[@name='ua-root']")) == 1, f"{name}: root attached twice"
        assert {f"{name}+root.qcow2", f"{name}+cidata.iso"} <= vols, f"{name}: a volume was lost"


def test_two_runs_at_once_end_in_the_declared_state_and_report_honestly(
        lab: dict[str, Any], libvirt_conn: Any, ansible_env: dict[str, str], guest_names: list[str]) -> None:
    results = at_once(guests_args(lab, guest_names, 1), ansible_env)
    assert_declared(libvirt_conn, lab, guest_names, 1)
    for name in guest_names:
        outcomes = [per_guest(r).get(name, {}) for r in results]
        created = [o for o in outcomes if o.get("changed") and not o.get("failed")]
        assert created, f"{name}: no run reports having created it: {outcomes}"
        for outcome in outcomes:
            if outcome.get("failed"):
                assert "created meanwhile by another run" in (outcome.get("msg") or ""), outcome
    for result in results:
        failed = [g for g in result.get("guests", []) if g.get("failed")]
        assert (result["_status"] == "FAILED!") == bool(failed), result
        assert "\n" not in (result.get("msg") or "")

    # Both change the same guests at once: both apply the same change, and the state is still the declared one.
    updates = at_once(guests_args(lab, guest_names, 2), ansible_env)
    assert_declared(libvirt_conn, lab, guest_names, 2)
    for result in updates:
        for name, outcome in per_guest(result).items():
            assert not outcome.get("failed") or "meanwhile" in (outcome.get("msg") or ""), (name, outcome)

    settled = at_once(guests_args(lab, guest_names, 2), ansible_env, runs=1)[0]
    assert settled["changed"] is False, settled


def _converge_after_barrier(uri: str, data: list[dict[str, Any]], pool: str, domain_type: str, barrier: Any,
                            out: Any) -> None:
    """One run in its own process: it reads the host, waits until the other run has read it too (so both plan
    the same creates from the same empty host), then applies. A spawned process (a fork of pytest would copy
    the libvirt event loop thread's locks in whatever state they are): it imports the collection as
    tests/conftest.py does."""
    from ansible.utils.collection_loader._collection_finder import _AnsibleCollectionFinder

    _AnsibleCollectionFinder(paths=[str(BIN.parents[1] / ".build")])._install()
    from ansible_collections.virtfleet.core.plugins.module_utils._converge import RunOptions, converge
    from ansible_collections.virtfleet.core.plugins.module_utils._endpoints import parse_endpoint
    from ansible_collections.virtfleet.core.plugins.module_utils._model import Placement, guest_spec_from_dict
    from ansible_collections.virtfleet.core.plugins.module_utils.backends.libvirt import LibvirtBackend

    with LibvirtBackend(parse_endpoint(uri), 30) as backend:
        after_first_read(backend, lambda: barrier.wait(60))
        results = converge(backend, [guest_spec_from_dict(d) for d in data],
                           Placement(pool=pool, domain_type=domain_type), RunOptions())
    out.put([r.to_dict() for r in results])


def test_two_runs_that_planned_the_same_creates_race_safely(
        lab: dict[str, Any], libvirt_conn: Any, guest_names: list[str]) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    args = guests_args(lab, guest_names, 1)
    data = [{**g, "disks": [{**d, "pool": lab["libvirt"]["pool"]} for d in g["disks"]]} for g in args["guests"]]
    procs = [ctx.Process(target=_converge_after_barrier,
                         args=(lab["libvirt"]["uri"], data, lab["libvirt"]["pool"], lab["domain_type"], barrier, out))
             for _unused in range(2)]
    try:
        for proc in procs:
            proc.start()
        runs = [out.get(timeout=300) for _unused in procs]
    finally:
        for proc in procs:
            proc.join(60)
            if proc.is_alive():
                proc.kill()
                proc.join(60)
    assert_declared(libvirt_conn, lab, guest_names, 1)
    meanwhile = 0
    for name in guest_names:
        outcomes = [next(r for r in run if r["name"] == name) for run in runs]
        assert all(o["action"] == "create" for o in outcomes), "both runs were to plan the create"
        made = [o for o in outcomes if o["changed"] and not o["failed"]]
        lost = [o for o in outcomes if o["failed"]]
        assert len(made) == 1 and len(lost) == 1, f"{name}: exactly one run creates it: {outcomes}"
        assert "created meanwhile by another run" in lost[0]["msg"] and "\n" not in lost[0]["msg"], lost[0]
        meanwhile += 1
    assert meanwhile == len(guest_names)


@pytest.mark.parametrize("running", [False, True], ids=["stopped", "running"])
def test_a_disk_grown_after_the_read_is_never_shrunk_by_the_planned_grow(
        lab: dict[str, Any], libvirt_conn: Any, run_module: Any, guest_names: list[str], running: bool) -> None:
    """Another run (or a person) grows a disk between this run's read and its apply. The planned grow is to a
    smaller size than the disk has now: it is done already, the run succeeds, and the disk keeps its size (a
    resize to the planned size would be refused by libvirt for a volume, and would shrink a running image).
    Found by the first test of this file in CI, with one run reading a guest the other was still creating."""
    from ansible_collections.virtfleet.core.plugins.module_utils._converge import RunOptions, converge
    from ansible_collections.virtfleet.core.plugins.module_utils._endpoints import parse_endpoint
    from ansible_collections.virtfleet.core.plugins.module_utils._model import Placement, guest_spec_from_dict
    from ansible_collections.virtfleet.core.plugins.module_utils.backends.libvirt import LibvirtBackend

    name = guest_names[0]
    base = {"uri": lab["libvirt"]["uri"], "datastore": lab["libvirt"]["pool"], "domain_type": lab["domain_type"]}
    data: dict[str, Any] = {"name": name, "vcpus": 1, "memory_mib": 128, "disks": [{"name": "root", "size_gib": 0.01}],
                            "nics": [{"network": lab["libvirt"]["network"]}]}
    if running:
        data["state"] = "running"
        data["boot"] = {"kernel": lab["guest"]["kernel"], "initrd": lab["guest"]["initrd"],
                        "cmdline": "console=ttyS0 quiet"}
    made = run_module("guest", {**base, **data})
    assert made["changed"] is True and made["_status"] != "FAILED!", made
    meanwhile = int(0.03 * 1024**3)
    vol = libvirt_conn.storagePoolLookupByName(lab["libvirt"]["pool"]).storageVolLookupByName(f"{name}+root.qcow2")
    dom = libvirt_conn.lookupByName(name)

    def capacity() -> int:
        return int(dom.blockInfo("vda", 0)[0]) if running else int(vol.info()[1])

    with LibvirtBackend(parse_endpoint(lab["libvirt"]["uri"]), 30) as backend:
        if running:
            after_first_read(backend, lambda: dom.blockResize("vda", meanwhile, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES))
        else:
            after_first_read(backend, lambda: vol.resize(meanwhile, 0))
        wanted = {**data, "disks": [{"name": "root", "size_gib": 0.02, "pool": lab["libvirt"]["pool"]}]}
        place = Placement(pool=lab["libvirt"]["pool"], domain_type=lab["domain_type"])
        result = converge(backend, [guest_spec_from_dict(wanted)], place, RunOptions())[0].to_dict()
    assert not result["failed"], result
    assert [c["field"] for c in result["changes"]] == ["disks[root].size_gib"], result
    assert capacity() >= meanwhile, "the disk grown meanwhile was shrunk"
    assert run_module("guest", {**base, **data, "disks": [{"name": "root", "size_gib": 0.03}]})["changed"] is False
