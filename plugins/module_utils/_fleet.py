# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The fleet file: the guests a fleet must run, where they may go, and how each hypervisor is read.

Validated with Ansible's ArgumentSpecValidator against the guest modules' own spec (``guest_argument_spec``) plus
the placement constraints, then every guest through the same model check as the guest modules. Each problem is
one ConfigError naming the entry and the field. Pure: nothing is contacted here.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import math
from typing import Any, Dict, List, Optional

from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
from ansible.module_utils.errors import NoLogError

from ._argspec import guest_argument_spec, plain_data, without_none
from ._errors import ConfigError
from ._model import GuestSpec, guest_spec_from_dict, owner_id
from ._plan import NEW_GUEST_DEFAULTS

HYPERVISOR_TYPES = ("esxi", "kvm")
STRATEGIES = ("spread", "pack")
# Nova's defaults are 16 (vCPU) and 1.5 (memory); for hosts that run databases and build agents, a cautious 4x vCPU
# and no memory overcommit. Both are per hypervisor in the fleet file.
DEFAULT_CPU_RATIO = 4.0
DEFAULT_MEMORY_RATIO = 1.0

# The placement constraints a fleet guest has beside the guest options.
CONSTRAINT_SPEC: Dict[str, Any] = {
    "hypervisor_type": {"type": "str", "choices": list(HYPERVISOR_TYPES)},
    "pin": {"type": "str"},
    "anti_affinity": {"type": "str"},
    "labels": {"type": "list", "elements": "str"},
}

HYPERVISOR_SPEC: Dict[str, Any] = {
    # Selectors (all given must match): the inventory name (a glob), the type, the vCenter cluster.
    "name": {"type": "str"},
    "type": {"type": "str", "choices": list(HYPERVISOR_TYPES)},
    "cluster": {"type": "str"},
    # Settings.
    "labels": {"type": "list", "elements": "str"},
    "cpu_ratio": {"type": "float"},
    "memory_ratio": {"type": "float"},
    "reserved_memory_mib": {"type": "int"},
    "networks": {"type": "dict"},
    "storage": {"type": "dict"},
    "domain_type": {"type": "str", "choices": ["kvm", "qemu"]},
    "folder": {"type": "str"},
    "resource_pool": {"type": "str"},
}
SELECTORS = ("name", "type", "cluster")

FLEET_SPEC: Dict[str, Any] = {
    "name": {"type": "str", "required": True},
    "prune": {"type": "bool", "default": False},
    "allow_empty": {"type": "bool", "default": False},
    "strategy": {"type": "str", "default": "spread", "choices": list(STRATEGIES)},
    "defaults": {"type": "dict", "default": {}},
    # Entries are validated one by one below, so that a problem names the entry (guests[3] (web03)).
    "hypervisors": {"type": "list", "elements": "dict", "default": []},
    "guests": {"type": "list", "elements": "dict", "required": True},
}


def fleet_guest_spec() -> Dict[str, Any]:
    """One fleet guest: the guest modules' spec (one spec, not two) plus the placement constraints."""
    return {**guest_argument_spec(), **CONSTRAINT_SPEC}


def defaults_spec() -> Dict[str, Any]:
    """``defaults:``: any fleet guest option but the name, none required and none defaulted (a default here
    would override nothing and hide what the user wrote)."""
    spec = copy.deepcopy(fleet_guest_spec())
    spec.pop("name")
    for option in spec.values():
        option.pop("required", None)
        option.pop("default", None)
    return spec


@dataclasses.dataclass
class FleetGuest:
    spec: GuestSpec
    # The guest options as validated (None-free), what the guest modules are given for this guest.
    options: Dict[str, Any]
    hypervisor_type: Optional[str] = None
    pin: Optional[str] = None
    anti_affinity: Optional[str] = None
    labels: List[str] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def vcpus(self) -> int:
        return int(self.spec.vcpus or NEW_GUEST_DEFAULTS["vcpus"])

    @property
    def memory_mib(self) -> int:
        return int(self.spec.memory_mib or NEW_GUEST_DEFAULTS["memory_mib"])


@dataclasses.dataclass
class HypervisorRule:
    index: int
    selectors: Dict[str, str]
    settings: Dict[str, Any]

    def matches(self, name: str, hv_type: Optional[str], cluster: Optional[str]) -> bool:
        if "name" in self.selectors and not fnmatch.fnmatchcase(name, self.selectors["name"]):
            return False
        if "type" in self.selectors and self.selectors["type"] != hv_type:
            return False
        return "cluster" not in self.selectors or self.selectors["cluster"] == cluster


