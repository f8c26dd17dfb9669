# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""Fault injection against the lab's real libvirtd: the daemon is killed (SIGKILL, by its PID file) at chosen
points of a run, restarted, and the next run must converge; removal with remove_storage must then remove
exactly what the collection created, and nothing else in the pool.

The kill points are hooked at libvirt-python's own classes (the calls the backend makes to the daemon), so
they do not depend on how the backend is written inside. Figures go to .build/fault-injection-libvirt.json.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import lab as lab_module

libvirt = pytest.importorskip("libvirt")

from ansible_collections.virtfleet.core.plugins.module_utils._converge import (  # noqa: E402
    GuestResult,
    RunOptions,
    converge,
)
from ansible_collections.virtfleet.core.plugins.module_utils._endpoints import parse_endpoint  # noqa: E402
from ansible_collections.virtfleet.core.plugins.module_utils._errors import VirtfleetError  # noqa: E402
from ansible_collections.virtfleet.core.plugins.module_utils._model import (  # noqa: E402
    GuestSpec,
    Placement,
    guest_spec_from_dict,
)
from ansible_collections.virtfleet.core.plugins.module_utils._plan import PlanOptions  # noqa: E402
from ansible_collections.virtfleet.core.plugins.module_utils.backends import guest_backend_for  # noqa: E402

REPORT = Path(__file__).resolve().parents[2] / ".build" / "fault-injection-libvirt.json"
FIGURES: list[dict[str, Any]] = []


@pytest.fixture(scope="module")
def own_libvirtd(lab: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if not lab.get("libvirtd_owned"):
        pytest.skip("libvirtd was not started by the lab: it is not ours to kill")
    yield lab
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(FIGURES, indent=1) + "\n")


def kill_libvirtd() -> None:
    pid = lab_module.read_pid("libvirtd")
    assert pid is not None, "the lab's libvirtd has no PID file"
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while lab_module.read_pid("libvirtd") is not None and time.monotonic() < deadline:
        time.sleep(0.05)


def restart_libvirtd() -> None:
    lab_module.ensure_libvirtd()
    lab_module.wait_for("libvirtd", lab_module.libvirt_answers, timeout=30)


def connect(lab: dict[str, Any]) -> Any:
    return libvirt.open(lab["libvirt"]["uri"])


def run(lab: dict[str, Any], specs: list[GuestSpec], **options: Any) -> list[GuestResult] | VirtfleetError:
    """One converge run in this process (so the hooks apply), as the guests module would make it."""
    plan = PlanOptions(remove_storage=options.pop("remove_storage", False), force=True)
    try:
        with guest_backend_for(parse_endpoint(lab["libvirt"]["uri"]), 10.0) as backend:
            return converge(backend, specs, Placement(pool=lab["libvirt"]["pool"], domain_type=lab["domain_type"]),
                            RunOptions(plan=plan, shutdown_timeout=5, **options))
    except VirtfleetError as exc:  # the daemon died before or while reading: the whole run failed
        return exc


def specs_for(lab: dict[str, Any], names: list[str], **extra: Any) -> list[GuestSpec]:
    return [guest_spec_from_dict({"name": n, "vcpus": 1, "memory_mib": 64, "disks": [{"name": "root", "size_gib": 1}],
                                  "nics": [{"network": lab["libvirt"]["network"]}], **extra}) for n in names]


def ours(conn: Any, lab: dict[str, Any], prefix: str) -> tuple[set[str], set[str]]:
    """(domains, volumes) whose names start with PREFIX."""
    pool = conn.storagePoolLookupByName(lab["libvirt"]["pool"])
    pool.refresh(0)
    domains = {d.name() for d in conn.listAllDomains(0) if d.name().startswith(prefix)}
    return domains, {v.name() for v in pool.listAllVolumes(0) if v.name().startswith(prefix)}


@pytest.fixture()
def prefix(own_libvirtd: dict[str, Any]) -> Iterator[str]:
    """A unique name prefix; whatever is left under it afterwards is removed (the daemon is up again)."""
    value = f"vffault-{uuid.uuid4().hex[:6]}-"
    yield value
    if lab_module.read_pid("libvirtd") is None:
        restart_libvirtd()
    conn = connect(own_libvirtd)
    try:
        for dom in conn.listAllDomains(0):
            if dom.name().startswith(value):
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
        pool = conn.storagePoolLookupByName(own_libvirtd["libvirt"]["pool"])
        pool.refresh(0)
        for vol in pool.listAllVolumes(0):
            if vol.name().startswith(value):
                vol.delete(0)
    finally:
        conn.close()


def hook(monkeypatch: pytest.MonkeyPatch, cls: Any, method: str, when: Callable[[int], bool],
         before: bool) -> list[int]:
    """Kill libvirtd around the Nth call of CLS.METHOD (before it reaches the daemon, or after it returned)."""
    calls: list[int] = []
    original = getattr(cls, method)

    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        fire = when(len(calls)) and lab_module.read_pid("libvirtd") is not None
        if fire and before:
            kill_libvirtd()
        result = original(self, *args, **kwargs)
        if fire and not before:
            kill_libvirtd()
        return result

    monkeypatch.setattr(cls, method, wrapper)
    return calls


def converged(results: Any) -> bool:
    return isinstance(results, list) and not any(r.failed for r in results)


