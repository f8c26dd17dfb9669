# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The fleet as plain data: placement (what the filter ``place`` returns and ``fleet_guests`` converges) and the
plan (``plan.json``, documented in docs/fleet.md), with the digest a reviewed plan is checked by. Pure."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ._errors import ConfigError
from ._fleet import fleet_from_dict
from ._placement import Host, PlacementResult, build_hosts, place

PLAN_VERSION = 1
# The guest modules' action names, as the plan names them.
ACTIONS = {"create": "create", "update": "update", "remove": "delete", "none": "none"}


def _hypervisor_facts(entry: Any) -> Any:
    """An inventory host's hostvars (``virtfleet_hypervisor`` + ``ansible_host``) or the facts themselves."""
    if isinstance(entry, Mapping) and "virtfleet_hypervisor" in entry:
        return dict(entry["virtfleet_hypervisor"], address=entry.get("ansible_host"))
    return entry


def _unreachable_entry(entry: Any) -> Optional[Dict[str, Any]]:
    """An unreachable endpoint host's hostvars (``virtfleet_endpoint``) or ``{name, api}``."""
    if not isinstance(entry, Mapping):
        return None
    endpoint = entry.get("virtfleet_endpoint") or {}
    name = entry.get("inventory_hostname") or entry.get("name")
    api = endpoint.get("api") if isinstance(endpoint, Mapping) and endpoint else entry.get("api")
    if api == "redfish" or not name:
        return None  # a BMC holds no guests
    return {"name": str(name), "type": {"vsphere": "esxi", "libvirt": "kvm"}.get(str(api))}


def _host_dict(host: Host) -> Dict[str, Any]:
    return {
        "name": host.name, "type": host.type, "uri": host.uri, "in_limit": host.in_limit,
        "labels": sorted(host.labels),
        "vcpus": {"threads": host.threads, "capacity": round(host.vcpu_capacity, 2), "allocated": host.vcpus_used},
        "memory_mib": {"total": host.memory_mib, "capacity": round(host.memory_capacity),
                       "allocated": host.memory_used},
        "storage": [{"name": name, "free_gib": round(free, 2), "planned_gib": round(host.planned_gib(name), 2)}
                    for name, free in sorted(host.storage_free.items())],
        "default_storage": host.default_storage,
        "guests": sorted(host.placed), "other_guests": sorted(e.name for e in host.existing
                                                              if e.name not in host.placed),
    }


def placement_data(fleet_raw: Any, hypervisors: Sequence[Dict[str, Any]], guests: Sequence[Dict[str, Any]],
                   unreachable: Sequence[Dict[str, Any]], limit: Optional[Sequence[str]]) -> Dict[str, Any]:
    """What the ``place`` filter returns: the fleet validated and placed; ``targets`` is what ``fleet_guests``
    converges (one entry per hypervisor in the limit that holds fleet guests, or every one in the limit with
    prune)."""
    fleet = fleet_from_dict(fleet_raw)
    hosts = build_hosts(fleet, [_hypervisor_facts(h) for h in hypervisors],
                        [g.get("virtfleet_guest", g) if isinstance(g, Mapping) else g for g in guests], limit)
    check_inventory(hosts)
    lost = [e for e in (_unreachable_entry(u) for u in unreachable) if e is not None]
    result: PlacementResult = place(fleet, hosts, lost)
    by_host: Dict[str, List[Dict[str, Any]]] = {}
    for item in result.placed:
        if item.host.in_limit:
            by_host.setdefault(item.host.name, []).append(item.options)
    # Prune never removes a guest the fleet declares, wherever placement put it (or could not).
    keep = sorted(g.name for g in fleet.guests if g.spec.state != "absent") if fleet.prune else []
    targets = []
    for host in result.hosts:
        if not host.in_limit or (host.name not in by_host and not fleet.prune):
            continue
        targets.append({"hypervisor": host.name, "uri": host.uri, "placement": dict(host.placement, datastore=(
            host.default_storage)), "guests": by_host.get(host.name, []), "exclusive": fleet.prune, "keep": keep})
    placed_names = {p.guest.name for p in result.placed}
    elsewhere = ({u["name"] for u in result.unplaceable} | {p["name"] for p in result.pending}
                 | {g for u in result.unreachable for g in u["guests"]})
    absent = sorted(g.name for g in fleet.guests if g.name not in placed_names and g.name not in elsewhere)
    return {
        "fleet": fleet.name, "prune": fleet.prune, "strategy": fleet.strategy, "targets": targets,
        "placed": [{"name": p.guest.name, "hypervisor": p.host.name, "existing": p.existing} for p in result.placed],
        "absent": absent, "unplaceable": result.unplaceable, "unreachable": result.unreachable,
        "pending": result.pending, "notes": result.notes, "hypervisors": [_host_dict(h) for h in result.hosts],
    }


DIGESTED = ("fleet", "options", "guests", "unplaceable", "unreachable", "pending", "errors")
# The run options that change what an apply does beside the plan's changes (disks removed, guests powered off).
OPTIONS = ("remove_storage", "force", "allow_restart")


def check_inventory(hosts: Sequence[Host]) -> None:
    """Refuse an inventory without guest facts: every fleet guest would look new and be placed again, maybe on
    another hypervisor than the one it runs on."""
    blind = [h.name for h in hosts if h.reported_guests and not h.existing]
    if blind:
        raise ConfigError("inventory", blind[0], f"reports {len(blind)} hypervisor(s) with guests but no guest facts; "
                                                 "build the hypervisors inventory with guests: true")


