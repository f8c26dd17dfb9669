#!/usr/bin/python
# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: guest
short_description: Make one guest VM on libvirt or vSphere match what is declared
version_added: 0.2.0
description:
  - Creates the guest when it is missing, changes in place what differs, and reports exactly what changed
    (O(vcpus), O(memory_mib), disks, NICs, firmware, kernel boot, cloud-init data, autostart, tags, power state).
  - Only the options you set are compared, in normalised form (units, defaults, device order), so the
    hypervisor's own rewriting never shows as a change and a rerun reports C(changed=false).
  - Each change is marked C(live) (reaches the running guest) or not (needs a restart; see O(allow_restart)).
  - Every input problem (sizes, capacity, unknown network or pool, a disk shrink, a MAC in use, duplicates) fails
    with one line naming the guest and the field, before anything is changed.
  - To converge many guests of one hypervisor at once, use M(virtfleet.core.guests).
author:
  - virtfleet maintainers (@virtfleet)
requirements:
  - libvirt-python and pycdlib (libvirt endpoints)
  - pyvmomi (vSphere endpoints)
extends_documentation_fragment:
  - virtfleet.core.connection
  - virtfleet.core.placement
  - virtfleet.core.guest_spec
  - virtfleet.core.convergence
attributes:
  check_mode:
    support: full
    description: Reports the same C(changed), C(changes) and diff as the real run; nothing is sent that changes the
      hypervisor. A new guest's C(uuid) is only known after it is created.
  diff_mode:
    support: full
    description: Before and after of the normalised guest model (never raw XML or a ConfigSpec).
"""

EXAMPLES = r"""
- name: A web server on a KVM host, first-boot data included
  virtfleet.core.guest:
    uri: qemu:///system
    name: web01
    vcpus: 2
    memory_mib: 2048
    disks:
      - name: root
        size_gib: 20
        source: debian-12-genericcloud-amd64.qcow2
    nics:
      - network: default
    cloud_init:
      meta_data:
        instance-id: web01
        local-hostname: web01
      user_data:
        packages: [nginx]
    tags:
      role: web
    state: running

- name: The same shape on an ESXi host under a vCenter
  virtfleet.core.guest:
    uri: vsphere://vcenter.example.com
    username: "{{ vc_user }}"
    password: "{{ vc_password }}"
    cluster: prod
    datastore: ssd01
    name: web02
    vcpus: 2
    memory_mib: 2048
    disks:
      - name: root
        size_gib: 20
    nics:
      - network: VM Network
    state: running

- name: Grow a disk and add a vCPU; restart the guest if something needs it
  virtfleet.core.guest:
    uri: qemu:///system
    name: web01
    vcpus: 4
    disks:
      - name: root
        size_gib: 40
    allow_restart: true
    shutdown_timeout: 300

- name: Remove a guest and the disks this collection created for it
  virtfleet.core.guest:
    uri: qemu:///system
    name: web01
    state: absent
    remove_storage: true
"""

RETURN = r"""
guest:
  description: The guest's normalised model after the run (in check mode, what the run would leave).
  returned: unless the guest is absent
  type: dict
  sample: {"name": "web01", "uuid": "2a6c1d5e-...", "vcpus": 2, "memory_mib": 2048, "firmware": "bios",
           "disks": [{"name": "root", "size_gib": 20.0, "pool": "default", "format": "qcow2", "bus": "virtio",
                      "source": null}],
           "nics": [{"network": "default", "mac": "52:54:00:3a:1f:07", "model": "virtio"}],
           "cloud_init": "sha256:5f0c2a9e1b7d4c3a", "boot": null, "autostart": false, "tags": {"role": "web"}}
changes:
  description: What changed (or would), in order.
  returned: always
  type: list
  elements: dict
  sample: [{"field": "vcpus", "before": 2, "after": 4, "live": true},
           {"field": "disks[root].size_gib", "before": 20.0, "after": 40.0, "live": true},
           {"field": "firmware", "before": "bios", "after": "uefi", "live": false}]
action:
  description: V(create), V(update), V(remove) or V(none).
  returned: always
  type: str
restart_required:
  description: A change was written to the persistent definition but reaches the guest only after a restart.
  returned: always
  type: bool
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.virtfleet.core.plugins.module_utils._argspec import (
    connection_argument_spec,
    convergence_argument_spec,
    guest_argument_spec,
    placement_argument_spec,
)
from ansible_collections.virtfleet.core.plugins.module_utils._guest_module import run_guests


def main() -> None:
    spec = {**connection_argument_spec(), **placement_argument_spec(), **guest_argument_spec(),
            **convergence_argument_spec()}
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    run_guests(module, single=True)


if __name__ == "__main__":
    main()
