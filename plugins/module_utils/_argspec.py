# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Argument specs shared by the modules; each has a doc fragment in plugins/doc_fragments of the same name.

Specs and the parsing of connection and placement options only: read-only modules import this, so it never
imports the planner or the convergence engine."""

from __future__ import annotations

import json
from typing import Any, Dict, List

from ansible.module_utils.basic import env_fallback

from ._endpoints import (
    Endpoint,
    env_credentials,
    env_password,
    parse_endpoint,
    uri_password,
    with_credentials,
    with_current_credential_files,
)
from ._errors import ConfigError
from ._model import DISK_BUSES, DISK_FORMATS, FIRMWARES, GUEST_STATES, NIC_MODELS, OWNER_TAG, Placement


def without_none(value: Any) -> Any:
    """An entry as the user wrote it: AnsibleModule fills every unset suboption with None, which a second
    validation would take as set (None is not one of a choice's values)."""
    if isinstance(value, dict):
        return {k: without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_none(v) for v in value]
    return value


def plain_data(value: Any) -> Any:
    """Ansible's tagged/unsafe strings (and YAML's dates) as plain JSON data: what the validator, a digest, a
    pickle for a worker process or a template wants."""
    return json.loads(json.dumps(value, default=str))


def connection_argument_spec() -> Dict[str, Any]:
    """doc fragment: virtfleet.core.connection"""
    return {
        "uri": {"type": "str", "required": True, "fallback": (env_fallback, ["LIBVIRT_DEFAULT_URI"])},
        "username": {"type": "str", "aliases": ["user"], "fallback": (env_fallback, ["VMWARE_USER"])},
        "password": {"type": "str", "aliases": ["pass", "pwd"], "no_log": True,
                     "fallback": (env_fallback, ["VMWARE_PASSWORD"])},
        "validate_certs": {"type": "bool", "default": True, "fallback": (env_fallback, ["VMWARE_VALIDATE_CERTS"])},
        "ca_path": {"type": "path", "fallback": (env_fallback, ["VIRTFLEET_CA_PATH", "REQUESTS_CA_BUNDLE"])},
        "allow_uri_commands": {"type": "bool", "default": False},
        "timeout": {"type": "float", "default": 10.0},
    }


def connection_secrets(params: Dict[str, Any]) -> List[str]:
    """The secrets a module's connection options bring besides O(password) (which no_log hides): a password
    written in O(uri) (refused, but not shown), and, without O(password), the one the environment gives
    (env_password: the file VIRTFLEET_PASSWORD_FILE names is no option AnsibleModule knows to hide)."""
    found = [uri_password(params.get("uri"))]
    if not params.get("password"):
        try:
            found.append(env_password())
        except ConfigError:
            pass  # reported, naming the variable, when the endpoint is built
    return [s for s in found if s]


def endpoint_from_params(params: Dict[str, Any]) -> Endpoint:
    """The endpoint a module talks to, with its credentials; raises ConfigError on a bad uri or option,
    before anything is contacted."""
    from ._endpoints import MAX_TIMEOUT, check_bounds, check_transport

    check_bounds("timeout", params.get("timeout"), MAX_TIMEOUT)
    endpoint = parse_endpoint(with_current_credential_files(params["uri"]), "uri",
                              allow_uri_commands=bool(params.get("allow_uri_commands")))
    creds = env_credentials(params.get("username"), params.get("password"), params.get("validate_certs"),
                            params.get("ca_path"))
    endpoint = with_credentials(endpoint, creds)
    check_transport(endpoint, "uri")
    return endpoint


def placement_argument_spec() -> Dict[str, Any]:
    """doc fragment: virtfleet.core.placement"""
    return {
        "datacenter": {"type": "str"},
        "cluster": {"type": "str"},
        "esxi_host": {"type": "str"},
        "datastore": {"type": "str", "aliases": ["pool"]},
        "folder": {"type": "str"},
        "resource_pool": {"type": "str"},
        "domain_type": {"type": "str", "choices": ["kvm", "qemu"]},
    }


def placement_from_params(params: Dict[str, Any]) -> Placement:
    return Placement(datacenter=params.get("datacenter"), cluster=params.get("cluster"),
                     esxi_host=params.get("esxi_host"), pool=params.get("datastore"), folder=params.get("folder"),
                     resource_pool=params.get("resource_pool"), domain_type=params.get("domain_type"))


def guest_argument_spec() -> Dict[str, Any]:
    """doc fragment: virtfleet.core.guest_spec (the options of one guest; also each entry of ``guests``)."""
    return {
        "name": {"type": "str", "required": True},
        "uuid": {"type": "str"},
        "vcpus": {"type": "int"},
        "memory_mib": {"type": "int"},
        "firmware": {"type": "str", "choices": list(FIRMWARES)},
        "disks": {"type": "list", "elements": "dict", "options": {
            "name": {"type": "str", "required": True},
            "size_gib": {"type": "float"},
            "pool": {"type": "str", "aliases": ["datastore"]},
            "format": {"type": "str", "choices": list(DISK_FORMATS)},
            "source": {"type": "str"},
            "bus": {"type": "str", "choices": list(DISK_BUSES)},
        }},
        "nics": {"type": "list", "elements": "dict", "options": {
            "network": {"type": "str", "required": True},
            "mac": {"type": "str"},
            "model": {"type": "str", "choices": list(NIC_MODELS)},
        }},
        "cloud_init": {"type": "dict", "options": {
            # Often holds passwords: never in invocation, logs or the journal.
            "user_data": {"type": "raw", "no_log": True},
            "meta_data": {"type": "raw"},
            "network_config": {"type": "raw"},
        }},
        "boot": {"type": "dict", "options": {
            "kernel": {"type": "str", "required": True},
            "initrd": {"type": "str"},
            "cmdline": {"type": "str"},
        }},
        "autostart": {"type": "bool"},
        "tags": {"type": "dict"},
        "state": {"type": "str", "default": "present", "choices": list(GUEST_STATES)},
        # What guest_info returns beside the options (power state, owner...): read-only, ignored here, so
        # guest_info's output can be fed back as desired state unchanged.
        "status": {"type": "dict"},
    }


def convergence_argument_spec() -> Dict[str, Any]:
    """doc fragment: virtfleet.core.convergence"""
    return {
        "allow_restart": {"type": "bool", "default": False},
        "force": {"type": "bool", "default": False},
        "shutdown_timeout": {"type": "float", "default": 120.0},
        "remove_storage": {"type": "bool", "default": False},
        "owner": {"type": "str", "default": OWNER_TAG},
    }


def guest_entry_spec() -> Dict[str, Any]:
    """doc fragment: virtfleet.core.guest_spec.guests (each entry of the guests module's ``guests``): the guest spec,
    but cloud_init.user_data is not no_log here. AnsibleModule would take every string and number of every guest's
    user_data (a package name, a 1) for a secret and mask it wherever it appears in the results (a guest named
    nginx01 would come back as ********01); the module masks the entries' user_data itself, by the one rule of which
    of its strings are secrets (_guest_module.hide_secrets, secret_strings), as before the entries were declared."""
    spec = guest_argument_spec()
    spec["cloud_init"]["options"]["user_data"] = {"type": "raw"}
    return spec


def exclusive_argument_spec() -> Dict[str, Any]:
    """Options of the guests module only (documented there)."""
    return {
        # AnsibleModule validates the entries (types, choices, unknown keys) against guest_entry_spec(); when one is
        # refused, _guest_module.GuestListModule names it (guests[2] (web03)). The model's checks follow
        # (guest_spec_from_dict). fleet_guests checks its targets' guests with the same spec (specs_from_entries).
        "guests": {"type": "list", "elements": "dict", "required": True, "options": guest_entry_spec()},
        "exclusive": {"type": "bool", "default": False},
        "allow_empty": {"type": "bool", "default": False},
    }
