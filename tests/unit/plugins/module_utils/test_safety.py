# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""Issue 10's planner and runner defects, each proven against the fake backend: what a run must never do."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_plan import FakeBackend, existing, planner, spec

from ansible_collections.virtfleet.core.plugins.module_utils._argspec import (
    convergence_argument_spec,
    exclusive_argument_spec,
    guest_argument_spec,
)
from ansible_collections.virtfleet.core.plugins.module_utils._converge import RunOptions, converge
from ansible_collections.virtfleet.core.plugins.module_utils._errors import ConfigError
from ansible_collections.virtfleet.core.plugins.module_utils._guest_module import (
    NO_LOG,
    hide_secrets,
    run_options_from_params,
    specs_from_entries,
)
from ansible_collections.virtfleet.core.plugins.module_utils._guest_read import select_guests
from ansible_collections.virtfleet.core.plugins.module_utils._model import (
    GuestState,
    Placement,
    guest_spec_from_dict,
    owner_id,
)
from ansible_collections.virtfleet.core.plugins.module_utils._plan import Change, PlanOptions

DB_UUID = "0b1c2d3e-0000-4000-8000-00000000db01"
WEB_UUID = "0b1c2d3e-0000-4000-8000-000000000001"


def two_guests() -> list[GuestState]:
    web = existing(uuid=WEB_UUID)
    db = existing(uuid=DB_UUID)
    db.spec.name = "db01"
    return [web, db]


# ------------------------------------------------------------------------------------------ 2. uuid vs name
def test_a_uuid_of_another_guest_is_refused_and_nothing_is_removed() -> None:
    backend = FakeBackend(two_guests())
    wrong = guest_spec_from_dict({"name": "web01", "uuid": DB_UUID, "state": "absent"})
    with pytest.raises(ConfigError, match=r"guest 'web01' uuid='0b1c2d3e-.*db01': belongs to the guest 'db01'"):
        converge(backend, [wrong], Placement(), RunOptions(plan=PlanOptions(remove_storage=True)))
    assert backend.mutations == [] and set(backend.states) == {"web01", "db01"}


def test_a_uuid_of_another_guest_is_refused_for_a_guest_that_does_not_exist_either() -> None:
    backend = FakeBackend(two_guests())
    with pytest.raises(ConfigError, match=r"belongs to the guest 'db01'"):
        converge(backend, [guest_spec_from_dict({"name": "new01", "uuid": DB_UUID, "vcpus": 2})], Placement(),
                 RunOptions())
    assert backend.mutations == []


def test_two_entries_with_one_uuid_are_refused() -> None:
    entries = [guest_spec_from_dict({"name": "a01", "uuid": DB_UUID}), guest_spec_from_dict({"name": "b01",
                                                                                            "uuid": DB_UUID})]
    with pytest.raises(ConfigError, match=r"guests\[1\] \(b01\) uuid=.*listed twice \(also guests\[0\] \(a01\)\)"):
        converge(FakeBackend([]), entries, Placement(), RunOptions(check_mode=True))


def test_the_right_uuid_still_picks_one_of_two_same_named_guests() -> None:
    twins = two_guests()
    twins[1].spec.name = "web01"  # vSphere: two VMs named web01, told apart by uuid
    backend = FakeBackend([])
    backend.states = {"a": twins[0], "b": twins[1]}
    with pytest.raises(ConfigError, match="2 guests have this name"):
        converge(backend, [spec(vcpus=4)], Placement(), RunOptions(check_mode=True))
    result = converge(backend, [spec(uuid=DB_UUID, vcpus=4)], Placement(), RunOptions(check_mode=True))
    assert result[0].action == "update" and result[0].before is not None and result[0].before["uuid"] == DB_UUID


# ------------------------------------------------------------------------------------------ 3. exclusive
def owned_by(name: str, owner: Any, in_scope: bool = True) -> GuestState:
    state = existing(power="stopped")
    state.spec.name, state.owner, state.in_scope = name, owner, in_scope
    return state


def removed(states: list[GuestState], options: RunOptions, specs: Any = None) -> list[str]:
    backend = FakeBackend(copy.deepcopy(states), forbid_mutators=options.check_mode)
    results = converge(backend, specs if specs is not None else [spec()], Placement(), options)
    return sorted(r.name for r in results if r.action == "remove")


def test_exclusive_prunes_only_its_own_owner_in_scope() -> None:
    states = [existing(), owned_by("team-a1", "team-a"), owned_by("team-b1", "team-b"),
              owned_by("cloned1", None),  # a clone of an owned guest: the mark names another uuid
              owned_by("elsewhere1", "team-a", in_scope=False)]  # another cluster/folder of the vCenter
    assert removed(states, RunOptions(exclusive=True, owner="team-a", check_mode=True)) == ["team-a1"]
    assert removed(states, RunOptions(exclusive=True, owner="team-b", check_mode=True)) == ["team-b1"]
    assert removed(states, RunOptions(exclusive=True, owner="team-c", check_mode=True)) == []


