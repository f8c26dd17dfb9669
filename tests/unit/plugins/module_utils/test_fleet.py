# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""The fleet file, placement and the plan: validation lines, placement rules and invariants (hypothesis)."""

from __future__ import annotations

import copy
import json
from typing import Any, Dict, List, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ansible_collections.virtfleet.core.plugins.module_utils._errors import ConfigError
from ansible_collections.virtfleet.core.plugins.module_utils._fleet import fleet_from_dict
from ansible_collections.virtfleet.core.plugins.module_utils._fleet_plan import (
    build_plan,
    compare_reviewed,
    drift_of,
    placement_data,
)


def hv(name: str, kind: str = "kvm", memory: int = 8192, threads: int = 4, networks: Optional[List[str]] = None,
       storage: Optional[Dict[str, float]] = None, **extra: Any) -> Dict[str, Any]:
    return {"name": name, "type": kind, "api": "vsphere" if kind == "esxi" else "libvirt",
            "endpoint": f"qemu+tcp://{name}/system" if kind == "kvm" else f"vsphere://{name}",
            "memory_mib": memory, "cpu": {"threads": threads},
            "networks": networks if networks is not None else (["br0"] if kind == "kvm" else ["VM Network"]),
            "storage": [{"name": k, "free_gib": v} for k, v in (storage or {"default": 100.0}).items()], **extra}


def guest(name: str, memory: int = 1024, **extra: Any) -> Dict[str, Any]:
    return {"name": name, "memory_mib": memory, "vcpus": 1, **extra}


def fleet(guests: List[Dict[str, Any]], **extra: Any) -> Dict[str, Any]:
    return {"name": "team-a", "guests": guests, **extra}


def placed(data: Dict[str, Any]) -> Dict[str, str]:
    return {p["name"]: p["hypervisor"] for p in data["placed"]}


# ------------------------------------------------------------------------------------------ the fleet file

