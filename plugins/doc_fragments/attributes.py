# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The attributes every module documents (the Ansible developer guide's ``attributes``). Each fragment gives the
descriptions; a module extends DOCUMENTATION and states its own ``support`` (and ``details``)."""

from __future__ import annotations


class ModuleDocFragment:
    # Every module: the module sets support (full, partial, none or N/A) and details.
    DOCUMENTATION = r"""
options: {}
attributes:
  check_mode:
    description: Can run in C(check_mode) and return changed status prediction without modifying target.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in C(check_mode)), when in
      diff mode.
"""

    # Read-only modules (guest_info, hypervisor_info), together with DOCUMENTATION.
    INFO_MODULE = r"""
options: {}
attributes:
  check_mode:
    support: full
    details:
      - This action does not modify state.
  diff_mode:
    support: N/A
    details:
      - This action does not modify state.
"""

    # The modules of the action group virtfleet.core.hypervisor (meta/runtime.yml): the ones that take the
    # connection options (virtfleet.core.connection) and one endpoint.
    ACTION_GROUP = r"""
options: {}
attributes:
  action_group:
    description: Use C(group/virtfleet.core.hypervisor) in C(module_defaults) to set defaults for this module (for
      example O(uri), O(username) and O(password)) once for every module of the group.
    support: full
    membership:
      - virtfleet.core.hypervisor
"""