def test_an_empty_list_with_exclusive_is_refused_unless_allowed() -> None:
    states = [owned_by("team-a1", "team-a")]
    with pytest.raises(ConfigError, match=r"guests=\[\]: is empty while exclusive is true.*'team-a'.*allow_empty"):
        removed(states, RunOptions(exclusive=True, owner="team-a"), specs=[])
    assert removed(states, RunOptions(exclusive=True, owner="team-a", allow_empty=True, check_mode=True),
                   specs=[]) == ["team-a1"]
    assert removed(states, RunOptions(owner="team-a"), specs=[]) == [], "without exclusive, an empty list is a no-op"


def test_the_guests_module_declares_exclusive_allow_empty_and_owner() -> None:
    spec_ = exclusive_argument_spec()
    assert spec_["allow_empty"] == {"type": "bool", "default": False}
    assert guest_argument_spec()["cloud_init"]["options"]["user_data"]["no_log"] is True
    assert convergence_argument_spec()["owner"]["default"] == "virtfleet.core"


def test_a_created_guest_carries_the_owner_of_the_run() -> None:
    backend = FakeBackend([])
    converge(backend, [guest_spec_from_dict({"name": "new01", "disks": [{"name": "root", "size_gib": 1}]})],
             Placement(), RunOptions(owner="team-a"))
    assert backend.states["new01"].owner == "team-a"


@pytest.mark.parametrize("bad", ["", "team a", "-x", "a" * 65, "team\n", None, 5])
def test_bad_owner_ids_are_refused(bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"^owner="):
        owner_id(bad)


# ------------------------------------------------------------------------------------------ 5. restart
def test_a_restart_that_never_started_the_guest_is_finished_by_the_next_present_run() -> None:
    down = existing(power="stopped")
    down.interrupted_restart = True
    plan = planner().plan(spec(), down)
    assert plan.power == "start" and [c.field for c in plan.changes] == ["power_state"]
    stays = planner().plan(spec(state="stopped"), down)
    assert stays.power == "stop", "a guest meant to be stopped stays down, and the stop clears the restart mark"
    down.interrupted_restart = False
    assert planner().plan(spec(), down).changes == []


def test_a_restart_goes_through_the_backends_restart_step() -> None:
    backend = FakeBackend([existing()])
    calls: list[str] = []
    backend.restart_guest = lambda current, timeout, force, plan=None: calls.append(current.spec.name)  # type: ignore
    converge(backend, [spec(firmware="uefi")], Placement(), RunOptions(plan=PlanOptions(allow_restart=True)))
    assert calls == ["web01"]


# ------------------------------------------------------------------------------------------ 11. bounds
@pytest.mark.parametrize("data, where", [
    ({"name": "web01\n"}, r"^name="),
    ({"name": "web01", "uuid": DB_UUID + "\n"}, r"uuid="),
    ({"name": "web01", "disks": [{"name": "root\n", "size_gib": 1}]}, r"disks\[0\].name="),
    ({"name": "web01", "disks": [{"name": "root", "size_gib": float("inf")}]}, r"disks\[0\].size_gib=inf"),
    ({"name": "web01", "disks": [{"name": "root", "size_gib": float("nan")}]}, r"disks\[0\].size_gib=nan"),
    ({"name": "web01", "disks": [{"name": "root", "size_gib": ".inf"}]}, r"disks\[0\].size_gib='.inf'"),
    ({"name": "web01", "memory_mib": 1e400}, r"memory_mib=inf"),
    ({"name": "web01", "tags": {"role": "web\n<x/>"}}, r"tags.role="),
    ({"name": "web01", "tags": {"role\n": "web"}}, r"tags="),
    ({"name": "web01", "nics": [{"network": "lan\x00"}]}, r"nics\[0\].network="),
    ({"name": "web01", "boot": {"kernel": "/boot/vmlinuz\n"}}, r"boot.kernel="),
])
def test_values_that_cannot_round_trip_are_refused_with_one_line(data: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError, match=where) as err:
        guest_spec_from_dict(data)
    assert "\n" not in str(err.value)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_sizes_are_finite_and_positive_or_refused(size: float) -> None:
    try:
        got = guest_spec_from_dict({"name": "web01", "disks": [{"name": "root", "size_gib": size}]})
    except ConfigError:
        assert not math.isfinite(size) or size <= 0
    else:
        assert got.disks is not None and math.isfinite(got.disks[0].size_gib or 0) and size > 0


