# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""Fault injection against vcsim: a simulator of the test's own (its own PID file, address and state) is frozen
(SIGSTOP, by PID) at chosen vSphere calls of a run and thawed (SIGCONT) later; the next run must converge,
no VM may exist twice, and removal with remove_storage must remove exactly what the collection created.

vcsim keeps its inventory in memory only, so killing it would lose every VM whatever the client did: a
frozen endpoint (a hung vCenter, a dropped network) is the fault that can be recovered from and is tested
here. The hook sits in pyVmomi's SOAP stub (the method names vSphere receives), not in the backend.
Figures go to .build/fault-injection-vsphere.json.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

import lab as lab_module

pytest.importorskip("pyVmomi")

from ansible_collections.virtfleet.core.plugins.module_utils._converge import (
    GuestResult,
    RunOptions,
    converge,
)
from ansible_collections.virtfleet.core.plugins.module_utils._endpoints import (
    Credentials,
    parse_endpoint,
    with_credentials,
)
from ansible_collections.virtfleet.core.plugins.module_utils._errors import VirtfleetError
from ansible_collections.virtfleet.core.plugins.module_utils._model import (
    GuestSpec,
    Placement,
    guest_spec_from_dict,
)
from ansible_collections.virtfleet.core.plugins.module_utils._plan import PlanOptions
from ansible_collections.virtfleet.core.plugins.module_utils.backends import guest_backend_for

pytestmark = pytest.mark.lab
REPORT = Path(__file__).resolve().parents[2] / ".build" / "fault-injection-vsphere.json"
FIGURES: list[dict[str, Any]] = []
SIM = lab_module.VcsimEndpoint("faults", "127.0.10.13", "esx", ("-vms", "0"))
PID_NAME = "vcsim-faults"
TIMEOUT = 3.0
THAWS: list[threading.Timer] = []  # the pending SIGCONTs of freeze_at


