# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""The planner and the runner, with a fake backend at the contract boundary (no hypervisor library)."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest

from ansible_collections.virtfleet.core.plugins.module_utils._converge import RunOptions, converge
from ansible_collections.virtfleet.core.plugins.module_utils._errors import ConfigError
from ansible_collections.virtfleet.core.plugins.module_utils._model import (
    OWNER_TAG,
    GuestSpec,
    GuestState,
    HostCapacity,
    Placement,
    guest_spec_from_dict,
)
from ansible_collections.virtfleet.core.plugins.module_utils._plan import (
    BackendDefaults,
    GuestPlan,
    Planner,
    PlanOptions,
    generated_mac,
)
from ansible_collections.virtfleet.core.plugins.module_utils.backends.base import GuestBackend

CAPACITY = HostCapacity(vcpus=8, memory_mib=16384, networks=["lan", "dmz"], pools=["default", "fast"],
                        default_pool="default", macs={"52:54:00:00:00:99": "other"})


def spec(**data: Any) -> GuestSpec:
    return guest_spec_from_dict({"name": "web01", **data})


def existing(power: str = "running", **data: Any) -> GuestState:
    base = {"vcpus": 2, "memory_mib": 2048, "firmware": "bios", "autostart": False, "tags": {"role": "web"},
            "disks": [{"name": "root", "size_gib": 10, "pool": "default", "format": "qcow2", "bus": "virtio"}],
            "nics": [{"network": "lan", "mac": "52:54:00:00:00:01", "model": "virtio"}]}
    base.update(data)
    return GuestState(spec=spec(**base), power_state=power, owner=OWNER_TAG, created_disks=["root"], max_vcpus=8,
                      max_memory_mib=2048)


def planner(**options: Any) -> Planner:
    return Planner(CAPACITY, BackendDefaults(), PlanOptions(**options))


def test_same_values_in_other_units_and_order_plan_nothing() -> None:
    desired = spec(vcpus=2, memory_mib=2048, disks=[{"name": "root", "size_gib": 10.0}],
                   nics=[{"network": "lan"}], tags={"role": "web"})
    plan = planner().plan(desired, existing())
    assert plan.changes == [] and plan.action == "none" and not plan.restart_required


def test_only_fields_the_user_set_are_compared() -> None:
    plan = planner().plan(spec(vcpus=2), existing(firmware="uefi", autostart=True))
    assert plan.changes == []


def test_growth_within_hot_add_limits_is_live_and_memory_beyond_them_waits_for_a_restart() -> None:
    plan = planner().plan(spec(vcpus=4, memory_mib=4096), existing())
    assert [(c.field, c.live) for c in plan.changes] == [("vcpus", True), ("memory_mib", False)]
    assert plan.restart_required and plan.power is None


def test_a_stopped_guest_has_nothing_to_restart() -> None:
    plan = planner().plan(spec(memory_mib=4096, firmware="uefi"), existing(power="stopped"))
    assert all(c.live for c in plan.changes) and not plan.restart_required


def test_allow_restart_turns_a_pending_change_into_a_restart() -> None:
    plan = planner(allow_restart=True).plan(spec(firmware="uefi", state="running"), existing())
    assert plan.power == "restart" and not plan.restart_required
    assert plan.changes[-1].field == "power_state"


def test_disk_grow_is_live_add_is_live_shrink_is_refused() -> None:
    plan = planner().plan(spec(disks=[{"name": "root", "size_gib": 20}, {"name": "data", "size_gib": 5}]),
                          existing())
    assert [(c.field, c.live) for c in plan.changes] == [("disks[root].size_gib", True), ("disks[data]", True)]
    assert plan.changes[1].after["pool"] == "default" and plan.changes[1].after["format"] == "qcow2"
    with pytest.raises(ConfigError, match=r"guest 'web01' disks\[0\].size_gib=5.0: disk 'root' is 10 GiB"):
        planner().plan(spec(disks=[{"name": "root", "size_gib": 5}]), existing())


