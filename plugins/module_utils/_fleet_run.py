# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Converge many hypervisors in one call (the fleet_guests module): one thread per endpoint, each the same
read -> plan -> apply as the guests module. A hypervisor whose plan fails (bad input for that host, an endpoint
that is down) changes nothing and is reported; the others go on."""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Any, Dict, List

from ansible.module_utils.basic import AnsibleModule

from ._argspec import endpoint_from_params
from ._converge import RunOptions, converge
from ._endpoints import check_bounds
from ._errors import ConfigError, VirtfleetError, one_line
from ._guest_module import hide_secrets, run_options_from_params, specs_from_entries
from ._model import Placement
from .backends import guest_backend_for

TARGET_KEYS = ("hypervisor", "uri", "placement", "guests", "exclusive")
PLACEMENT_KEYS = ("datacenter", "cluster", "esxi_host", "datastore", "folder", "resource_pool", "domain_type")


def _placement(target: Dict[str, Any], label: str) -> Placement:
    raw = target.get("placement") or {}
    unknown = sorted(set(raw) - set(PLACEMENT_KEYS))
    if unknown:
        raise ConfigError(f"{label}.placement.{unknown[0]}", raw[unknown[0]],
                          f"unknown option; expected one of {', '.join(PLACEMENT_KEYS)}")
    return Placement(datacenter=raw.get("datacenter"), cluster=raw.get("cluster"), esxi_host=raw.get("esxi_host"),
                     pool=raw.get("datastore"), folder=raw.get("folder"), resource_pool=raw.get("resource_pool"),
                     domain_type=raw.get("domain_type"))


def _one(target: Dict[str, Any], params: Dict[str, Any], options: RunOptions) -> Dict[str, Any]:
    name = str(target.get("hypervisor"))
    planned = [{"name": g.get("name")} for g in target.get("guests") or [] if isinstance(g, dict)]
    out: Dict[str, Any] = {"hypervisor": name, "uri": target.get("uri"), "failed": False, "msg": None,
                           "guests": [], "planned": planned}
    try:
        label = f"targets[{name}]"
        unknown = sorted(set(target) - set(TARGET_KEYS))
        if unknown:
            raise ConfigError(f"{label}.{unknown[0]}", "...", f"unknown key; expected one of {', '.join(TARGET_KEYS)}")
        specs = specs_from_entries(target.get("guests") or [])
        placement = _placement(target, label)
        endpoint = endpoint_from_params(dict(params, uri=target.get("uri")))
        run = dataclasses.replace(options, exclusive=bool(target.get("exclusive")), allow_empty=True)
        with guest_backend_for(endpoint, params["timeout"]) as backend:
            results = converge(backend, specs, placement, run)
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


def converge_targets(targets: List[Dict[str, Any]], params: Dict[str, Any], options: RunOptions,
                     max_endpoints: int) -> List[Dict[str, Any]]:
    """Every target converged (in check mode: planned), endpoints in parallel; results in the targets' order."""
    if not targets:
        return []
    seen: Dict[str, int] = {}
    for i, target in enumerate(targets):
        if not isinstance(target, dict):
            raise ConfigError(f"targets[{i}]", target, "must be a dict")
        name = str(target.get("hypervisor"))
        if name in seen:
            raise ConfigError(f"targets[{i}].hypervisor", name, f"listed twice (also targets[{seen[name]}])")
        seen[name] = i
    # Guests of one endpoint are applied by that endpoint's own pool: keep the total number of threads bounded.
    per_endpoint = max(1, min(options.max_workers, 32 // min(len(targets), max_endpoints)))
    run = dataclasses.replace(options, max_workers=per_endpoint)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(max_endpoints, len(targets)))) as pool:
        return list(pool.map(lambda t: _one(t, params, run), targets))


def run_fleet_module(module: AnsibleModule) -> None:
    """The fleet_guests module's edge: parameters -> converge_targets -> exit_json/fail_json."""
    invocation = hide_secrets(module)
    params = module.params
    try:
        check_bounds("max_endpoints", params["max_endpoints"], 256)
        options = run_options_from_params(dict(params, exclusive=False, allow_empty=True), module.check_mode)
        results = converge_targets(params["targets"], params, options, int(params["max_endpoints"]))
    except VirtfleetError as exc:
        module.fail_json(msg=str(exc), invocation=invocation)
    changed = any(g.get("changed") for r in results for g in r["guests"])
    module.exit_json(changed=changed, targets=results, invocation=invocation,
                     restart_required=any(g.get("restart_required") for r in results for g in r["guests"]))
