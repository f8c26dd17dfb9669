# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Read -> plan -> apply -> read back, for one guest or many on one endpoint. Readable top to bottom.

Everything that can be wrong with the input is found while planning, for every guest, before the first
mutator runs; in check mode no mutator runs at all. Guests are applied in parallel (their waits overlap).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
from typing import Any, Dict, List, Optional, Tuple

from ._errors import ConcurrentRunError, ConfigError, VirtfleetError, one_line
from ._model import OWNER_TAG, GuestSpec, GuestState, Placement
from ._plan import GuestPlan, Planner, PlanOptions
from .backends.base import GuestBackend


@dataclasses.dataclass
class RunOptions:
    plan: PlanOptions = dataclasses.field(default_factory=PlanOptions)
    exclusive: bool = False
    # With exclusive, an empty list would remove every guest OWNER owns: only when the user says so.
    allow_empty: bool = False
    owner: str = OWNER_TAG
    shutdown_timeout: float = 120.0
    check_mode: bool = False
    max_workers: int = 8
    # With exclusive, names never removed although not in the list (a fleet's guests placed elsewhere or not
    # placed at all: the fleet declares them, so prune must not delete them).
    keep: Tuple[str, ...] = ()
    # When set: what an earlier check-mode run planned, guest name -> (action, changes as JSON text). A plan that
    # differs is refused before anything is changed (a fleet apply changes only what was planned and reviewed).
    expected: Optional[Dict[str, Tuple[str, str]]] = None


@dataclasses.dataclass
class GuestResult:
    name: str
    changed: bool
    action: str
    changes: List[Dict[str, Any]]
    restart_required: bool
    guest: Optional[Dict[str, Any]]
    before: Optional[Dict[str, Any]]
    failed: bool = False
    msg: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("before")
        return data


def find_current(spec: GuestSpec, states: List[GuestState]) -> Optional[GuestState]:
    """The guest SPEC describes. A uuid never overrides the name: a uuid that belongs to a guest of another
    name is refused, so a typo cannot act on (or delete) a guest the user did not name."""
    if spec.uuid:
        for state in states:
            if state.spec.uuid == spec.uuid:
                if state.spec.name != spec.name:
                    raise ConfigError(f"guest {spec.name!r} uuid", spec.uuid,
                                      f"belongs to the guest {state.spec.name!r}; a guest is only ever acted on "
                                      "by its own name")
                return state
    same_name = [s for s in states if s.spec.name == spec.name]
    if same_name and not any(s.in_scope for s in same_name):
        # vCenter: a guest of this name lives outside the cluster/host, folder and resource pool the task places
        # guests in - another team's, maybe. Never adopted; never a second one created beside it either.
        raise ConfigError(f"guest {spec.name!r} name", spec.name,
                          "exists outside the cluster/host, folder and resource pool given; it is not changed, "
                          "and no second guest of this name is made (widen the placement or rename)")
    same_name = [s for s in same_name if s.in_scope]
    if len(same_name) > 1:
        raise ConfigError(f"guest {spec.name!r} name", spec.name,
                          f"{len(same_name)} guests have this name; set uuid to say which one")
    return same_name[0] if same_name else None


def _check_list(specs: List[GuestSpec], options: RunOptions) -> None:
    names: Dict[str, int] = {}
    uuids: Dict[str, int] = {}
    for i, spec in enumerate(specs):
        if spec.name in names:
            raise ConfigError(f"guests[{i}].name", spec.name, f"listed twice (also guests[{names[spec.name]}])")
        names[spec.name] = i
        if spec.uuid:
            if spec.uuid in uuids:
                raise ConfigError(f"guests[{i}] ({spec.name}) uuid", spec.uuid,
                                  f"listed twice (also guests[{uuids[spec.uuid]}] ({specs[uuids[spec.uuid]].name}))")
            uuids[spec.uuid] = i
    if options.exclusive and not specs and not options.allow_empty:
        raise ConfigError("guests", [], f"is empty while exclusive is true, which would remove every guest owned by "
                                        f"{options.owner!r}; set allow_empty: true if that is what you mean")


def _new_disks(specs: List[GuestSpec], currents: List[Optional[GuestState]]) -> List[GuestSpec]:
    """The guests and disks that creating would make: only for these can kept storage be picked up (asking for
    every disk of every guest would make a backend read what is in use on every run)."""
    out = []
    for spec, current in zip(specs, currents):
        have = {d.name for d in (current.spec.disks or [])} if current is not None else set()
        disks = [d for d in spec.disks or [] if d.name not in have]
        if disks and spec.state != "absent":
            out.append(dataclasses.replace(spec, disks=disks))
    return out