@pytest.fixture(scope="module")
def sim(lab: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A vcsim ESXi of this module's own, stopped by its PID when the module ends."""
    lab_module.build_vcsim()
    lab_module.start_vcsim(SIM, lab["password"], name=PID_NAME)
    lab_module.wait_for("vcsim-faults", lambda: lab_module.vcsim_answers(SIM.address, SIM.port), timeout=30)
    try:
        yield lab
    finally:
        pid = lab_module.read_pid(PID_NAME)
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        lab_module.stop_pid(PID_NAME)
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        REPORT.write_text(json.dumps(FIGURES, indent=1) + "\n")


def signal_sim(sig: int) -> None:
    pid = lab_module.read_pid(PID_NAME)
    assert pid is not None
    os.kill(pid, sig)


def run(lab: dict[str, Any], specs: list[GuestSpec], **options: Any) -> list[GuestResult] | VirtfleetError:
    plan = PlanOptions(remove_storage=options.pop("remove_storage", False), force=True)
    endpoint = with_credentials(parse_endpoint(f"vsphere://{SIM.address}"),
                                Credentials(lab["username"], lab["password"], False))
    try:
        with guest_backend_for(endpoint, TIMEOUT) as backend:
            return converge(backend, specs, Placement(pool="LocalDS_0"),
                            RunOptions(plan=plan, shutdown_timeout=5, **options))
    except VirtfleetError as exc:
        return exc


def converged(results: Any) -> bool:
    return isinstance(results, list) and not any(r.failed for r in results)


def vm_names(lab: dict[str, Any]) -> list[str]:
    from pyVmomi import vim

    endpoint = with_credentials(parse_endpoint(f"vsphere://{SIM.address}"),
                                Credentials(lab["username"], lab["password"], False))
    with guest_backend_for(endpoint, 10.0) as backend:
        content = backend._login()  # type: ignore[attr-defined]
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        return [vm.name for vm in view.view]


def freeze_at(monkeypatch: pytest.MonkeyPatch, method: str, nth: int, seconds: float) -> list[str]:
    """Freeze the simulator just before the NTH call of METHOD reaches it, thaw it SECONDS later."""
    from pyVmomi import SoapAdapter

    seen: list[str] = []
    original = SoapAdapter.SoapStubAdapter.InvokeMethod

    def invoke(self: Any, mo: Any, info: Any, args: Any, *rest: Any) -> Any:
        if info.wsdlName == method:
            seen.append(method)
            if len(seen) == nth:
                signal_sim(signal.SIGSTOP)
                thaw = threading.Timer(seconds, signal_sim, args=(signal.SIGCONT,))
                THAWS.append(thaw)
                thaw.start()
        return original(self, mo, info, args, *rest)

    monkeypatch.setattr(SoapAdapter.SoapStubAdapter, "InvokeMethod", invoke)
    return seen


def settle(lab: dict[str, Any]) -> None:
    """Until the simulator is thawed and whatever it had queued has run: its VM list the same twice, 1 s apart."""
    while THAWS:
        THAWS.pop().join(60)
    deadline = time.monotonic() + 60
    names = sorted(vm_names(lab))
    while True:
        time.sleep(1)
        now = sorted(vm_names(lab))
        if now == names or time.monotonic() > deadline:
            return
        names = now


def after_fault(lab: dict[str, Any], specs: list[GuestSpec], point: str, first: Any, seen: list[str]) -> None:
    settle(lab)
    again = run(lab, specs)
    rerun = run(lab, specs)
    names = vm_names(lab)
    twice = sorted({n for n in names if names.count(n) > 1})
    lost = sorted({s.name for s in specs if s.state != "absent"} - set(names))
    removal = run(lab, [GuestSpec(name=s.name, state="absent") for s in specs], remove_storage=True)
    left = sorted(set(vm_names(lab)) & {s.name for s in specs})
    FIGURES.append({"fault_point": point, "calls_seen": len(seen), "first_run_failed": not converged(first),
                    "converged": converged(again) and converged(rerun) and not any(r.changed for r in rerun),
                    "objects_lost": len(lost), "duplicates": twice, "left_after_remove": left})
    assert seen, f"{point}: the fault point was never reached"
    assert converged(again), f"{point}: the run after the fault did not converge: {again}"
    assert converged(rerun) and not any(r.changed for r in rerun), f"{point}: not idempotent after the fault"
    assert not twice, f"{point}: VMs exist twice: {twice}"
    assert not lost, f"{point}: lost {lost}"
    assert converged(removal) and not left, f"{point}: removal left {left}: {removal}"


@pytest.fixture()
def prefix() -> str:
    return f"vffault-{uuid.uuid4().hex[:6]}-"


def specs_for(names: list[str], **extra: Any) -> list[GuestSpec]:
    return [guest_spec_from_dict({"name": n, "vcpus": 1, "memory_mib": 64, "disks": [{"name": "root", "size_gib": 1}],
                                  "nics": [{"network": "VM Network"}], **extra}) for n in names]


@pytest.mark.parametrize("method, nth, state", [
    ("CreateVM_Task", 3, "present"),  # mid-run of a 6-guest run
    ("PowerOnVM_Task", 1, "running"),  # between create and start
    ("ReconfigVM_Task", 1, "present"),  # a reconfigure of an existing guest
])
def test_vcsim_frozen_mid_run(sim: dict[str, Any], prefix: str, monkeypatch: pytest.MonkeyPatch, method: str,
                              nth: int, state: str) -> None:
    specs = specs_for([f"{prefix}{i}" for i in range(6 if method == "CreateVM_Task" else 2)], state=state)
    if method == "ReconfigVM_Task":
        assert converged(run(sim, specs))
        specs = specs_for([s.name for s in specs], vcpus=2)
    seen = freeze_at(monkeypatch, method, nth, 2 * TIMEOUT)
    first = run(sim, specs)
    monkeypatch.undo()
    after_fault(sim, specs, f"vcsim frozen at {method} #{nth}", first, seen)


def test_vcsim_frozen_between_power_off_and_destroy(sim: dict[str, Any], prefix: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    specs = specs_for([f"{prefix}0", f"{prefix}1"], state="running")
    assert converged(run(sim, specs))
    seen = freeze_at(monkeypatch, "Destroy_Task", 1, 2 * TIMEOUT)
    first = run(sim, [GuestSpec(name=s.name, state="absent") for s in specs], remove_storage=True)
    monkeypatch.undo()
    settle(sim)
    again = run(sim, [GuestSpec(name=s.name, state="absent") for s in specs], remove_storage=True)
    left = sorted(set(vm_names(sim)) & {s.name for s in specs})
    FIGURES.append({"fault_point": "vcsim frozen at Destroy_Task #1", "calls_seen": len(seen),
                    "first_run_failed": not converged(first), "converged": converged(again), "objects_lost": 0,
                    "duplicates": [], "left_after_remove": left})
    assert seen and converged(again) and not left, f"removal after the fault: {again}, left {left}"
