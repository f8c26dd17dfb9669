# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The read-only edge of the guest modules (guest_info): a guest backend from module parameters, and the
selection guest_info returns. It never loads the planner or the convergence engine."""

from __future__ import annotations

import fnmatch
from typing import Any, Dict, List, Optional

from ansible.module_utils.basic import AnsibleModule

from ._argspec import endpoint_from_params
from ._model import GuestState
from .backends import guest_backend_for
from .backends.base import GuestBackend


def guest_backend(module: AnsibleModule) -> GuestBackend:
    return guest_backend_for(endpoint_from_params(module.params), module.params["timeout"])


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
