#!/usr/bin/python
# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: guest
short_description: Make one guest VM on libvirt or vSphere match what is declared
version_added: "1.0.0"
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
  - virtfleet.core.attributes
  - virtfleet.core.attributes.action_group
attributes:
  check_mode:
    support: full
    details:
      - Reports the same C(changed), RV(changes) and diff as the real run; nothing that changes the hypervisor is
        sent.
      - A new guest's C(uuid) is only known once the hypervisor has made it, unless O(uuid) is given.
  diff_mode:
    support: full
    details:
      - Before and after of the normalised guest model (never raw XML or a ConfigSpec).
notes:
  - The module runs where the task runs (usually the controller, with C(delegate_to) or a local connection) and
    talks to the endpoint in O(uri) over the network; the hypervisor needs no Python.
  - On vSphere a change that needs a restart (see O(allow_restart)) of a running VM is refused while planning,
    before anything is changed, unless O(allow_restart=true) or O(state=stopped); vSphere has no persistent
    definition apart from the running VM. libvirt writes it to the persistent definition and reports
    RV(restart_required=true).
  - Every guest this module creates carries an ownership mark (O(owner) and the guest's own uuid). Only guests
    with this mark are ever removed by O(virtfleet.core.guests#module:exclusive), and only their disks by
    O(remove_storage).
seealso:
  - module: virtfleet.core.guests
    description: The same options for a list of guests of one endpoint, in one task.
  - module: virtfleet.core.guest_info
    description: Guests read back in this module's model, to feed back as desired state.
  - plugin: virtfleet.core.hypervisors
    plugin_type: inventory
    description: Discover the hypervisors and their guests as inventory.
  - name: Guest convergence
    description: How a run goes, what is compared, live or restart, power, ownership (docs/guests.md).
    link: https://github.com/virtfleet/virtfleet.core/blob/main/docs/guests.md
  - name: Security
    description: Credentials, TLS, secrets in cloud-init data, what is never removed (docs/security.md).
    link: https://github.com/virtfleet/virtfleet.core/blob/main/docs/security.md
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
  returned: unless the guest is absent (null then)
  type: dict
  contains:
    name:
      description: Guest name.
      type: str
      sample: web01
    uuid:
      description: Guest UUID; null for a guest check mode would create without O(uuid).
      type: str
      sample: 2a6c1d5e-8f3b-4c1a-9d2e-5b7f0c4e1a93
    vcpus:
      description: Virtual CPUs.
      type: int
      sample: 2
    memory_mib:
      description: Memory in MiB.
      type: int
      sample: 2048
    firmware:
      description: V(bios) or V(uefi).
      type: str
      sample: bios
    disks:
      description: Every disk of the guest (not only those listed in O(disks)), sizes in GiB.
      type: list
      elements: dict
      sample: [{"name": "root", "size_gib": 20.0, "pool": "default", "format": "qcow2", "source": null,
                "bus": "virtio"}]
    nics:
      description: Every NIC of the guest, each with C(network), C(mac) and C(model).
      type: list
      elements: dict
      sample: [{"network": "default", "mac": "52:54:00:3a:1f:07", "model": "virtio"}]
    cloud_init:
      description: Digest of the first-boot documents (never the documents themselves); null without any.
      type: str
      sample: sha256:5f0c2a9e1b7d4c3a
    boot:
      description: Direct kernel boot (C(kernel), C(initrd), C(cmdline)); null when the guest boots from its disks.
      type: dict
      sample: null
    autostart:
      description: Started when the hypervisor starts (libvirt).
      type: bool
      sample: false
    tags:
      description: The guest's tags.
      type: dict
      sample: {"role": "web"}
changes:
  description: What changed (or would), in order.
  returned: always
  type: list
  elements: dict
  contains:
    field:
      description:
        - What changed - a guest option (V(vcpus), V(memory_mib), V(firmware), V(autostart), V(tags), V(cloud_init)),
          a device that is added (V(disks[data]), V(nics[52:54:00:3a:1f:07])), one attribute of a device
          (V(disks[root].size_gib), V(nics[52:54:00:3a:1f:07].model), V(boot.kernel)), V(power_state), or V(guest)
          for a guest that is created or removed.
      type: str
      sample: disks[root].size_gib
    before:
      description: >-
        The value before the run - null for a device that is added, V(absent) for a guest that is created, the power
        state for V(power_state), a digest for V(cloud_init).
      type: raw
      sample: 20.0
    after:
      description: >-
        The value after the run - the whole device for a device that is added, V(absent) for a guest that is removed,
        V(running), V(stopped) or V(restarted) for V(power_state).
      type: raw
      sample: 40.0
    live:
      description: The running guest gets the change now; V(false) means it waits for a restart.
      type: bool
      sample: true
  sample: [{"field": "vcpus", "before": 2, "after": 4, "live": true},
           {"field": "disks[root].size_gib", "before": 20.0, "after": 40.0, "live": true},
           {"field": "firmware", "before": "bios", "after": "uefi", "live": false}]
action:
  description: V(create), V(update), V(remove) or V(none).
  returned: always
  type: str
  sample: update
restart_required:
  description: A change was written to the persistent definition but reaches the guest only after a restart.
  returned: always
  type: bool
  sample: false
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