@dataclasses.dataclass
class Fleet:
    name: str
    prune: bool
    allow_empty: bool
    strategy: str
    guests: List[FleetGuest]
    hypervisors: List[HypervisorRule]


def _validate(spec: Dict[str, Any], data: Any, label: str) -> Dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(label, data, "must be a mapping")
    result = ArgumentSpecValidator(spec).validate(without_none(data))
    if result.error_messages:
        # A no_log option's error says only that a value could not be parsed: the next one names the field.
        named = [str(e) for e in result.errors if not isinstance(e, NoLogError)] or result.error_messages
        raise ConfigError(label, "...", named[0])
    return without_none(result.validated_parameters)


def _merge(defaults: Dict[str, Any], entry: Dict[str, Any]) -> Dict[str, Any]:
    """A guest over the fleet's defaults: the guest's own value wins; tags are merged key by key."""
    merged = dict(copy.deepcopy(defaults))
    for key, value in entry.items():
        if key == "tags" and isinstance(value, dict) and isinstance(merged.get("tags"), dict):
            merged["tags"] = {**merged["tags"], **value}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _ratio(label: str, value: Any) -> None:
    if value is not None and (not math.isfinite(value) or value <= 0 or value > 1000):
        raise ConfigError(label, value, "must be a number greater than 0 and at most 1000")


def _names_map(label: str, value: Any) -> None:
    if value is None:
        return
    for key, real in value.items():
        if not isinstance(real, str) or not real:
            raise ConfigError(f"{label}.{key}", real, "must be the hypervisor's own name for it (a string)")


def _hypervisor_rule(index: int, raw: Any) -> HypervisorRule:
    label = f"fleet hypervisors[{index}]"
    data = _validate(HYPERVISOR_SPEC, raw, label)
    selectors = {k: data.pop(k) for k in SELECTORS if k in data}
    if not selectors:
        raise ConfigError(label, "...", f"names no hypervisor: give at least one of {', '.join(SELECTORS)}")
    _ratio(f"{label}.cpu_ratio", data.get("cpu_ratio"))
    _ratio(f"{label}.memory_ratio", data.get("memory_ratio"))
    reserved = data.get("reserved_memory_mib")
    if reserved is not None and reserved < 0:
        raise ConfigError(f"{label}.reserved_memory_mib", reserved, "must be 0 or more")
    _names_map(f"{label}.networks", data.get("networks"))
    _names_map(f"{label}.storage", data.get("storage"))
    return HypervisorRule(index=index, selectors=selectors, settings=data)


def _fleet_guest(index: int, raw: Any, defaults: Dict[str, Any]) -> FleetGuest:
    name = raw.get("name") if isinstance(raw, dict) else None
    label = f"fleet guests[{index}] ({name})" if name else f"fleet guests[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(label, raw, "must be a mapping of guest options")
    data = _validate(fleet_guest_spec(), _merge(defaults, plain_data(raw)), label)
    constraints = {k: data.pop(k) for k in CONSTRAINT_SPEC if k in data}
    try:
        spec = guest_spec_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"fleet guests[{index}] {exc.option}", exc.value, exc.problem) from None
    data.pop("status", None)
    return FleetGuest(spec=spec, options=data, hypervisor_type=constraints.get("hypervisor_type"),
                      pin=constraints.get("pin"), anti_affinity=constraints.get("anti_affinity"),
                      labels=list(constraints.get("labels") or []))


def fleet_from_dict(raw: Any) -> Fleet:
    """The fleet file as read (YAML -> dict), validated; the first problem is one ConfigError."""
    data = _validate(FLEET_SPEC, plain_data(raw), "fleet")
    name = owner_id(data["name"], "fleet name")
    defaults = _validate(defaults_spec(), data.get("defaults") or {}, "fleet defaults")
    rules = [_hypervisor_rule(i, entry) for i, entry in enumerate(data.get("hypervisors") or [])]
    guests: List[FleetGuest] = []
    seen: Dict[str, int] = {}
    for i, entry in enumerate(data["guests"]):
        guest = _fleet_guest(i, entry, defaults)
        if guest.name in seen:
            raise ConfigError(f"fleet guests[{i}].name", guest.name, f"listed twice (also guests[{seen[guest.name]}])")
        seen[guest.name] = i
        guests.append(guest)
    if data["prune"] and not guests and not data["allow_empty"]:
        raise ConfigError("fleet guests", [], "is empty while prune is true, which would remove every guest of fleet "
                                              f"{name!r}; set allow_empty: true if that is what you mean")
    return Fleet(name=name, prune=data["prune"], allow_empty=data["allow_empty"], strategy=data["strategy"],
                 guests=guests, hypervisors=rules)
