# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Converge many hypervisors in one call (the fleet_guests module): one thread per endpoint, each the same
read -> plan -> apply as the guests module. A hypervisor whose plan fails (bad input for that host, an endpoint
that is down) changes nothing and is reported; the others go on."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gc
import hashlib
import json
import multiprocessing
import os
import signal
from typing import Any, Callable, Dict, List, Optional, Tuple

from ansible.module_utils.basic import AnsibleModule

from ._argspec import (
    connection_argument_spec,
    connection_secrets,
    convergence_argument_spec,
    endpoint_from_params,
    placement_from_params,
)
from ._converge import RunOptions, converge, planned
from ._endpoints import check_bounds
from ._errors import ConcurrentRunError, ConfigError, VirtfleetError, one_line
from ._fleet import fleet_from_dict
from ._fleet_plan import OPTIONS, build_plan
from ._guest_module import hide_secrets, run_options_from_params, secret_strings, specs_from_entries
from ._model import Placement
from ._placement import USER_DATA_MARK
from .backends import guest_backend_for, preload

TARGET_KEYS = ("hypervisor", "uri", "placement", "guests", "exclusive", "keep")


def user_data_of(fleet_file: Optional[str]) -> Dict[str, Any]:
    """Guest name -> its cloud_init.user_data, read from the fleet file (placement leaves it there)."""
    if not fleet_file:
        return {}
    try:  # PyYAML comes with ansible-core, on the controller where this runs; imported here, when needed
        import yaml
    except ImportError:
        raise ConfigError("fleet_file", fleet_file, "needs PyYAML to be read") from None
    try:
        with open(fleet_file, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as exc:  # pylint: disable=no-member
        raise ConfigError("fleet_file", fleet_file, f"cannot be read: {one_line(exc)}") from None
    return user_data_from(raw)


def user_data_from(raw: Any) -> Dict[str, Any]:
    """Guest name -> its cloud_init.user_data, from the fleet file's content (defaults merged, as placement did)."""
    return {g.name: g.options["cloud_init"]["user_data"] for g in fleet_from_dict(raw).guests
            if (g.options.get("cloud_init") or {}).get("user_data") is not None}


def with_user_data(entries: List[Any], user_data: Dict[str, Any], label: str) -> List[Any]:
    """ENTRIES with the user_data placement left in the fleet file put back (entries that carry USER_DATA_MARK)."""
    out = []
    for entry in entries:
        if isinstance(entry, dict) and entry.get(USER_DATA_MARK):
            name = entry.get("name")
            if name not in user_data:
                raise ConfigError(f"{label} guest {name!r}", "...", "its cloud_init.user_data is in the fleet file: "
                                                                    "give fleet_file (the file placement read)")
            entry = {k: v for k, v in entry.items() if k != USER_DATA_MARK}
            entry["cloud_init"] = dict(entry.get("cloud_init") or {}, user_data=user_data[name])
        out.append(entry)
    return out


PLACEMENT_KEYS = ("datacenter", "cluster", "esxi_host", "datastore", "folder", "resource_pool", "domain_type")


def _placement(target: Dict[str, Any], label: str) -> Placement:
    raw = target.get("placement") or {}
    unknown = sorted(set(raw) - set(PLACEMENT_KEYS))
    if unknown:
        raise ConfigError(f"{label}.placement.{unknown[0]}", raw[unknown[0]],
                          f"unknown option; expected one of {', '.join(PLACEMENT_KEYS)}")
    return placement_from_params(raw)


Group = List[Dict[str, Any]]


def _check_target(target: Dict[str, Any], label: str) -> None:
    unknown = sorted(set(target) - set(TARGET_KEYS))
    if unknown:
        raise ConfigError(f"{label}.{unknown[0]}", "...", f"unknown key; expected one of {', '.join(TARGET_KEYS)}")
    keep = target.get("keep") or []
    if not isinstance(keep, list) or not all(isinstance(k, str) for k in keep):
        raise ConfigError(f"{label}.keep", "...", "must be a list of guest names")


def _result(target: Dict[str, Any]) -> Dict[str, Any]:
    planned = [{"name": g.get("name")} for g in target.get("guests") or [] if isinstance(g, dict)]
    return {"hypervisor": str(target.get("hypervisor")), "uri": target.get("uri"), "failed": False, "msg": None,
            "guests": [], "planned": planned}


def _one(target: Dict[str, Any], backend: Any, options: RunOptions, user_data: Dict[str, Any],
         expect: Any = None) -> Dict[str, Any]:
    """One target on BACKEND (its endpoint's, shared with the endpoint's other targets). EXPECT: the check run's
    results, which this target's plan must match before anything is changed."""
    out = _result(target)
    label = f"targets[{out['hypervisor']}]"
    try:
        _check_target(target, label)
        specs = specs_from_entries(with_user_data(target.get("guests") or [], user_data, label))
        run = dataclasses.replace(options, exclusive=bool(target.get("exclusive")), allow_empty=True,
                                  keep=tuple(target.get("keep") or []),
                                  expected=None if expect is None else expected_of(expect, out["hypervisor"]))
        results = converge(backend, specs, _placement(target, label), run)
    except VirtfleetError as exc:
        out.update(failed=True, msg=str(exc))
        return out
    except Exception as exc:  # noqa: BLE001 - one hypervisor's library error never stops the others
        out.update(failed=True, msg=f"unexpected {type(exc).__name__}: {one_line(exc)}")
        return out
    out["guests"] = [r.to_dict() for r in results]
    failed = [r for r in results if r.failed]
    if failed:
        out.update(failed=True, msg="; ".join(f"{r.name}: {r.msg}" for r in failed))
    return out


def _endpoint(group: Group, params: Dict[str, Any], options: RunOptions,
              user_data: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every target of one endpoint, one after the other on one backend: one login, and on a vCenter one read of
    its inventory for all of its hosts (each host its own target) instead of one per host."""
    try:
        endpoint = endpoint_from_params(dict(params, uri=group[0].get("uri")))
        with guest_backend_for(endpoint, params["timeout"]) as backend:
            return [_one(target, backend, options, user_data, params.get("expect")) for target in group]
    except VirtfleetError as exc:
        error = str(exc)
    except Exception as exc:  # noqa: BLE001 - one endpoint's library error never stops the others
        error = f"unexpected {type(exc).__name__}: {one_line(exc)}"
    return [dict(_result(target), failed=True, msg=error) for target in group]


def converge_targets(targets: List[Dict[str, Any]], params: Dict[str, Any], options: RunOptions,
                     max_endpoints: int, user_data: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every target converged (in check mode: planned), endpoints in parallel; results in the targets' order."""
    if not targets:
        return []
    seen: Dict[str, int] = {}
    by_uri: Dict[str, List[int]] = {}
    for i, target in enumerate(targets):
        if not isinstance(target, dict):
            raise ConfigError(f"targets[{i}]", target, "must be a dict")
        name = str(target.get("hypervisor"))
        if name in seen:
            raise ConfigError(f"targets[{i}].hypervisor", name, f"listed twice (also targets[{seen[name]}])")
        seen[name] = i
        by_uri.setdefault(str(target.get("uri") or ""), []).append(i)
    groups = list(by_uri.values())
    # Guests of one endpoint are applied by that endpoint's own pool: keep the total number of threads bounded.
    per_endpoint = max(1, min(options.max_workers, 32 // min(len(groups), max_endpoints)))
    run = dataclasses.replace(options, max_workers=per_endpoint)
    processes = min(processes_for(len(groups)), max_endpoints)
    results: List[Dict[str, Any]] = [{} for _target in targets]

    def weight(group: List[int]) -> int:
        return sum(1 + len(targets[i].get("guests") or []) for i in group)

    # Reading and planning is CPU-bound (pyVmomi's SOAP parser): threads of one process contend for one core and
    # got slower than one thread. One process per core, each with its share of the endpoints (largest first to
    # the least loaded) and threads for the network waits.
    shares: List[List[List[int]]] = [[] for _share in range(processes)]
    load = [0] * processes
    for group in sorted(groups, key=lambda g: -weight(g)):
        least = load.index(min(load))
        shares[least].append(group)
        load[least] += weight(group)
    threads = max(1, max_endpoints // processes)

    def share_args(share: List[List[int]]) -> Any:
        return [[targets[i] for i in group] for group in share], params, run, threads, user_data

    def put(share: List[List[int]], outs: List[List[Dict[str, Any]]]) -> None:
        for group, out in zip(share, outs):
            for i, result in zip(group, out):
                results[i] = result

    if processes <= 1:
        put(shares[0], _run_share(*share_args(shares[0])))
        return results
    for uri in by_uri:
        preload("vsphere" if uri.startswith("vsphere://") else "libvirt")
    context = multiprocessing.get_context("fork")
    # A worker that dies (killed, a crash in C code) fails its own share's targets, not the others' results.
    # What this process holds (in an Ansible worker: the whole inventory) is moved out of the children's garbage
    # collection: scanning it would cost each child time and copy its memory pages.
    gc.freeze()
    try:
        with concurrent.futures.ProcessPoolExecutor(max_workers=processes, mp_context=context,
                                                    initializer=_worker_signals) as pool:
            futures = {pool.submit(_run_share, *share_args(share)): share for share in shares if share}
            for future in concurrent.futures.as_completed(futures):
                try:
                    outs = future.result()
                except Exception as exc:  # noqa: BLE001 - the worker process itself failed
                    msg = f"the worker process for this endpoint failed: {type(exc).__name__}: {one_line(exc)}"
                    outs = [[dict(_result(targets[i]), failed=True, msg=msg) for i in group]
                            for group in futures[future]]
                put(futures[future], outs)
    finally:
        gc.unfreeze()
    return results


def _worker_signals() -> None:
    """Workers forked from an Ansible worker inherit its SIGTERM/SIGINT handler, which cannot work in them: they stop
    when their parent is told to (Ctrl-C, a job cancelled in AWX) instead of going on unreported."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def processes_for(endpoints: int) -> int:
    """Worker processes for ENDPOINTS: one per core this process may run on, at most one per endpoint."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, endpoints))


def _run_share(groups: List[Group], params: Dict[str, Any], options: RunOptions, threads: int,
               user_data: Dict[str, Any]) -> List[List[Dict[str, Any]]]:
    """A worker's endpoints (each a group of targets), THREADS at a time."""
    if threads <= 1 or len(groups) == 1:
        return [_endpoint(g, params, options, user_data) for g in groups]
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(threads, len(groups))) as pool:
        return list(pool.map(lambda g: _endpoint(g, params, options, user_data), groups))


def fleet_guests_argument_spec() -> Dict[str, Any]:
    """The fleet_guests options: the connection options but the uri (each target has its own), the convergence
    options, the targets."""
    connection = {k: v for k, v in connection_argument_spec().items() if k != "uri"}
    return {**connection, **convergence_argument_spec(),
            "targets": {"type": "list", "elements": "dict"},
            # The place filter's output: its targets unless targets are given, and the plan is built from it.
            "placement": {"type": "dict"},
            # The fleet file placement read: the guests' cloud_init.user_data stays there until this reads it.
            "fleet_file": {"type": "path"},
            # Apply: what the check run planned (its targets) and the user_data it used; a difference changes nothing.
            "expect": {"type": "list", "elements": "dict"},
            "user_data_digest": {"type": "str"},
            "max_endpoints": {"type": "int", "default": 8}}


def expected_of(checked: Any, hypervisor: str) -> Dict[str, Tuple[str, str]]:
    """What the check run (CHECKED: its targets' results) planned for HYPERVISOR, as converge compares it."""
    for target in checked if isinstance(checked, list) else []:
        if isinstance(target, dict) and str(target.get("hypervisor")) == hypervisor:
            return {str(g.get("name")): planned(str(g.get("action")), g.get("changes") or [])
                    for g in target.get("guests") or [] if isinstance(g, dict)}
    return {}


def user_data_digest(user_data: Dict[str, Any]) -> str:
    """Which user_data a run used (sha256 over all of it): the apply must use what the check run did."""
    blob = json.dumps(user_data, sort_keys=True, default=str).encode("utf-8")
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def run_fleet(params: Dict[str, Any], check_mode: bool, user_data: Optional[Dict[str, Any]] = None,
              mask: Callable[[str], str] = str) -> Dict[str, Any]:
    """Validated parameters -> the result (changed, targets, restart_required, user_data_digest, plan);
    VirtfleetError on bad input. USER_DATA: the fleet file's (read from fleet_file when None). MASK is applied to
    every free-text message before the plan is built from the results (the plan itself holds no secret)."""
    check_bounds("max_endpoints", params["max_endpoints"], 256)
    if user_data is None:
        user_data = user_data_of(params.get("fleet_file"))
    digest = user_data_digest(user_data)
    if params.get("user_data_digest") and params["user_data_digest"] != digest:
        raise ConcurrentRunError("fleet_file", "its cloud_init.user_data changed since the plan was checked; nothing "
                                               "was changed - plan again")
    placement = params.get("placement")
    targets = params.get("targets")
    if targets is None:
        if placement is None:
            raise ConfigError("targets", None, "give targets, or placement (the place filter's output)")
        targets = placement.get("targets") or []
    options = run_options_from_params(dict(params, exclusive=False, allow_empty=True), check_mode)
    results = converge_targets(targets, params, options, int(params["max_endpoints"]), user_data)
    for result in results:
        if result.get("msg"):
            result["msg"] = mask(result["msg"])
        for guest in result.get("guests") or []:
            if guest.get("msg"):
                guest["msg"] = mask(guest["msg"])
    out = {"changed": any(g.get("changed") for r in results for g in r["guests"]), "targets": results,
           "restart_required": any(g.get("restart_required") for r in results for g in r["guests"]),
           "user_data_digest": digest}
    if placement is not None:
        out["plan"] = build_plan(placement, results, {k: params.get(k) for k in OPTIONS})
    return out


def secrets_of(params: Dict[str, Any], user_data: Optional[Dict[str, Any]] = None) -> List[str]:
    """What no output may carry: the password and every cloud_init.user_data string of the targets' guests and of
    the fleet file (USER_DATA, else read from fleet_file)."""
    # The password, and one in the uri or read from VIRTFLEET_PASSWORD_FILE.
    found = ([params["password"]] if params.get("password") else []) + connection_secrets(params)
    try:
        if user_data is None:
            user_data = user_data_of(params.get("fleet_file"))
        found.extend(t for v in user_data.values() for t in secret_strings(v))
    except ConfigError:
        pass  # reported by the run itself
    for target in (params.get("targets") or []) + list((params.get("placement") or {}).get("targets") or []):
        for entry in (target.get("guests") or []) if isinstance(target, dict) else []:
            cloud_init = entry.get("cloud_init") if isinstance(entry, dict) else None
            if isinstance(cloud_init, dict):
                found.extend(secret_strings(cloud_init.get("user_data")))
    return found


def run_fleet_module(module: AnsibleModule) -> None:
    """The fleet_guests module's edge (the action plugin of the same name runs run_fleet on the controller)."""
    invocation = hide_secrets(module)
    try:
        user_data = user_data_of(module.params.get("fleet_file"))
        module.no_log_values.update(secrets_of(module.params, user_data))
        result = run_fleet(module.params, module.check_mode, user_data)
    except VirtfleetError as exc:
        module.fail_json(msg=str(exc), invocation=invocation)
    module.exit_json(invocation=invocation, **result)
