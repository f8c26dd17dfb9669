# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The edge shared by the guest modules: parameters -> backend -> converge -> exit_json/fail_json.

Errors become a failure exactly once, here; everything below raises domain exceptions.
"""

from __future__ import annotations

import copy
import traceback
from typing import Any, Dict, List, NoReturn

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator

from ._argspec import connection_secrets, guest_argument_spec, placement_from_params, without_none
from ._converge import RunOptions, converge, diff_of
from ._endpoints import check_bounds
from ._errors import ConfigError, VirtfleetError, one_line
from ._guest_read import guest_backend
from ._model import GuestSpec, guest_spec_from_dict, owner_id
from ._plan import PlanOptions

MAX_SHUTDOWN_TIMEOUT = 86400.0


def run_options_from_params(params: Dict[str, Any], check_mode: bool) -> RunOptions:
    timeout = params["shutdown_timeout"]
    check_bounds("shutdown_timeout", timeout, MAX_SHUTDOWN_TIMEOUT)
    return RunOptions(plan=PlanOptions(allow_restart=params["allow_restart"], remove_storage=params["remove_storage"],
                                       force=params["force"]),
                      exclusive=bool(params.get("exclusive")), allow_empty=bool(params.get("allow_empty")),
                      owner=owner_id(params["owner"]), shutdown_timeout=timeout, check_mode=check_mode)


def specs_from_entries(entries: List[Any]) -> List[GuestSpec]:
    """Each entry of ``guests`` checked against the same argument spec as the guest module's options."""
    validator = ArgumentSpecValidator(guest_argument_spec())
    return [guest_spec_from_dict(entry_options(validator, i, entry)) for i, entry in enumerate(entries)]


def entry_options(validator: ArgumentSpecValidator, i: int, entry: Any) -> Dict[str, Any]:
    """Entry I of ``guests`` validated by VALIDATOR (the guest spec's); ConfigError naming the entry."""
    if not isinstance(entry, dict):
        raise ConfigError(f"guests[{i}]", entry, "must be a dict of guest options")
    result = validator.validate(without_none(entry))
    if result.error_messages:
        label = f"guests[{i}] ({entry.get('name')})" if entry.get("name") else f"guests[{i}]"
        raise ConfigError(label, "...", result.error_messages[0])
    return result.validated_parameters


class GuestListModule(AnsibleModule):
    """AnsibleModule for a module whose ``guests`` entries are declared suboptions (guest_entry_spec: documented,
    types coerced, checked before the module runs). When AnsibleModule refuses the parameters, its message says
    where in the spec (``found in guests``) but not which entry: the first entry the guest spec refuses is named
    instead, in the module's own form (``guests[1] (web02)='...': value of firmware must be one of ...``)."""

    _given: Any = None

    def _load_params(self) -> None:
        super()._load_params()
        # The entries as given: validation replaces an entry it cannot read as a dict (the list comes back empty).
        self._given = copy.deepcopy(self.params.get("guests"))

    def fail_json(self, msg: str, **kwargs: Any) -> NoReturn:
        result = getattr(self, "validation_result", None)
        if result is not None and result.errors and isinstance(self._given, list):
            # Only AnsibleModule.__init__ fails with validation errors: a module with none runs on.
            validator = ArgumentSpecValidator(guest_argument_spec())
            try:
                for i, entry in enumerate(self._given):
                    entry_options(validator, i, entry)
            except ConfigError as exc:
                msg = str(exc)
            kwargs["invocation"] = hide_secrets(self)
        super().fail_json(msg, **kwargs)
        raise AssertionError("fail_json returned")  # it exits; this tells the type checker so


NO_LOG = "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"


def hide_secrets(module: AnsibleModule) -> Dict[str, Any]:
    """What the module returns as ``invocation``, with every secret it was given masked.

    The ``guests`` entries are validated here, not by AnsibleModule (whose messages do not name the guest), so
    their ``cloud_init.user_data`` is not a declared no_log suboption: it is masked here, and its strings join
    the module's no_log values so that no output can carry them. A password in ``uri`` is hidden the same way.
    """
    module.no_log_values.update(connection_secrets(module.params))
    params = copy.deepcopy(module.params)
    mask_user_data(module, params.get("guests"))
    for target in params.get("targets") or []:  # fleet_guests: each target's guests
        if isinstance(target, dict):
            mask_user_data(module, target.get("guests"))
    return {"module_args": params}


def mask_user_data(module: AnsibleModule, entries: Any) -> None:
    """Mask each entry's cloud_init.user_data in place, and make its strings no_log values of MODULE."""
    for entry in entries if isinstance(entries, list) else []:
        cloud_init = entry.get("cloud_init") if isinstance(entry, dict) else None
        if isinstance(cloud_init, dict) and cloud_init.get("user_data") is not None:
            module.no_log_values.update(secret_strings(cloud_init["user_data"]))
            cloud_init["user_data"] = NO_LOG


def secret_strings(user_data: Any) -> List[str]:
    """The strings of a user_data document that no output may carry. Short values (true, a package name) are
    left out: masking them would mask unrelated output."""
    return [text for text in strings_of(user_data) if len(text) >= 8]


def strings_of(value: Any) -> List[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings_of(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings_of(v)]
    return []


def run_guests(module: AnsibleModule, single: bool) -> None:
    """Converge the module's guest (SINGLE) or its ``guests`` list and exit."""
    params = module.params
    invocation = hide_secrets(module)
    try:
        if single:
            specs = [guest_spec_from_dict({k: params[k] for k in guest_argument_spec()})]
        else:
            # AnsibleModule validated the entries against the guest spec (GuestListModule): the model's checks remain.
            # (A second validation would warn about each disk's pool beside its alias datastore, both set by then.)
            specs = [guest_spec_from_dict(entry) for entry in params["guests"]]
        options = run_options_from_params(params, module.check_mode)
        placement = placement_from_params(params)
        with guest_backend(module) as backend:
            results = converge(backend, specs, placement, options)
    except VirtfleetError as exc:
        module.fail_json(msg=str(exc), invocation=invocation)
    except Exception as exc:  # noqa: BLE001 - a library error outside the expected ones: one line + traceback
        module.fail_json(msg=f"unexpected {type(exc).__name__}: {one_line(exc)}", exception=traceback.format_exc(),
                         invocation=invocation)
    out: Dict[str, Any] = {"changed": any(r.changed for r in results),
                           "restart_required": any(r.restart_required for r in results), "invocation": invocation}
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
