# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Fleet filters: place, fleet_plan, fleet_drift, fleet_check_reviewed. Pure functions over plain data; the
work is in plugins/module_utils (_fleet, _placement, _fleet_plan), shared with the fleet_guests module."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from ansible.errors import AnsibleFilterError

from ansible_collections.virtfleet.core.plugins.module_utils._errors import VirtfleetError
from ansible_collections.virtfleet.core.plugins.module_utils._fleet_plan import (
    build_plan,
    compare_reviewed,
    drift_of,
    placement_data,
)


def place(fleet: Any, hypervisors: List[Dict[str, Any]], guests: Optional[List[Dict[str, Any]]] = None,
          unreachable: Optional[List[Dict[str, Any]]] = None, limit: Optional[List[str]] = None) -> Dict[str, Any]:
    try:
        return placement_data(fleet, hypervisors or [], guests or [], unreachable or [], limit)
    except VirtfleetError as exc:
        raise AnsibleFilterError(f"virtfleet.core.place: {exc}") from None


def fleet_plan(placement: Dict[str, Any], converged: List[Dict[str, Any]],
               options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    return build_plan(placement, converged or [], options)


def fleet_drift(plan: Dict[str, Any]) -> List[str]:
    return drift_of(plan)


def fleet_check_reviewed(plan: Dict[str, Any], reviewed: Any) -> Optional[str]:
    return compare_reviewed(reviewed, plan)


class FilterModule:
    def filters(self) -> Dict[str, Callable[..., Any]]:
        return {"place": place, "fleet_plan": fleet_plan, "fleet_drift": fleet_drift,
                "fleet_check_reviewed": fleet_check_reviewed}
