#!/usr/bin/python
# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: hypervisor_info
short_description: Read what a hypervisor endpoint is, its facts and capacity, and optionally its guests
version_added: 0.1.0
description:
  - Identifies one endpoint (ESXi, vCenter, KVM/QEMU through libvirt, or a Redfish BMC) and returns the same
    facts that the M(virtfleet.core.hypervisors) inventory plugin puts in C(virtfleet_hypervisor) and
    C(virtfleet_guest).
  - A vCenter returns one hypervisor per ESXi host it manages.
  - Reads in bulk (one property collector query on vSphere; getAllDomainStats on libvirt). Read-only.
author:
  - virtfleet maintainers (@virtfleet)
requirements:
  - libvirt-python (libvirt endpoints; vSphere and Redfish endpoints need no extra library)
extends_documentation_fragment:
  - virtfleet.core.connection
options:
  guests:
    description: Also return every guest of the endpoint.
    type: bool
    default: false
attributes:
  check_mode:
    support: full
    description: Reads only; check mode changes nothing.
  diff_mode:
    support: none
    description: Nothing to diff.
"""

EXAMPLES = r"""
- name: What runs on esx01?
  virtfleet.core.hypervisor_info:
    uri: vsphere://esx01.example.com
    username: root
    password: "{{ esx_password }}"
  register: esx01

- name: A local KVM host and its guests
  virtfleet.core.hypervisor_info:
    uri: qemu:///system
    guests: true
  register: kvm
"""

RETURN = r"""
identity:
  description: What the endpoint says it is.
  returned: always
  type: dict
  sample: {"api": "vsphere", "type": "esxi", "product": "VMware ESXi 8.0.2 build-22380479", "version": "8.0.2"}
hypervisors:
  description: One entry per hypervisor behind the endpoint (one for ESXi and libvirt, one per host for vCenter).
  returned: always
  type: list
  elements: dict
  sample: [{"name": "esx01.example.com", "type": "esxi", "api": "vsphere", "memory_mib": 524288,
            "cpu": {"model": "Intel(R) Xeon(R) Gold 6338", "sockets": 2, "cores": 64, "threads": 128, "mhz": 2000},
            "guests": {"total": 12, "running": 10, "stopped": 2}}]
guests:
  description: The endpoint's guests (templates left out), when O(guests=true).
  returned: always
  type: list
  elements: dict
  sample: [{"name": "web01", "uuid": "4210c8f2-...", "hypervisor": "esx01.example.com", "power_state": "running",
            "vcpus": 2, "memory_mib": 4096, "nics": [{"mac": "00:50:56:aa:bb:cc", "network": "VM Network"}]}]
bmc:
  description: Redfish service facts when the endpoint is a BMC.
  returned: when the endpoint is a Redfish BMC
  type: dict
calls:
  description: Remote calls made.
  returned: always
  type: int
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.virtfleet.core.plugins.module_utils._argspec import (
    connection_argument_spec,
    endpoint_from_params,
)
from ansible_collections.virtfleet.core.plugins.module_utils._discovery import discover_endpoint, paused_gc
from ansible_collections.virtfleet.core.plugins.module_utils._endpoints import uri_password
from ansible_collections.virtfleet.core.plugins.module_utils._errors import VirtfleetError


def main() -> None:
    spec = connection_argument_spec()
    spec["guests"] = {"type": "bool", "default": False}
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    secret = uri_password(module.params.get("uri"))
    if secret:  # refused below; hidden from the failure's invocation too
        module.no_log_values.add(secret)
    try:
        endpoint = endpoint_from_params(module.params)
    except VirtfleetError as exc:
        module.fail_json(msg=str(exc))
    with paused_gc():
        result = discover_endpoint(endpoint, module.params["guests"], module.params["timeout"])
    if result["error"]:
        module.fail_json(msg=f"{endpoint.label}: {result['error']}", endpoint=result["endpoint"])
    module.exit_json(changed=False, identity=result["identity"], hypervisors=result["hypervisors"],
                     guests=result["guests"], bmc=result["bmc"], calls=result["calls"], endpoint=result["endpoint"])


if __name__ == "__main__":
    main()
