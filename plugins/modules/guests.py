#!/usr/bin/python
# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: guests
short_description: Make a list of guest VMs on one libvirt or vSphere endpoint match what is declared
version_added: "1.0.0"
description:
  - The bulk form of M(virtfleet.core.guest) - one connection, one bulk read of every guest, every guest planned
    before anything is changed, changes applied in parallel (shutdown and task waits overlap).
  - If any guest in the list is invalid, the task fails naming it and nothing is changed on any guest.
  - With O(exclusive=true), guests that carry this task's ownership mark (O(owner), set on every guest it creates)
    but are not in O(guests) are removed. A guest this collection did not create, a guest of another owner, a clone
    of an owned guest, and on vCenter a guest outside the cluster/host, folder and resource pool given, are never
    removed.
author:
  - virtfleet maintainers (@virtfleet)
requirements:
  - libvirt-python and pycdlib (libvirt endpoints)
  - pyvmomi (vSphere endpoints)
extends_documentation_fragment:
  - virtfleet.core.connection
  - virtfleet.core.placement
  - virtfleet.core.convergence
  - virtfleet.core.guest_spec.guests
  - virtfleet.core.attributes
  - virtfleet.core.attributes.action_group
options:
  guests:
    description:
      - The guests. Each entry takes the guest options of M(virtfleet.core.guest), checked the same way, before
        anything is contacted. The first entry that is refused is named in one line, by its index and name.
      - A guest's C(cloud_init.user_data) is never logged or returned; results and diffs show only its digest.
      - The output of M(virtfleet.core.guest_info) (RV(virtfleet.core.guest_info#module:guests)) can be given as it
        is; each entry's C(status) is ignored.
    type: list
    elements: dict
    required: true
  exclusive:
    description:
      - Also remove guests owned by O(owner) that are not listed. Their disks follow O(remove_storage).
      - Only guests within what the task places guests in are candidates - on vCenter, the O(cluster) or
        O(esxi_host), O(folder) and O(resource_pool) given.
      - An empty O(guests) list is refused unless O(allow_empty=true).
    type: bool
    default: false
  allow_empty:
    description:
      - With O(exclusive=true) and an empty O(guests) list, remove every guest O(owner) owns in scope. Without it,
        such a task fails before anything is read, because an empty list is far more often a mistake (an
        undefined variable, a role default) than a wish.
    type: bool
    default: false
attributes:
  check_mode:
    support: full
    details:
      - Same C(changed), RV(guests[].changes) and diff as the real run; nothing that changes the hypervisor is sent.
      - A new guest's C(uuid) is only known once the hypervisor has made it, unless the entry gives one.
  diff_mode:
    support: full
    details:
      - Before and after of each changed guest's normalised model, keyed by guest name.
notes:
  - The module runs where the task runs (usually the controller) and talks to the endpoint in O(uri) over the
    network; the hypervisor needs no Python.
  - On vSphere a change that needs a restart of a running VM is refused while planning unless
    O(allow_restart=true) or the entry's C(state) is V(stopped); see M(virtfleet.core.guest).
  - Give each team, role or fleet that converges guests on one hypervisor its own O(owner), so that
    O(exclusive=true) never removes another one's guests.
seealso:
  - module: virtfleet.core.guest
    description: One guest per task, with the same options.
  - module: virtfleet.core.guest_info
    description: Guests read back in this module's model.
  - module: virtfleet.core.fleet_guests
    description: The guests placed on many hypervisors, in one task.
  - plugin: virtfleet.core.hypervisors
    plugin_type: inventory
    description: Discover the hypervisors and their guests as inventory.
  - name: The virtfleet.core.guests role
    description: One hypervisor's declared guests through this module (roles/guests/README.md).
    link: https://github.com/virtfleet/virtfleet.core/blob/main/roles/guests/README.md
  - name: Guest convergence
    description: How a run goes, what is compared, live or restart, power, ownership and exclusive (docs/guests.md).
    link: https://github.com/virtfleet/virtfleet.core/blob/main/docs/guests.md
"""

EXAMPLES = r"""
- name: Three guests on a KVM host, in one task
  virtfleet.core.guests:
    uri: qemu+ssh://root@kvm01.example.com/system
    datastore: default
    guests:
      - name: web01
        vcpus: 2
        memory_mib: 2048
        disks: [{name: root, size_gib: 20, source: debian-12.qcow2}]
        nics: [{network: default}]
        state: running
      - name: web02
        vcpus: 2
        memory_mib: 2048
        disks: [{name: root, size_gib: 20, source: debian-12.qcow2}]
        nics: [{network: default}]
        state: running
      - name: old01
        state: absent

- name: Exactly these guests (and any not created by this collection) on an ESXi host
  virtfleet.core.guests:
    uri: vsphere://esx01.example.com
    guests: "{{ esx01_guests }}"
    exclusive: true
"""

RETURN = r"""
guests:
  description: One result per guest (listed guests first, then guests removed by O(exclusive)).
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: Guest name.
      type: str
      sample: web01
    changed:
      description: Something changed on this guest (or would, in check mode).
      type: bool
      sample: true
    action:
      description: V(create), V(update), V(remove) or V(none).
      type: str
      sample: update
    changes:
      description: What changed (or would), in order; as RV(virtfleet.core.guest#module:changes).
      type: list
      elements: dict
      contains:
        field:
          description: What changed, for example V(vcpus), V(disks[root].size_gib), V(power_state) or V(guest).
          type: str
          sample: vcpus
        before:
          description: The value before the run.
          type: raw
          sample: 2
        after:
          description: The value after the run.
          type: raw
          sample: 4
        live:
          description: The running guest gets the change now; V(false) means it waits for a restart.
          type: bool
          sample: true
    restart_required:
      description: A change of this guest waits for a restart.
      type: bool
      sample: false
    guest:
      description: The guest's normalised model after the run (in check mode, what the run would leave), as
        RV(virtfleet.core.guest#module:guest); null for a guest that is absent.
      type: dict
      sample: {"name": "web01", "uuid": "2a6c1d5e-8f3b-4c1a-9d2e-5b7f0c4e1a93", "vcpus": 4, "memory_mib": 2048,
               "firmware": "bios", "disks": [], "nics": [], "cloud_init": null, "boot": null, "autostart": false,
               "tags": {}}
    failed:
      description: This guest's change failed while it was applied (see C(msg)); the other guests went on.
      type: bool
      sample: false
    msg:
      description: Why this guest failed, one line; null otherwise.
      type: str
      sample: null
  sample: [{"name": "web01", "changed": true, "action": "update", "restart_required": false,
            "changes": [{"field": "vcpus", "before": 2, "after": 4, "live": true}],
            "guest": {"name": "web01", "vcpus": 4}, "failed": false, "msg": null}]
restart_required:
  description: At least one guest has a change that waits for a restart.
  returned: always
  type: bool
  sample: false
"""

from ansible_collections.virtfleet.core.plugins.module_utils._argspec import (
    connection_argument_spec,
    convergence_argument_spec,
    exclusive_argument_spec,
    placement_argument_spec,
)
from ansible_collections.virtfleet.core.plugins.module_utils._guest_module import GuestListModule, run_guests


def main() -> None:
    spec = {**connection_argument_spec(), **placement_argument_spec(), **convergence_argument_spec(),
            **exclusive_argument_spec()}
    # no_log: no "Invoked with" line in the managed node's journal, whose copy of the guests could hold
    # cloud-init secrets; results mask them (see _guest_module.hide_secrets). GuestListModule: an AnsibleModule
    # whose refusal of a guests entry names the entry.
    module = GuestListModule(argument_spec=spec, supports_check_mode=True, no_log=True)
    run_guests(module, single=False)


if __name__ == "__main__":
    main()
