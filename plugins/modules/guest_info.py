#!/usr/bin/python
# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: guest_info
short_description: Read guests of a libvirt or vSphere endpoint in the same normalised model the guest modules use
version_added: "1.0.0"
description:
  - Returns one guest, or every guest of the endpoint, filtered by name, tags and power state, in the model that
    M(virtfleet.core.guest) takes as options - so its output can be fed back as desired state, to
    M(virtfleet.core.guest) or as an entry of M(virtfleet.core.guests).
  - What only the hypervisor knows is in each guest's C(status), which the guest modules ignore. The first-boot
    data is not read back, only its digest (C(status.cloud_init_digest)); fed back, a guest without
    C(cloud_init) keeps the seed it has.
  - One bulk read, whatever the number of guests. Read-only.
author:
  - virtfleet maintainers (@virtfleet)
requirements:
  - libvirt-python (libvirt endpoints)
  - pyvmomi (vSphere endpoints)
extends_documentation_fragment:
  - virtfleet.core.connection
  - virtfleet.core.attributes
  - virtfleet.core.attributes.info_module
  - virtfleet.core.attributes.action_group
options:
  name:
    description:
      - Guest name, or a shell-style pattern (V(web*)). All guests when omitted.
    type: str
  tags:
    description:
      - Only guests carrying all of these tags with these values.
    type: dict
  power_state:
    description:
      - Only guests in this power state.
    type: str
    choices: [running, stopped, paused, suspended]
  datacenter:
    description:
      - vSphere datacenter to read (the only one by default).
    type: str
notes:
  - vSphere templates, and VMs whose configuration cannot be read (inaccessible), are left out.
seealso:
  - module: virtfleet.core.guest
    description: Converge one guest; takes an entry of RV(guests) as its options.
  - module: virtfleet.core.guests
    description: Converge a list of guests; takes RV(guests) as its O(virtfleet.core.guests#module:guests).
  - module: virtfleet.core.hypervisor_info
    description: The endpoint's hypervisor facts and capacity, and its guests as discovery reports them.
  - plugin: virtfleet.core.hypervisors
    plugin_type: inventory
    description: The guests of many endpoints as inventory hosts.
  - name: Guest convergence
    description: The guest model and feeding guest_info's output back as desired state (docs/guests.md).
    link: https://github.com/virtfleet/virtfleet.core/blob/main/docs/guests.md
"""

EXAMPLES = r"""
- name: The web guests of a KVM host that are running
  virtfleet.core.guest_info:
    uri: qemu:///system
    name: "web*"
    power_state: running
  register: web

- name: Guests of a team on a vCenter
  virtfleet.core.guest_info:
    uri: vsphere://vcenter.example.com
    tags:
      team: payments
  register: payments
"""

RETURN = r"""
guests:
  description: Matching guests, sorted by name, each as the guest options of M(virtfleet.core.guest) plus C(status).
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: Guest name.
      type: str
      sample: web01
    uuid:
      description: Guest UUID.
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
      description: Every disk, each with C(name), C(size_gib), C(pool), C(format), C(source) and C(bus).
      type: list
      elements: dict
      sample: [{"name": "root", "size_gib": 20.0, "pool": "default", "format": "qcow2", "source": null,
                "bus": "virtio"}]
    nics:
      description: Every NIC, each with C(network), C(mac) and C(model).
      type: list
      elements: dict
      sample: [{"network": "default", "mac": "52:54:00:3a:1f:07", "model": "virtio"}]
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
    state:
      description: V(running) or V(stopped) from the power state; V(present) for a paused or suspended guest.
      type: str
      sample: running
    status:
      description: Read-only facts, which the guest modules ignore.
      type: dict
      contains:
        power_state:
          description: V(running), V(stopped), V(paused), V(suspended) or V(unknown).
          type: str
          sample: running
        owner:
          description: The owner id of this collection's ownership mark on this very guest; null for a guest this
            collection did not create (or a clone of one).
          type: str
          sample: virtfleet.core
        cloud_init_digest:
          description: Digest of the first-boot documents the guest's seed holds; null without a seed. The
            documents themselves are not read back.
          type: str
          sample: sha256:5f0c2a9e1b7d4c3a
        pending_restart:
          description: Fields whose persistent value differs from what the running guest has (a change waiting for
            a restart).
          type: list
          elements: str
          sample: [memory_mib]
  sample: [{"name": "web01", "uuid": "2a6c1d5e-8f3b-4c1a-9d2e-5b7f0c4e1a93", "vcpus": 2, "memory_mib": 2048,
            "firmware": "bios", "disks": [], "nics": [], "boot": null, "autostart": false, "tags": {"role": "web"},
            "state": "running", "status": {"power_state": "running", "owner": "virtfleet.core",
                                           "cloud_init_digest": null, "pending_restart": []}}]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.virtfleet.core.plugins.module_utils._argspec import (
    connection_argument_spec,
    connection_secrets,
)
from ansible_collections.virtfleet.core.plugins.module_utils._errors import VirtfleetError
from ansible_collections.virtfleet.core.plugins.module_utils._guest_read import guest_backend, select_guests
from ansible_collections.virtfleet.core.plugins.module_utils._model import Placement


def main() -> None:
    spec = {**connection_argument_spec(), "name": {"type": "str"}, "tags": {"type": "dict"},
            "power_state": {"type": "str", "choices": ["running", "stopped", "paused", "suspended"]},
            "datacenter": {"type": "str"}}
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    module.no_log_values.update(connection_secrets(module.params))
    params = module.params
    try:
        with guest_backend(module) as backend:
            states = backend.read_guests(Placement(datacenter=params["datacenter"]))
    except VirtfleetError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(changed=False, guests=select_guests(states, params["name"], params["tags"],
                                                         params["power_state"]))


if __name__ == "__main__":
    main()