def test_nics_match_by_mac_or_network_and_new_ones_get_a_stable_mac() -> None:
    unchanged = planner().plan(spec(nics=[{"network": "lan"}]), existing())
    assert unchanged.changes == []
    moved = planner().plan(spec(nics=[{"network": "dmz", "mac": "52:54:00:00:00:01"}]), existing())
    assert [(c.field, c.after, c.live) for c in moved.changes] == [("nics[52:54:00:00:00:01].network", "dmz", True)]
    added = planner().plan(spec(nics=[{"network": "lan"}, {"network": "lan"}]), existing())
    again = planner().plan(spec(nics=[{"network": "lan"}, {"network": "lan"}]), existing())
    assert added.changes[0].field == again.changes[0].field, "a generated MAC must be the same in every run"


def test_generated_vmware_macs_stay_in_the_manual_range() -> None:
    for i in range(50):
        mac = generated_mac("00:50:56", f"vm{i}", 0, set())
        assert mac.startswith("00:50:56:") and int(mac.split(":")[3], 16) <= 0x3F


@pytest.mark.parametrize(("data", "message"), [
    ({"vcpus": 9}, r"vcpus=9: more than the host's 8 logical CPUs"),
    ({"memory_mib": 20000}, r"memory_mib=20000: more than the host's 16384 MiB"),
    ({"nics": [{"network": "nope"}]}, r"nics\[0\].network='nope': no such network"),
    ({"disks": [{"name": "d", "size_gib": 1, "pool": "nope"}]}, r"disks\[0\].pool='nope': no such pool"),
    ({"disks": [{"name": "d"}]}, r"disks\[0\].size_gib=None: a new disk needs size_gib or source"),
    ({"nics": [{"network": "lan", "mac": "52:54:00:00:00:99"}]},
     r"nics\[0\].mac='52:54:00:00:00:99': already used by guest 'other'"),
])
def test_host_checks_name_the_guest_and_field(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=r"guest 'new01' " + message):
        planner().plan(guest_spec_from_dict({"name": "new01", **data}), None)


