# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""How changes are carried out; matches convergence_argument_spec() in plugins/module_utils/_argspec.py."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  allow_restart:
    description:
      - A change that cannot reach a running guest (firmware, kernel boot, cloud-init data, memory beyond what it
        can take live, a NIC model, a disk bus) is written to the persistent definition and reported with
        C(restart_required=true).
      - With V(true), such a guest is shut down (see O(shutdown_timeout), O(force)) and started again instead.
    type: bool
    default: false
  force:
    description:
      - Power a guest off when it has not shut down within O(shutdown_timeout). Without it, such a guest fails the
        task and is left running.
    type: bool
    default: false
  shutdown_timeout:
    description:
      - Seconds to wait for an ACPI (libvirt) or guest-tools (vSphere) shutdown.
    type: float
    default: 120
  remove_storage:
    description:
      - With C(state=absent), also delete the guest's disks, but only those this collection created. Disks it
        attached that were made elsewhere are always kept.
    type: bool
    default: false
  owner:
    description:
      - The owner id written into the ownership mark of every guest this task creates, together with the guest's
        uuid (so a clone, or a VM made from a template of an owned guest, owns nothing).
      - O(ignore:exclusive) removes only guests of this owner. Give each team, role or fleet its own owner id when
        several converge guests on one hypervisor, so they never prune each other's guests.
    type: str
    default: virtfleet.core
"""