def plan_digest(plan: Dict[str, Any]) -> str:
    """sha256 over what the plan would do: the options it runs with, guests and their changes (a create with the
    whole guest and where it goes), and what it would not place. Two plans with one digest make the same calls."""
    content = {k: plan.get(k) for k in DIGESTED}
    blob = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()


def build_plan(placement: Dict[str, Any], converged: Sequence[Dict[str, Any]],
               options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """plan.json: PLACEMENT plus what ``fleet_guests`` (check mode or real) said per hypervisor, run with OPTIONS
    (remove_storage, force, allow_restart)."""
    where = {t["hypervisor"]: t.get("placement") or {} for t in placement.get("targets") or []}
    guests: List[Dict[str, Any]] = []
    errors: List[Dict[str, Any]] = []
    for target in sorted(converged, key=lambda t: str(t.get("hypervisor"))):
        if target.get("failed") and not target.get("guests"):
            errors.append({"hypervisor": target["hypervisor"], "msg": target.get("msg"),
                           "guests": sorted(g.get("name") for g in target.get("planned") or [])})
            continue
        for result in target.get("guests") or []:
            entry = {
                "name": result["name"], "hypervisor": target["hypervisor"],
                "action": ACTIONS.get(result.get("action"), result.get("action")),
                "changes": [{k: c.get(k) for k in ("field", "before", "after", "live")}
                            for c in result.get("changes") or []],
                "restart_required": bool(result.get("restart_required")),
            }
            if entry["action"] == "create":
                # What would be made, in full: the digest of a reviewed plan covers every field of a new guest.
                entry["guest"] = result.get("guest")
                entry["placement"] = {k: v for k, v in where.get(target["hypervisor"], {}).items() if v is not None}
            if result.get("failed"):
                entry["error"] = result.get("msg")
            guests.append(entry)
    for name in placement.get("absent") or []:
        guests.append({"name": name, "hypervisor": None, "action": "none", "changes": [], "restart_required": False})
    guests.sort(key=lambda g: (g["name"], str(g["hypervisor"])))
    plan: Dict[str, Any] = {
        "version": PLAN_VERSION, "fleet": placement["fleet"],
        "options": {k: bool((options or {}).get(k)) for k in OPTIONS}, "guests": guests,
        "unplaceable": placement.get("unplaceable") or [], "unreachable": placement.get("unreachable") or [],
        "pending": placement.get("pending") or [], "errors": errors, "notes": placement.get("notes") or [],
        "hypervisors": placement.get("hypervisors") or [],
    }
    actions = [g["action"] for g in guests]
    plan["summary"] = {
        "create": actions.count("create"), "update": actions.count("update"), "delete": actions.count("delete"),
        "none": actions.count("none"), "unplaceable": len(plan["unplaceable"]), "pending": len(plan["pending"]),
        "unreachable": sum(len(u["guests"]) for u in plan["unreachable"]), "errors": len(errors),
    }
    plan["changed"] = any(a != "none" for a in actions)
    plan["digest"] = plan_digest(plan)
    return plan


def drift_of(plan: Dict[str, Any]) -> List[str]:
    """One line per guest that is not as declared (drift.yml fails with these)."""
    lines = []
    for guest in plan.get("guests") or []:
        if guest["action"] == "none":
            continue
        fields = ", ".join(c["field"] for c in guest["changes"]) or guest["action"]
        lines.append(f"{guest['name']} on {guest['hypervisor']}: {guest['action']} ({fields})")
    lines.extend(f"{u['name']}: not placed ({u['reason']})" for u in plan.get("unplaceable") or [])
    lines.extend(f"{p['name']}: pending on {p['hypervisor']}" for p in plan.get("pending") or [])
    lines.extend(f"{e['hypervisor']}: plan failed ({e['msg']})" for e in plan.get("errors") or [])
    lines.extend(f"{u['hypervisor']}: unreachable, not checked (may hold {', '.join(u['guests'])})"
                 for u in plan.get("unreachable") or [] if u["guests"])
    return lines


def compare_reviewed(reviewed: Dict[str, Any], plan: Dict[str, Any]) -> Optional[str]:
    """None when PLAN is the REVIEWED one; else one line saying how it differs."""
    if not isinstance(reviewed, dict) or not str(reviewed.get("digest") or "").startswith("sha256:"):
        return "the reviewed plan is not a plan.json written by plan.yml (no digest)"
    if reviewed.get("digest") != plan_digest(reviewed):
        return "the reviewed plan was edited after plan.yml wrote it (its content does not match its digest)"
    if reviewed["digest"] == plan["digest"]:
        return None
    old = {(g["name"], g.get("hypervisor")): g for g in reviewed.get("guests") or []}
    new = {(g["name"], g.get("hypervisor")): g for g in plan.get("guests") or []}
    differ = sorted({k[0] for k in set(old) ^ set(new)} | {k[0] for k in set(old) & set(new) if old[k] != new[k]})
    for key in ("options", "unplaceable", "unreachable", "pending", "errors"):
        if reviewed.get(key) != plan.get(key):
            differ.append(f"({key})")
    shown = ", ".join(differ[:10]) + (f" and {len(differ) - 10} more" if len(differ) > 10 else "")
    return (f"the fleet no longer matches the reviewed plan ({reviewed['digest'][:19]}..., now "
            f"{plan['digest'][:19]}...): {shown or 'content'} differ; nothing was changed - run plan.yml again "
            "and review the new plan")
