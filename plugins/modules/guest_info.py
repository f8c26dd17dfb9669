#!/usr/bin/python
# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: guest_info
short_description: Read guests of a libvirt or vSphere endpoint in the same normalised model the guest modules use
version_added: 0.2.0
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
attributes:
  check_mode:
    support: full
    description: Reads only.
  diff_mode:
    support: none
    description: Nothing to diff.
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
  description: Matching guests, sorted by name, each as guest options plus C(status).
  returned: always
  type: list
  elements: dict
  contains:
    state:
      description: V(running) or V(stopped) from the power state; V(present) for a paused or suspended guest.
      type: str
    status:
      description: Read-only facts - C(power_state), C(owner) (the owner id of this collection's mark, or null),
        C(cloud_init_digest), C(pending_restart) (fields waiting for a restart).
      type: dict
  sample: [{"name": "web01", "uuid": "2a6c1d5e-...", "vcpus": 2, "memory_mib": 2048, "firmware": "bios",
            "disks": [], "nics": [], "boot": null, "autostart": false, "tags": {"role": "web"}, "state": "running",
            "status": {"power_state": "running", "owner": "virtfleet.core", "cloud_init_digest": null,
                       "pending_restart": []}}]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.virtfleet.core.plugins.module_utils._argspec import connection_argument_spec
from ansible_collections.virtfleet.core.plugins.module_utils._errors import VirtfleetError
from ansible_collections.virtfleet.core.plugins.module_utils._guest_read import guest_backend, select_guests
from ansible_collections.virtfleet.core.plugins.module_utils._model import Placement


def main() -> None:
    spec = {**connection_argument_spec(), "name": {"type": "str"}, "tags": {"type": "dict"},
            "power_state": {"type": "str", "choices": ["running", "stopped", "paused", "suspended"]},
            "datacenter": {"type": "str"}}
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
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