def plan_all(backend: GuestBackend, specs: List[GuestSpec], placement: Placement,
             options: RunOptions) -> List[GuestPlan]:
    """Every guest's plan, or a ConfigError for the first bad one; nothing is changed here."""
    _check_list(specs, options)
    for spec in specs:
        backend.verify_spec(spec)
    capacity = backend.capacity(placement)
    states = backend.read_guests(placement)
    for state in states:  # every guest within reach holds its MACs, whatever the backend's capacity read saw
        for nic in state.spec.nics or []:
            if nic.mac:
                capacity.macs.setdefault(nic.mac, state.spec.name)
    currents = [find_current(spec, states) for spec in specs]
    planner = Planner(capacity, backend.defaults, options.plan,
                      backend.leftover_disks(_new_disks(specs, currents), placement))
    plans = [planner.plan(spec, current) for spec, current in zip(specs, currents)]
    if options.exclusive:
        # Only guests this owner's mark was written on, inside what the user placed guests in.
        kept = {id(p.current) for p in plans if p.current is not None}
        names = {s.name for s in specs} | set(options.keep)
        for state in states:
            if (state.owned_by(options.owner) and state.in_scope and id(state) not in kept
                    and state.spec.name not in names):
                plans.append(planner.plan(GuestSpec(name=state.spec.name, state="absent"), state))
    return plans


def _apply(backend: GuestBackend, plan: GuestPlan, placement: Placement, options: RunOptions) -> None:
    current = plan.current
    if plan.action == "remove" and current is not None:
        backend.remove_guest(current, plan.remove_storage)
        return
    if plan.action == "create" and plan.after is not None:
        created = backend.create_guest(plan.after, placement, options.owner)
        if plan.power == "start":
            backend.start_guest(created)
        return
    if current is None:
        return
    if plan.action == "update" and any(c.field != "power_state" for c in plan.changes):
        backend.update_guest(current, plan)
    if plan.power == "start":
        backend.start_guest(current)
    elif plan.power == "stop":
        backend.stop_guest(current, options.shutdown_timeout, options.plan.force)
        backend.apply_offline(current, plan)
    elif plan.power == "restart":
        backend.restart_guest(current, options.shutdown_timeout, options.plan.force, plan)


def planned(action: str, changes: List[Dict[str, Any]]) -> Tuple[str, str]:
    """A guest's plan as compared between a check run and the apply: the action and the changes, as JSON."""
    keys = ("field", "before", "after", "live")
    return action, json.dumps([{k: c.get(k) for k in keys} for c in changes], sort_keys=True, default=str)


def _check_expected(plans: List[GuestPlan], expected: Dict[str, Tuple[str, str]]) -> None:
    now = {p.desired.name: planned(p.action, [c.to_dict() for c in p.changes]) for p in plans}
    differ = sorted(n for n in set(now) | set(expected)
                    if now.get(n, ("none", "[]")) != expected.get(n, ("none", "[]")))
    if differ:
        raise ConcurrentRunError("plan", f"changed since it was checked for {', '.join(differ[:5])}"
                                         f"{' and more' if len(differ) > 5 else ''}; nothing was changed on this "
                                         "hypervisor - plan again")


def converge(backend: GuestBackend, specs: List[GuestSpec], placement: Placement,
             options: RunOptions) -> List[GuestResult]:
    """Plan every guest, then (outside check mode) apply the plans in parallel and read the guests back."""
    plans = plan_all(backend, specs, placement, options)
    if options.expected is not None and not options.check_mode:
        _check_expected(plans, options.expected)
    errors: Dict[int, str] = {}
    if not options.check_mode:
        todo = [i for i, p in enumerate(plans) if p.changed]
        if todo:
            with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(options.max_workers, len(todo)))) as pool:
                futures = {pool.submit(_apply, backend, plans[i], placement, options): i for i in todo}
                for future in concurrent.futures.as_completed(futures):
                    try:
                        future.result()
                    except VirtfleetError as exc:
                        errors[futures[future]] = str(exc)
                    except Exception as exc:  # noqa: BLE001 - reported per guest, never a bare traceback
                        errors[futures[future]] = f"{type(exc).__name__}: {one_line(exc)}"
    after: Dict[str, GuestState] = {}
    read_back_error = None
    if not options.check_mode and any(p.changed for p in plans):
        try:
            after = {s.spec.name: s for s in backend.read_guests(placement)}
        except VirtfleetError as exc:  # the changes are made: report them, and that the read-back failed
            read_back_error = f"changed, but reading the guests back failed: {exc}"
    results = []
    for i, plan in enumerate(plans):
        name = plan.desired.name
        if options.check_mode or not plan.changed:
            facts = plan.after.facts() if plan.after is not None else None
        else:
            facts = after[name].spec.facts() if name in after else None
        if facts is not None and options.check_mode and plan.action == "create":
            facts["uuid"] = plan.desired.uuid  # known after creation only, unless the user set it
        results.append(GuestResult(
            name=name,
            changed=plan.changed,
            action=plan.action,
            changes=[c.to_dict() for c in plan.changes],
            restart_required=plan.restart_required,
            guest=facts,
            before=plan.current.spec.facts() if plan.current is not None else None,
            failed=i in errors or (read_back_error is not None and plan.changed),
            msg=errors.get(i) or (read_back_error if plan.changed else None),
        ))
    return results


def diff_of(results: List[GuestResult]) -> Dict[str, Any]:
    """Before/after of the normalised model (never raw XML or a ConfigSpec), only for changed guests."""
    before = {r.name: r.before for r in results if r.changed}
    after = {r.name: r.guest for r in results if r.changed}
    return {"before": before, "after": after}