@pytest.mark.parametrize(("data", "message"), [
    ({"vcpus": 0}, r"guest 'web01' vcpus=0: must be greater than zero"),
    ({"memory_mib": -5}, r"memory_mib=-5: must be greater than zero"),
    ({"vcpus": 1.5}, r"vcpus=1.5: must be an integer"),
    ({"disks": [{"name": "a", "size_gib": 1}, {"name": "a", "size_gib": 1}]}, r"disks\[1\].name='a': duplicate"),
    ({"nics": [{"network": "lan", "mac": "zz:54:00:00:00:01"}]}, r"nics\[0\].mac='zz:54:00:00:00:01': is not a MAC"),
    ({"nics": [{"network": "lan", "mac": "01:00:5e:00:00:01"}]}, r"multicast"),
    ({"nics": [{"network": "lan", "mac": "52:54:00:00:00:01"}, {"network": "dmz", "mac": "52-54-00-00-00-01"}]},
     r"nics\[1\].mac='52-54-00-00-00-01': duplicate MAC"),
    ({"firmware": "coreboot"}, r"firmware='coreboot': must be one of bios, uefi"),
    ({"colour": "blue"}, r"guest 'web01' .colour='blue': unknown option"),
    ({"disks": [{"name": "a", "size": 1}]}, r"disks\[0\].size=1: unknown option"),
    ({"tags": {"role": ""}}, r"tags.role='': tag values must not be empty"),
    ({"uuid": "not-a-uuid"}, r"uuid='not-a-uuid': must be a UUID"),
    ({"boot": {"initrd": "/x"}}, r"boot.kernel=None: is required"),
])
def test_bad_guest_input_is_one_line_naming_guest_and_field(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        spec(**data)
    assert "\n" not in str(err.value)


def test_bad_name() -> None:
    with pytest.raises(ConfigError, match=r"name='bad name!'"):
        guest_spec_from_dict({"name": "bad name!"})


# ---------------------------------------------------------------------------------------- runner + check mode
class FakeBackend(GuestBackend):
    """Holds guests in memory. In check mode any mutator call fails the test."""

    api = "fake"

    def __init__(self, states: list[GuestState], forbid_mutators: bool = False) -> None:
        from ansible_collections.virtfleet.core.plugins.module_utils._endpoints import parse_endpoint

        super().__init__(parse_endpoint("test:///default", "uri"))
        self.states = {s.spec.name: s for s in states}
        self.forbid = forbid_mutators
        self.mutations: list[str] = []

    def identify(self) -> Any:
        raise NotImplementedError

    def discover(self, guests: bool = True) -> Any:
        raise NotImplementedError

    def capacity(self, placement: Placement) -> HostCapacity:
        return copy.deepcopy(CAPACITY)

    def read_guests(self, placement: Placement) -> list[GuestState]:
        return [copy.deepcopy(s) for s in self.states.values()]

    def _mutate(self, what: str) -> None:
        if self.forbid:
            raise AssertionError(f"mutator {what} called in check mode")
        self.mutations.append(what)

    def create_guest(self, spec: GuestSpec, placement: Placement, owner: str) -> GuestState:
        self._mutate(f"create {spec.name}")
        self.states[spec.name] = GuestState(spec=dataclasses.replace(spec, state="present",
                                                                     uuid=spec.uuid or "0000-new"),
                                            power_state="stopped", owner=owner)
        return self.states[spec.name]

    def update_guest(self, current: GuestState, plan: GuestPlan) -> None:
        self._mutate(f"update {current.spec.name}")
        assert plan.after is not None
        self.states[current.spec.name].spec = plan.after

    def start_guest(self, current: GuestState) -> None:
        self._mutate(f"start {current.spec.name}")
        self.states[current.spec.name].power_state = "running"

    def stop_guest(self, current: GuestState, timeout: float, force: bool) -> None:
        self._mutate(f"stop {current.spec.name}")
        self.states[current.spec.name].power_state = "stopped"

    def remove_guest(self, current: GuestState, remove_storage: bool) -> None:
        self._mutate(f"remove {current.spec.name}")
        del self.states[current.spec.name]


def scenario() -> tuple[list[GuestState], list[GuestSpec]]:
    unowned = existing(power="running")
    unowned.spec.name, unowned.owner = "legacy", None
    orphan = existing(power="stopped")
    orphan.spec.name = "orphan"
    states = [existing(), unowned, orphan]
    specs = [spec(vcpus=4, memory_mib=4096, disks=[{"name": "root", "size_gib": 20}], state="running"),
             guest_spec_from_dict({"name": "new01", "vcpus": 2, "disks": [{"name": "root", "size_gib": 5}],
                                   "nics": [{"network": "lan"}], "state": "running"})]
    return states, specs


def run(backend: FakeBackend, specs: list[GuestSpec], check: bool) -> list[dict[str, Any]]:
    options = RunOptions(plan=PlanOptions(remove_storage=True), exclusive=True, check_mode=check)
    return [r.to_dict() for r in converge(backend, specs, Placement(), options)]


def test_check_mode_calls_no_mutator_and_reports_what_the_real_run_does() -> None:
    states, specs = scenario()
    checked = run(FakeBackend(copy.deepcopy(states), forbid_mutators=True), specs, check=True)
    real_backend = FakeBackend(copy.deepcopy(states))
    real = run(real_backend, specs, check=False)
    assert sorted(real_backend.mutations) == ["create new01", "remove orphan", "start new01", "update web01"]
    for planned, done in zip(checked, real):
        assert planned["changed"] == done["changed"] and planned["changes"] == done["changes"]
        if planned["guest"] is not None:
            assert {k: v for k, v in planned["guest"].items() if k != "uuid"} == \
                {k: v for k, v in done["guest"].items() if k != "uuid"}
    assert [r["name"] for r in real if r["action"] == "remove"] == ["orphan"], "only owned guests are pruned"
    rerun = run(real_backend, specs, check=False)
    assert not any(r["changed"] for r in rerun)


def test_one_bad_guest_stops_the_whole_run_before_any_change() -> None:
    states, specs = scenario()
    backend = FakeBackend(states)
    bad = guest_spec_from_dict({"name": "bad01", "nics": [{"network": "nowhere"}]})
    with pytest.raises(ConfigError, match=r"guest 'bad01' nics\[0\].network='nowhere'"):
        converge(backend, [*specs, bad], Placement(), RunOptions())
    assert backend.mutations == []


def test_a_guest_listed_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"guests\[1\].name='web01': listed twice"):
        converge(FakeBackend([]), [spec(), spec()], Placement(), RunOptions(check_mode=True))


