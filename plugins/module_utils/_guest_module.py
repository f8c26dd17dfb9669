# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The edge shared by the guest modules: parameters -> backend -> converge -> exit_json/fail_json.

Errors become a failure exactly once, here; everything below raises domain exceptions.
"""

from __future__ import annotations

import fnmatch
import traceback
from typing import Any, Dict, List, Optional

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator

from ._argspec import (
    endpoint_from_params,
    guest_argument_spec,
    placement_from_params,
    run_options_from_params,
)
from ._converge import converge, diff_of
from ._errors import ConfigError, VirtfleetError, one_line
from ._model import GuestSpec, GuestState, guest_spec_from_dict
from .backends.base import GuestBackend, backend_for


def guest_backend(module: AnsibleModule) -> GuestBackend:
    endpoint = endpoint_from_params(module.params)
    backend = backend_for(endpoint, module.params["timeout"])
    if not isinstance(backend, GuestBackend):
        raise ConfigError("uri", module.params["uri"], "this endpoint cannot hold guests (use a libvirt or vSphere "
                                                       "uri)")
    return backend


def specs_from_entries(entries: List[Any]) -> List[GuestSpec]:
    """Each entry of ``guests`` checked against the same argument spec as the guest module's options."""
    validator = ArgumentSpecValidator(guest_argument_spec())
    specs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"guests[{i}]", entry, "must be a dict of guest options")
        result = validator.validate(entry)
        if result.error_messages:
            label = f"guests[{i}] ({entry.get('name')})" if entry.get("name") else f"guests[{i}]"
            raise ConfigError(label, "...", result.error_messages[0])
        specs.append(guest_spec_from_dict(result.validated_parameters))
    return specs


def run_guests(module: AnsibleModule, single: bool) -> None:
    """Converge the module's guest (SINGLE) or its ``guests`` list and exit."""
    params = module.params
    try:
        if single:
            specs = [guest_spec_from_dict({k: params[k] for k in guest_argument_spec()})]
        else:
            specs = specs_from_entries(params["guests"])
        options = run_options_from_params(params, module.check_mode)
        placement = placement_from_params(params)
        with guest_backend(module) as backend:
            results = converge(backend, specs, placement, options)
    except VirtfleetError as exc:
        module.fail_json(msg=str(exc))
    except Exception as exc:  # noqa: BLE001 - a library error outside the expected ones: one line + traceback
        module.fail_json(msg=f"unexpected {type(exc).__name__}: {one_line(exc)}", exception=traceback.format_exc())
    out: Dict[str, Any] = {"changed": any(r.changed for r in results),
                           "restart_required": any(r.restart_required for r in results)}
    if single:
        out.update({k: v for k, v in results[0].to_dict().items() if k not in ("name", "failed", "msg")})
    else:
        out["guests"] = [r.to_dict() for r in results]
    if module._diff:
        diff = diff_of(results)
        if single:
            name = results[0].name
            diff = {"before": diff["before"].get(name) or {}, "after": diff["after"].get(name) or {}}
        out["diff"] = diff
    failed = [r for r in results if r.failed]
    if failed:
        msg = "; ".join(f"{r.name}: {r.msg}" for r in failed)
        module.fail_json(msg=f"{len(failed)} of {len(results)} guests failed: {msg}", **out)
    module.exit_json(**out)


def select_guests(states: List[GuestState], pattern: Optional[str], tags: Optional[Dict[str, Any]],
                  power_state: Optional[str]) -> List[Dict[str, Any]]:
    """guest_info's filters, applied to one bulk read. Each guest is its guest options (so it can be fed back as
    desired state) plus ``status``, what only the hypervisor knows, which the guest modules ignore."""
    out = []
    for state in states:
        spec = state.spec
        if pattern and not fnmatch.fnmatchcase(spec.name, pattern):
            continue
        if tags and any((spec.tags or {}).get(str(k)) != str(v) for k, v in tags.items()):
            continue
        if power_state and state.power_state != power_state:
            continue
        facts = spec.facts()
        # The seed's documents are not read back, only their digest: as desired state that means "leave as is".
        digest = facts.pop("cloud_init")
        facts["state"] = _STATE_OF_POWER.get(state.power_state, "present")
        facts["status"] = {"power_state": state.power_state, "owner": state.owner, "cloud_init_digest": digest,
                           "pending_restart": list(state.pending_restart)}
        out.append(facts)
    return sorted(out, key=lambda g: g["name"])


# A paused or suspended guest is left as it is when fed back.
_STATE_OF_POWER = {"running": "running", "stopped": "stopped"}