@pytest.mark.parametrize(("raw", "expected"), [
    (fleet([guest("a", colour="red")]), "fleet guests[0] (a)"),
    ({"guests": []}, "fleet="),
    (fleet([guest("a"), guest("a")]), "fleet guests[1].name='a': listed twice"),
    (fleet([guest("a", hypervisor_type="xen")]), "fleet guests[0] (a)"),
    (fleet([guest("a", disks=[{"name": "vdb", "size_gib": "x"}])]), "fleet guests[0] (a)"),
    (fleet([guest("bad name")]), "fleet guests[0] name='bad name'"),
    (fleet([guest("a")], hypervisors=[{"labels": ["x"]}]), "fleet hypervisors[0]"),
    (fleet([guest("a")], hypervisors=[{"name": "h*", "cpu_ratio": 0}]), "fleet hypervisors[0].cpu_ratio=0"),
    (fleet([guest("a")], hypervisors=[{"name": "h*", "nics": 1}]), "fleet hypervisors[0]"),
    (fleet([], prune=True), "fleet guests=[]: is empty while prune is true"),
    (fleet([guest("a")], name="bad owner!"), "fleet name='bad owner!'"),
    (fleet([guest("a")], defaults={"name": "x"}), "fleet defaults"),
])
def test_bad_fleet_is_one_line_naming_the_entry(raw: Dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        fleet_from_dict(raw)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_defaults_merge_and_guest_wins() -> None:
    parsed = fleet_from_dict(fleet([guest("a", tags={"role": "web"}), {"name": "b"}],
                                   defaults={"memory_mib": 512, "vcpus": 2, "tags": {"team": "a"}}))
    a, b = parsed.guests
    assert (a.spec.memory_mib, a.spec.vcpus, a.spec.tags) == (1024, 1, {"team": "a", "role": "web"})
    assert (b.spec.memory_mib, b.spec.vcpus, b.spec.tags) == (512, 2, {"team": "a"})


def test_user_data_stays_in_the_fleet_file(tmp_path: Any) -> None:
    """Placement output (a fact, an AWX event, the plan) never holds user_data; fleet_guests puts it back from the
    fleet file just before converging, and without the file it refuses the marked guest."""
    from ansible_collections.virtfleet.core.plugins.module_utils._fleet_run import (
        secrets_of,
        user_data_of,
        with_user_data,
    )

    raw = fleet([guest("a", cloud_init={"user_data": "#cloud-config\npassword: hunter2-secret"})])
    data = placement_data(raw, [hv("h1")], [], [], None)
    assert "hunter2-secret" not in json.dumps(data)
    entry = data["targets"][0]["guests"][0]
    assert entry["fleet_user_data"] is True and "user_data" not in entry.get("cloud_init", {})
    path = tmp_path / "fleet.yml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    restored = with_user_data([entry], user_data_of(str(path)), "targets[h1]")[0]
    assert restored["cloud_init"]["user_data"].endswith("hunter2-secret") and "fleet_user_data" not in restored
    assert any("hunter2-secret" in s for s in secrets_of({"fleet_file": str(path), "targets": []}))
    with pytest.raises(ConfigError) as err:
        with_user_data([entry], {}, "targets[h1]")
    assert "give fleet_file" in str(err.value)


# ------------------------------------------------------------------------------------------ placement

def test_existing_guest_stays_and_new_guests_spread() -> None:
    hosts = [hv("h1"), hv("h2")]
    data = placement_data(fleet([guest("a"), guest("b"), guest("old", memory=4096)]), hosts,
                          [{"name": "old", "hypervisor": "h2", "memory_mib": 4096, "vcpus": 1, "owner": "team-a"}],
                          [], None)
    where = placed(data)
    assert where["old"] == "h2"
    assert where["a"] == "h1" and where["b"] == "h1"  # h2 has 4 GiB in use: spread goes to the freer host
    assert data["placed"][0]["existing"] is False


def test_pack_fills_one_host_first() -> None:
    data = placement_data(fleet([guest("a"), guest("b")], strategy="pack"), [hv("h1"), hv("h2", memory=4096)],
                          [], [], None)
    assert set(placed(data).values()) == {"h2"}


def test_constraints_and_reasons() -> None:
    hosts = [hv("kvm1"), hv("esx1", "esxi"), hv("esx2", "esxi", labels=None)]
    raw = fleet(
        [guest("t", hypervisor_type="esxi"), guest("p", pin="esx2"), guest("l", labels=["ssd"]),
         guest("n", nics=[{"network": "prod"}]), guest("huge", memory=10**6), guest("ghost", pin="nope"),
         guest("aa1", anti_affinity="g", pin="kvm1"), guest("aa2", anti_affinity="g", pin="kvm1"),
         guest("s", disks=[{"name": "root", "size_gib": 10, "pool": "fast"}])],
        hypervisors=[{"name": "esx1", "labels": ["ssd"]}, {"type": "esxi", "networks": {"prod": "VM Network"}},
                     {"type": "kvm", "storage": {"fast": "default"}}])
    data = placement_data(raw, hosts, [], [], None)
    where = placed(data)
    reasons = {u["name"]: u["reason"] for u in data["unplaceable"]}
    assert where["t"].startswith("esx") and where["p"] == "esx2" and where["l"] == "esx1"
    assert where["n"].startswith("esx") and where["s"] == "kvm1"
    assert "memory full" in reasons["huge"]
    assert reasons["ghost"] == "pin: no hypervisor named 'nope'"
    assert (where.get("aa1"), where.get("aa2")).count("kvm1") == 1
    assert "anti_affinity 'g' already there" in reasons[({"aa1", "aa2"} - set(where)).pop()]
    # The plan names the real network and the pool of a new disk.
    target = {t["hypervisor"]: t for t in data["targets"]}
    nic_guest = next(g for g in target[where["n"]]["guests"] if g["name"] == "n")
    assert nic_guest["nics"] == [{"network": "VM Network"}]
    assert next(g for g in target["kvm1"]["guests"] if g["name"] == "s")["disks"][0]["pool"] == "default"


def test_default_storage_libvirt_default_pool_else_most_free() -> None:
    data = placement_data(fleet([guest("a", disks=[{"name": "root", "size_gib": 1}], pin="k")]),
                          [hv("k", storage={"big": 500.0, "default": 10.0})], [], [], None)
    assert data["targets"][0]["placement"]["datastore"] == "default"
    data = placement_data(fleet([guest("a", disks=[{"name": "root", "size_gib": 1}], pin="e")]),
                          [hv("e", "esxi", storage={"ds1": 10.0, "ds2": 500.0})], [], [], None)
    assert data["targets"][0]["guests"][0]["disks"][0]["pool"] == "ds2"


def test_storage_capacity_counts_every_disk() -> None:
    data = placement_data(fleet([guest(f"g{i}", disks=[{"name": "root", "size_gib": 40}]) for i in range(3)]),
                          [hv("k", storage={"default": 100.0})], [], [], None)
    assert len(data["placed"]) == 2 and "storage 'default' full" in data["unplaceable"][0]["reason"]


def test_unreachable_hypervisor_blocks_new_guests_that_could_be_there() -> None:
    data = placement_data(fleet([guest("a"), guest("b", hypervisor_type="kvm"), guest("c", pin="h1")]),
                          [hv("h1")], [], [{"inventory_hostname": "esx9", "virtfleet_endpoint": {"api": "vsphere"}}],
                          None)
    # c is pinned to h1, but a guest is never moved to follow its pin: it may be running on esx9.
    assert data["unreachable"] == [{"hypervisor": "esx9", "guests": ["a", "c"]}]
    assert set(placed(data)) == {"b"}


def test_limit_makes_pending_never_elsewhere() -> None:
    data = placement_data(fleet([guest("a", pin="h2"), guest("b")]), [hv("h1", memory=16384), hv("h2")], [], [],
                          ["h1"])
    assert data["pending"] == [{"name": "a", "hypervisor": "h2", "reason": data["pending"][0]["reason"]}]
    assert [t["hypervisor"] for t in data["targets"]] == ["h1"]


def test_guest_of_another_owner_or_on_two_hosts_is_not_placed() -> None:
    guests = [{"name": "a", "hypervisor": "h1", "owner": "team-b"},
              {"name": "b", "hypervisor": "h1", "owner": None}, {"name": "b", "hypervisor": "h2", "owner": None}]
    data = placement_data(fleet([guest("a"), guest("b")]), [hv("h1"), hv("h2")], guests, [], None)
    reasons = {u["name"]: u["reason"] for u in data["unplaceable"]}
    assert "owner 'team-b'" in reasons["a"] and "several hypervisors (h1, h2)" in reasons["b"]
    assert data["placed"] == []


def test_prune_converges_every_host_in_the_limit() -> None:
    data = placement_data(fleet([guest("a", pin="h1")], prune=True), [hv("h1"), hv("h2"), hv("h3")], [], [],
                          ["h1", "h2"])
    assert [(t["hypervisor"], t["exclusive"]) for t in data["targets"]] == [("h1", True), ("h2", True)]


def test_hostvars_entries_are_accepted() -> None:
    """The role passes whole hostvars: the vCenter host name comes from ansible_host, not the inventory name."""
    facts = hv("esx-a@vc", "esxi", manager="vc", datacenter="DC0", cluster="C0")
    data = placement_data(fleet([guest("a")]), [{"virtfleet_hypervisor": facts, "ansible_host": "esx-a"}],
                          [{"virtfleet_guest": {"name": "x", "hypervisor": "esx-a@vc", "memory_mib": 1}}], [], None)
    assert data["targets"][0]["placement"] == {"datacenter": "DC0", "esxi_host": "esx-a", "cluster": "C0",
                                               "datastore": "default"}
    assert data["hypervisors"][0]["other_guests"] == ["x"]


# ---------------------------------------------------------------------------------- invariants (hypothesis)

HOSTS = st.lists(st.tuples(st.sampled_from(["kvm", "esxi"]), st.integers(512, 16384), st.integers(1, 8)),
                 min_size=1, max_size=6)
GUESTS = st.lists(st.tuples(st.integers(128, 8192), st.integers(1, 8), st.sampled_from([None, "g1", "g2"]),
                            st.sampled_from([None, "kvm", "esxi"]), st.integers(0, 8)), max_size=25)


def _scenario(hosts: Any, guests: Any, existing_on: Any, strategy: str) -> Any:
    hvs = [hv(f"h{i}", kind, memory=mem, threads=threads) for i, (kind, mem, threads) in enumerate(hosts)]
    fleet_guests, running = [], []
    for i, (mem, vcpus, group, kind, where) in enumerate(guests):
        entry = guest(f"g{i:02d}", memory=mem, vcpus=vcpus)
        if group:
            entry["anti_affinity"] = group
        if kind:
            entry["hypervisor_type"] = kind
        fleet_guests.append(entry)
        if existing_on and where < len(hvs):
            running.append({"name": entry["name"], "hypervisor": f"h{where}", "memory_mib": mem, "vcpus": vcpus,
                            "owner": "team-a"})
    return fleet(fleet_guests, strategy=strategy), hvs, running


@settings(max_examples=150, deadline=None)
@given(HOSTS, GUESTS, st.booleans(), st.sampled_from(["spread", "pack"]))
def test_placement_invariants(hosts: Any, guests: Any, existing_on: bool, strategy: str) -> None:
    raw, hvs, running = _scenario(hosts, guests, existing_on, strategy)
    first = placement_data(copy.deepcopy(raw), copy.deepcopy(hvs), copy.deepcopy(running), [], None)
    # Deterministic: the same input (in another order) gives the same output.
    again = placement_data(copy.deepcopy(raw), list(reversed(hvs)), list(reversed(running)), [], None)
    assert first == again
    where = placed(first)
    # Existing guests never move.
    for r in running:
        assert where[r["name"]] == r["hypervisor"]
    spec = {g["name"]: g for g in raw["guests"]}
    kinds = {h["name"]: h["type"] for h in hvs}
    for host in hvs:
        mine = [n for n, h in where.items() if h == host["name"]]
        new = [n for n in mine if n not in {r["name"] for r in running}]
        used = sum(r["memory_mib"] for r in running if r["hypervisor"] == host["name"])
        # Never over capacity with what placement added (existing guests may already exceed it).
        if new:
            assert used + sum(spec[n]["memory_mib"] for n in new) <= host["memory_mib"]
            vcpus = sum(r["vcpus"] for r in running if r["hypervisor"] == host["name"])
            assert vcpus + sum(spec[n]["vcpus"] for n in new) <= host["cpu"]["threads"] * 4
        for n in new:
            assert spec[n].get("hypervisor_type") in (None, kinds[host["name"]])
        # Anti-affinity held for every guest placement added.
        groups = [spec[n]["anti_affinity"] for n in mine if spec[n].get("anti_affinity")]
        new_groups = [spec[n]["anti_affinity"] for n in new if spec[n].get("anti_affinity")]
        for group in new_groups:
            assert groups.count(group) == 1
    # Every guest is accounted for exactly once.
    accounted = set(where) | {u["name"] for u in first["unplaceable"]}
    assert accounted == set(spec) and not set(where) & {u["name"] for u in first["unplaceable"]}


# ------------------------------------------------------------------------------------------ the plan

def _converged(action: str = "none", changes: Optional[List[Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    return [{"hypervisor": "h1", "failed": False, "guests": [
        {"name": "a", "action": action, "changed": action != "none", "restart_required": False,
         "changes": changes or []}]}]


def test_plan_contract_and_digest() -> None:
    data = placement_data(fleet([guest("a"), guest("huge", memory=10**6), guest("gone", state="absent")]),
                          [hv("h1")], [], [], None)
    change = [{"field": "vcpus", "before": 1, "after": 2, "live": True, "kind": "x"}]
    plan = build_plan(data, _converged("update", change))
    assert plan["guests"][0] == {"name": "a", "hypervisor": "h1", "action": "update", "restart_required": False,
                                 "changes": [{"field": "vcpus", "before": 1, "after": 2, "live": True}]}
    assert plan["guests"][1]["name"] == "gone" and plan["guests"][1]["action"] == "none"
    assert plan["unplaceable"][0]["name"] == "huge" and plan["unreachable"] == []
    assert plan["digest"].startswith("sha256:") and plan["changed"] is True
    assert compare_reviewed(copy.deepcopy(plan), plan) is None
    other = build_plan(data, _converged("update", [dict(change[0], after=3)]))
    line = compare_reviewed(plan, other)
    assert line is not None and "a" in line and "nothing was changed" in line
    edited = copy.deepcopy(plan)
    edited["guests"][0]["action"] = "none"
    assert "edited" in str(compare_reviewed(edited, plan))
    assert "no digest" in str(compare_reviewed({"guests": []}, plan))
    assert drift_of(plan)[0] == "a on h1: update (vcpus)"


def test_remove_is_delete_and_failed_target_is_an_error() -> None:
    data = placement_data(fleet([guest("a")], prune=True), [hv("h1"), hv("h2")], [], [], None)
    converged = [{"hypervisor": "h1", "failed": True, "msg": "guest 'a' disks[0]...: bad", "guests": [],
                  "planned": [{"name": "a"}]},
                 {"hypervisor": "h2", "failed": False, "guests": [
                     {"name": "old", "action": "remove", "changes": [], "restart_required": False}]}]
    plan = build_plan(data, converged)
    assert plan["errors"] == [{"hypervisor": "h1", "msg": "guest 'a' disks[0]...: bad", "guests": ["a"]}]
    assert plan["guests"] == [{"name": "old", "hypervisor": "h2", "action": "delete", "changes": [],
                               "restart_required": False}]


# ------------------------------------------------------------------------------------------ review findings

def test_prune_keeps_every_declared_guest_wherever_it_is() -> None:
    """A declared guest on two hypervisors is not placed, and prune must not delete either copy."""
    guests = [{"name": "a", "hypervisor": h, "owner": "team-a"} for h in ("h1", "h2")]
    data = placement_data(fleet([guest("a"), guest("gone", state="absent")], prune=True), [hv("h1"), hv("h2")],
                          guests, [], None)
    assert data["unplaceable"][0]["name"] == "a"
    assert all(t["keep"] == ["a"] and t["exclusive"] for t in data["targets"])


def test_growth_of_existing_guests_counts_before_new_guests() -> None:
    running = [{"name": "a", "hypervisor": "h1", "memory_mib": 1024, "vcpus": 1, "owner": "team-a"}]
    data = placement_data(fleet([guest("a", memory=7000), guest("b", memory=4096)]), [hv("h1", memory=8192)],
                          running, [], None)
    assert placed(data) == {"a": "h1"} and "memory full" in data["unplaceable"][0]["reason"]


def test_shared_datastore_counted_once_for_its_hosts() -> None:
    hosts = [hv(f"e{i}", "esxi", storage={"shared": 100.0}, manager="vc", datacenter="DC0", endpoint="vsphere://vc")
             for i in range(3)]
    data = placement_data(fleet([guest(f"g{i}", disks=[{"name": "root", "size_gib": 80}]) for i in range(3)]),
                          hosts, [], [], None)
    assert len(data["placed"]) == 1 and len(data["unplaceable"]) == 2


def test_hosts_of_other_kinds_or_disconnected_get_no_new_guest() -> None:
    data = placement_data(fleet([guest("a")]), [hv("x", "xen"), hv("e", "esxi", connection_state="disconnected")],
                          [], [], None)
    reason = data["unplaceable"][0]["reason"]
    assert "type 'xen'" in reason and "connection state 'disconnected'" in reason


def test_inventory_without_guest_facts_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        placement_data(fleet([guest("a")]), [hv("h1", guests={"total": 3})], [], [], None)
    assert "guests: true" in str(err.value)


def test_absent_guest_that_may_be_on_an_unreachable_host_is_reported() -> None:
    data = placement_data(fleet([guest("a", state="absent")]), [hv("h1")], [],
                          [{"inventory_hostname": "kvm9", "virtfleet_endpoint": {"api": "libvirt"}}], None)
    assert data["unreachable"] == [{"hypervisor": "kvm9", "guests": ["a"]}] and data["absent"] == []
    plan = build_plan(data, [])
    assert "kvm9: unreachable, not checked (may hold a)" in drift_of(plan)


def test_digest_covers_options_and_where_a_guest_is_created() -> None:
    data = placement_data(fleet([guest("a")]), [hv("h1")], [], [], None)
    converged = _converged("create")
    converged[0]["guests"][0]["guest"] = {"name": "a"}
    plain = build_plan(data, converged, {"remove_storage": False})
    assert plain["guests"][0]["placement"] == {"datastore": "default"}
    assert build_plan(data, converged, {"remove_storage": True})["digest"] != plain["digest"]
    other = copy.deepcopy(data)
    other["targets"][0]["placement"]["domain_type"] = "qemu"
    assert build_plan(other, converged, {"remove_storage": False})["digest"] != plain["digest"]


def test_no_log_option_error_names_the_field() -> None:
    with pytest.raises(ConfigError) as err:
        fleet_from_dict(fleet([guest("a", cloud_init="x")]))
    assert "cloud_init" in str(err.value)


def test_plan_md_escapes_what_hypervisors_say() -> None:
    from ansible_collections.virtfleet.core.plugins.action.fleet_report import render

    data = placement_data(fleet([guest("a", pin="nope")]), [hv("h1")], [], [], None)
    plan = build_plan(data, [{"hypervisor": "h1", "failed": True, "guests": [], "planned": [],
                              "msg": "known: <img src=x> `code` [link](y) @team | cell"}])
    files = render(plan, "Plan")
    md, page = files["plan.md"], files["report.html"]
    for raw in ("<img", "`code`", "[link]", "@team", "| cell"):
        assert raw not in md
    assert "<img" not in page
    assert "&lt;img src=x&gt;" in md and "&lt;img src=x&gt;" in page
    assert json.loads(files["plan.json"])["digest"] == plan["digest"]


def test_apply_refuses_a_plan_that_changed_since_the_check() -> None:
    """converge with expected (the check run's plan) changes nothing when today's plan differs."""
    from test_plan import FakeBackend, spec

    from ansible_collections.virtfleet.core.plugins.module_utils._converge import RunOptions, converge, planned
    from ansible_collections.virtfleet.core.plugins.module_utils._errors import ConcurrentRunError
    from ansible_collections.virtfleet.core.plugins.module_utils._model import Placement

    backend = FakeBackend([])
    wanted = [spec(name="new01")]
    checked = converge(backend, wanted, Placement(), RunOptions(check_mode=True))
    same = {r.name: planned(r.action, r.changes) for r in checked}
    converge(backend, wanted, Placement(), RunOptions(expected=same))  # the planned create goes ahead
    backend2 = FakeBackend([])
    with pytest.raises(ConcurrentRunError) as err:
        converge(backend2, [spec(name="new02")], Placement(), RunOptions(expected=same))
    assert "new01" in str(err.value) and "new02" in str(err.value)
    assert not backend2.mutations