def finish_and_remove(lab: dict[str, Any], specs: list[GuestSpec], prefix: str, point: str, canary: str,
                      running: bool = False) -> None:
    """After a fault: the daemon back, the next run converges, a rerun changes nothing, removal removes exactly
    what was created (no volume left, the canary volume kept). Records the figures."""
    restart_libvirtd()
    again = run(lab, specs)
    assert converged(again), f"{point}: the run after the fault did not converge: {again}"
    rerun = run(lab, specs)
    assert converged(rerun) and not any(r.changed for r in rerun), f"{point}: not idempotent after the fault"
    conn = connect(lab)
    try:
        domains, _volumes = ours(conn, lab, prefix)
        lost = len({s.name for s in specs} - domains)
        if running:
            active = {d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}
            lost += len({s.name for s in specs} - active)
        removal = run(lab, [GuestSpec(name=s.name, state="absent") for s in specs], remove_storage=True)
        assert converged(removal), f"{point}: removal failed: {removal}"
        domains, volumes = ours(conn, lab, prefix)
        canary_kept = canary in volumes
        volumes.discard(canary)
    finally:
        conn.close()
    FIGURES.append({"kill_point": point, "converged": True, "objects_lost": lost,
                    "left_after_remove_storage": sorted(domains | volumes), "foreign_volume_kept": canary_kept})
    assert lost == 0, f"{point}: {lost} guest(s) lost"
    assert not domains and not volumes, f"{point}: remove_storage left {sorted(domains | volumes)}"
    assert canary_kept, f"{point}: a volume the collection did not create was deleted"


@pytest.fixture()
def canary(own_libvirtd: dict[str, Any], prefix: str) -> Iterator[str]:
    """A volume in the pool that the collection did not create, named like the test's guests' storage."""
    name = f"{prefix}g00+foreign.qcow2"
    conn = connect(own_libvirtd)
    pool = conn.storagePoolLookupByName(own_libvirtd["libvirt"]["pool"])
    pool.createXML(f"<volume><name>{name}</name><capacity unit='M'>1</capacity>"
                   "<target><format type='qcow2'/></target></volume>", 0)
    conn.close()
    yield name
    # the prefix fixture removes it


@pytest.mark.lab
def test_libvirtd_killed_during_a_20_guest_run(own_libvirtd: dict[str, Any], prefix: str, canary: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    lab = own_libvirtd
    specs = specs_for(lab, [f"{prefix}g{i:02d}" for i in range(20)])
    calls = hook(monkeypatch, libvirt.virStoragePool, "createXML", lambda n: n == 10, before=False)
    first = run(lab, specs)
    monkeypatch.undo()
    assert len(calls) >= 10 and not converged(first), "the kill did not interrupt the run"
    finish_and_remove(lab, specs, prefix, "libvirtd killed after the 10th volume of a 20-guest run", canary)


@pytest.mark.lab
@pytest.mark.parametrize("nth", [1, 2])
def test_libvirtd_killed_between_define_and_volume_creation(own_libvirtd: dict[str, Any], prefix: str,
                                                            canary: str, monkeypatch: pytest.MonkeyPatch,
                                                            nth: int) -> None:
    """The backend defines a new guest first, then makes its volumes: killed before the first or the second
    volume, the guest is defined and lists volumes that do not exist yet."""
    lab = own_libvirtd
    specs = specs_for(lab, [f"{prefix}g01"], disks=[{"name": "root", "size_gib": 1}, {"name": "data", "size_gib": 1}])
    defined = hook(monkeypatch, libvirt.virConnect, "defineXML", lambda n: False, before=False)
    made = hook(monkeypatch, libvirt.virStoragePool, "createXML", lambda n: n == nth and bool(defined), before=True)
    first = run(lab, specs)
    monkeypatch.undo()
    assert defined and len(made) == nth and not converged(first), "the kill must fall after the define"
    finish_and_remove(lab, specs, prefix, f"libvirtd killed between define and volume {nth} of 2", canary)


@pytest.mark.lab
def test_libvirtd_killed_between_create_and_start(own_libvirtd: dict[str, Any], prefix: str, canary: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    lab = own_libvirtd
    specs = specs_for(lab, [f"{prefix}g01", f"{prefix}g02"], state="running")
    hook(monkeypatch, libvirt.virDomain, "create", lambda n: n == 1, before=True)
    first = run(lab, specs)
    monkeypatch.undo()
    assert not converged(first)
    finish_and_remove(lab, specs, prefix, "libvirtd killed between create and start", canary, running=True)


@pytest.mark.lab
def test_libvirtd_killed_while_removing_with_storage(own_libvirtd: dict[str, Any], prefix: str,
                                                     canary: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lab = own_libvirtd
    specs = specs_for(lab, [f"{prefix}g01"], disks=[{"name": "root", "size_gib": 1}, {"name": "data", "size_gib": 1}])
    assert converged(run(lab, specs))
    hook(monkeypatch, libvirt.virStorageVol, "delete", lambda n: n == 1, before=True)
    removal = run(lab, [GuestSpec(name=s.name, state="absent") for s in specs], remove_storage=True)
    monkeypatch.undo()
    assert not converged(removal)
    restart_libvirtd()
    # The next run is the same removal: it must converge and leave nothing the collection created.
    again = run(lab, [GuestSpec(name=s.name, state="absent") for s in specs], remove_storage=True)
    conn = connect(lab)
    try:
        domains, volumes = ours(conn, lab, prefix)
        canary_kept = canary in volumes
        volumes.discard(canary)
    finally:
        conn.close()
    FIGURES.append({"kill_point": "libvirtd killed while removing, before the first volume deletion",
                    "converged": converged(again), "objects_lost": 0,
                    "left_after_remove_storage": sorted(domains | volumes), "foreign_volume_kept": canary_kept})
    assert converged(again), f"the removal after the fault did not converge: {again}"
    assert not domains and not volumes, f"remove_storage left {sorted(domains | volumes)} after the fault"
    assert canary_kept