def test_vsphere_like_backend_refuses_restart_only_change_on_a_running_guest_while_planning() -> None:
    strict = Planner(CAPACITY, BackendDefaults(stages_restart_changes=False), PlanOptions())
    with pytest.raises(ConfigError, match=r"guest 'web01' firmware='uefi': cannot change while the guest runs"):
        strict.plan(spec(firmware="uefi"), existing())
    assert strict.plan(spec(firmware="uefi", state="stopped"), existing()).power == "stop"


def test_failure_of_one_guest_is_reported_per_guest() -> None:
    states, specs = scenario()
    backend = FakeBackend(states)

    def broken(current: GuestState, plan: GuestPlan) -> None:
        from ansible_collections.virtfleet.core.plugins.module_utils._errors import EndpointError

        raise EndpointError("test:///default", "guest 'web01': ReconfigVM: connection lost")

    backend.update_guest = broken  # type: ignore[method-assign]
    results = {r.name: r for r in converge(backend, specs, Placement(), RunOptions())}
    assert results["web01"].failed and "connection lost" in (results["web01"].msg or "")
    assert not results["new01"].failed and "new01" in backend.states


def test_a_disk_kept_from_an_earlier_guest_is_reused_grown_never_shrunk() -> None:
    kept = Planner(CAPACITY, BackendDefaults(), PlanOptions(), leftovers={("new01", "data"): 3.0})
    grown = kept.plan(guest_spec_from_dict({"name": "new01", "disks": [{"name": "data", "size_gib": 4}]}), None)
    assert grown.after is not None and grown.after.disks is not None and grown.after.disks[0].size_gib == 4
    sized = kept.plan(guest_spec_from_dict({"name": "new01", "disks": [{"name": "data"}]}), None)
    assert sized.after is not None and sized.after.disks is not None and sized.after.disks[0].size_gib == 3.0
    with pytest.raises(ConfigError, match=r"guest 'new01' disks\[0\].size_gib=2.0: a 3 GiB disk kept"):
        kept.plan(guest_spec_from_dict({"name": "new01", "disks": [{"name": "data", "size_gib": 2}]}), None)


def test_a_change_staged_by_an_earlier_run_still_reports_a_restart_or_restarts() -> None:
    staged = existing()
    staged.pending_restart = ["memory_mib"]
    waiting = planner().plan(spec(vcpus=2), staged)
    assert waiting.changes == [] and waiting.restart_required
    restarted = planner(allow_restart=True).plan(spec(vcpus=2), staged)
    assert restarted.power == "restart" and not restarted.restart_required


def test_a_paused_guest_is_still_active() -> None:
    paused = existing(power="paused")
    plan = planner().plan(spec(firmware="uefi", state="running"), paused)
    assert plan.power == "start" and plan.restart_required, "a resume does not apply a restart-only change"


def test_new_disks_on_buses_without_hotplug_wait_for_a_restart() -> None:
    disks = [{"name": "root", "size_gib": 10}, {"name": "old", "size_gib": 1, "bus": "ide"}]
    plan = planner().plan(spec(disks=disks), existing())
    assert [(c.field, c.live) for c in plan.changes] == [("disks[old]", False)]
