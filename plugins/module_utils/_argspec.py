# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Argument specs shared by the modules; each has a doc fragment in plugins/doc_fragments of the same name."""

from __future__ import annotations

from typing import Any, Dict

from ansible.module_utils.basic import env_fallback

from ._endpoints import Endpoint, env_credentials, parse_endpoint, with_credentials


def connection_argument_spec() -> Dict[str, Any]:
    """doc fragment: virtfleet.core.connection"""
    return {
        "uri": {"type": "str", "required": True, "fallback": (env_fallback, ["LIBVIRT_DEFAULT_URI"])},
        "username": {"type": "str", "aliases": ["user"], "fallback": (env_fallback, ["VMWARE_USER"])},
        "password": {"type": "str", "aliases": ["pass", "pwd"], "no_log": True,
                     "fallback": (env_fallback, ["VMWARE_PASSWORD"])},
        "validate_certs": {"type": "bool", "default": True, "fallback": (env_fallback, ["VMWARE_VALIDATE_CERTS"])},
        "timeout": {"type": "float", "default": 10.0},
    }


def endpoint_from_params(params: Dict[str, Any]) -> Endpoint:
    """The endpoint a module talks to, with its credentials; raises ConfigError on a bad uri."""
    endpoint = parse_endpoint(params["uri"], "uri")
    creds = env_credentials(params.get("username"), params.get("password"), params.get("validate_certs"))
    return with_credentials(endpoint, creds)