@pytest.mark.parametrize("disk, why", [
    ("virtfleet-cidata", "reserved for this collection's own disks"),
    ("root.v1", "must be 1-40 letters"),  # libvirt drops it from the alias: it would never converge
])
def test_disk_names_that_clash_or_cannot_round_trip_are_refused(disk: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        guest_spec_from_dict({"name": "web01", "disks": [{"name": disk, "size_gib": 1}]})


@pytest.mark.parametrize("disk", ["vdb", "sda", "hdc", "nvme0n1", "Hard disk 2"])
def test_a_device_name_can_name_an_existing_disk_but_never_a_new_one(disk: str) -> None:
    with pytest.raises(ConfigError, match=rf"disks\[0\].name='{disk}': is a device name"):
        planner().plan(spec(disks=[{"name": disk, "size_gib": 1}]), None)
    with pytest.raises(ConfigError, match="is a device name"):
        planner().plan(spec(disks=[{"name": "root"}, {"name": disk, "size_gib": 1}]), existing())
    named = existing(disks=[{"name": "root", "size_gib": 10}, {"name": disk, "size_gib": 2}])
    assert planner().plan(spec(disks=[{"name": disk, "size_gib": 2}]), named).changes == []


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan"), 86401])
def test_shutdown_timeout_is_bounded(timeout: float) -> None:
    params = {"allow_restart": False, "remove_storage": False, "force": False, "shutdown_timeout": timeout,
              "owner": "virtfleet.core"}
    with pytest.raises(ConfigError, match=r"^shutdown_timeout="):
        run_options_from_params(params, False)


def test_a_long_bad_value_is_one_bounded_line() -> None:
    with pytest.raises(ConfigError) as err:
        guest_spec_from_dict({"name": "web01", "boot": {"kernel": "x\n" * 5000}})
    assert len(str(err.value)) < 300 and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ guest_info round trip
def test_guest_info_output_fed_back_as_desired_state_changes_nothing() -> None:
    state = existing(cloud_init={"user_data": "#cloud-config\npassword: s3cret\n"})
    state.pending_restart = ["memory_mib"]
    out = select_guests([state], None, None, None)
    assert out[0]["status"]["power_state"] == "running" and out[0]["status"]["owner"] == "virtfleet.core"
    assert out[0]["status"]["cloud_init_digest"].startswith("sha256:") and "cloud_init" not in out[0]
    assert "s3cret" not in repr(out)
    specs = specs_from_entries(copy.deepcopy(out))  # the guest spec + model checks, as for any guests entry
    plan = planner().plan(specs[0], state)
    assert plan.changes == [] and plan.power is None


def test_change_is_structured_and_renders_the_field_users_read() -> None:
    grow = Change("disks", 10.0, 20.0, key="root", attr="size_gib")
    assert (grow.kind, grow.key, grow.attr, grow.field) == ("disks", "root", "size_gib", "disks[root].size_gib")
    assert Change("disks[root].size_gib", 1, 2) == Change("disks", 1, 2, key="root", attr="size_gib")
    assert Change("boot.kernel", None, "/k").key == "kernel" and Change("nics[aa]", None, {}).attr is None
    with pytest.raises(ValueError):
        Change("nonsense[", 1, 2)
    assert grow.to_dict() == {"field": "disks[root].size_gib", "before": 10.0, "after": 20.0, "live": True}


class _Module:
    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self.no_log_values: set[str] = set()


def test_the_guests_modules_invocation_masks_user_data_and_uri_passwords() -> None:
    secret = "#cloud-config\npassword: s3cret-s3cret\n"
    module = _Module({"uri": "vsphere://admin:hunter2-x@vc.example.com",
                      "guests": [{"name": "web01", "cloud_init": {"user_data": secret, "meta_data": "id: 1"}},
                                 {"name": "db01", "cloud_init": {"user_data": {"password": "an0ther-s3cret"}}},
                                 {"name": "plain"}]})
    invocation = hide_secrets(module)  # type: ignore[arg-type]
    args = invocation["module_args"]
    assert args["guests"][0]["cloud_init"] == {"user_data": NO_LOG, "meta_data": "id: 1"}
    assert args["guests"][1]["cloud_init"]["user_data"] == NO_LOG
    assert {secret, "an0ther-s3cret", "hunter2-x"} <= module.no_log_values
    assert module.params["guests"][0]["cloud_init"]["user_data"] == secret, "the module's own params are intact"


def test_absent_with_the_uuid_of_an_earlier_incarnation_removes_nothing() -> None:
    backend = FakeBackend([existing(uuid=WEB_UUID)])
    old = guest_spec_from_dict({"name": "web01", "uuid": DB_UUID, "state": "absent"})
    with pytest.raises(ConfigError, match=r"guest 'web01' uuid=.*has uuid 0b1c2d3e-.*0001; nothing is removed"):
        converge(backend, [old], Placement(), RunOptions(plan=PlanOptions(remove_storage=True)))
    assert backend.mutations == [] and "web01" in backend.states


def test_a_same_named_guest_outside_the_placement_is_never_adopted() -> None:
    theirs = existing()
    theirs.in_scope = False
    for wanted in (spec(vcpus=4), spec(state="absent"), spec(vcpus=4, uuid=None)):
        backend = FakeBackend([copy.deepcopy(theirs)])
        with pytest.raises(ConfigError, match="exists outside the cluster/host, folder and resource pool"):
            converge(backend, [wanted], Placement(), RunOptions())
        assert backend.mutations == []
    mine = existing()
    backend = FakeBackend([])
    backend.states = {"theirs": copy.deepcopy(theirs), "mine": mine}
    result = converge(backend, [spec(vcpus=4)], Placement(), RunOptions(check_mode=True))
    assert result[0].action == "update", "an in-scope guest of the name is the one meant"
