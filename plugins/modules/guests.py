#!/usr/bin/python
# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: guests
short_description: Make a list of guest VMs on one libvirt or vSphere endpoint match what is declared
version_added: 0.2.0
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
options:
  guests:
    description:
      - The guests. Each entry takes the guest options of M(virtfleet.core.guest) (O(ignore:name), O(ignore:uuid),
        O(ignore:vcpus), O(ignore:memory_mib), O(ignore:firmware), O(ignore:disks), O(ignore:nics),
        O(ignore:cloud_init), O(ignore:boot), O(ignore:autostart), O(ignore:tags), O(ignore:state)), checked the
        same way.
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
    description: Same C(changed), C(guests[].changes) and diff as the real run; nothing that changes the hypervisor
      is sent.
  diff_mode:
    support: full
    description: Before and after of each changed guest's normalised model, keyed by guest name.
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
  sample: [{"name": "web01", "changed": true, "action": "update", "restart_required": false,
            "changes": [{"field": "vcpus", "before": 2, "after": 4, "live": true}],
            "guest": {"name": "web01", "vcpus": 4}, "failed": false, "msg": null}]
restart_required:
  description: At least one guest has a change that waits for a restart.
  returned: always
  type: bool
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.virtfleet.core.plugins.module_utils._argspec import (
    connection_argument_spec,
    convergence_argument_spec,
    exclusive_argument_spec,
    placement_argument_spec,
)
from ansible_collections.virtfleet.core.plugins.module_utils._guest_module import run_guests


def main() -> None:
    spec = {**connection_argument_spec(), **placement_argument_spec(), **convergence_argument_spec(),
            **exclusive_argument_spec()}
    # no_log: no "Invoked with" line in the managed node's journal, whose copy of the guests could hold
    # cloud-init secrets; results mask them (see _guest_module.hide_secrets).
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True, no_log=True)
    run_guests(module, single=False)


if __name__ == "__main__":
    main()
