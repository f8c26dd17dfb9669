#!/usr/bin/python
# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: hypervisor_info
short_description: Read what a hypervisor endpoint is, its facts and capacity, and optionally its guests
version_added: "1.0.0"
description:
  - Identifies one endpoint (ESXi, vCenter, KVM/QEMU through libvirt, or a Redfish BMC) and returns the same
    facts that the P(virtfleet.core.hypervisors#inventory) inventory plugin puts in C(virtfleet_hypervisor) and
    C(virtfleet_guest).
  - A vCenter returns one hypervisor per ESXi host it manages.
  - Reads in bulk (one property collector query on vSphere; getAllDomainStats on libvirt). Read-only.
author:
  - virtfleet maintainers (@virtfleet)
requirements:
  - libvirt-python (libvirt endpoints; vSphere and Redfish endpoints need no extra library)
extends_documentation_fragment:
  - virtfleet.core.connection
  - virtfleet.core.attributes
  - virtfleet.core.attributes.info_module
  - virtfleet.core.attributes.action_group
options:
  guests:
    description: Also return every guest of the endpoint.
    type: bool
    default: false
notes:
  - An endpoint that is down, refuses the login or times out fails the task with one line naming it; the
    P(virtfleet.core.hypervisors#inventory) inventory plugin puts such an endpoint in its C(unreachable) group
    instead.
  - Credentials are never returned; RV(endpoint) holds the endpoint's address only.
seealso:
  - plugin: virtfleet.core.hypervisors
    plugin_type: inventory
    description: The same facts for many endpoints and address ranges, as inventory.
  - module: virtfleet.core.guest_info
    description: Guests in the model the guest modules take as desired state.
  - name: The hypervisors inventory
    description: Endpoints, probing, groups, hostvars, cache (docs/inventory.md).
    link: https://github.com/virtfleet/virtfleet.core/blob/main/docs/inventory.md
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
  contains:
    api:
      description: V(vsphere), V(libvirt) or V(redfish).
      type: str
      sample: vsphere
    type:
      description: V(esxi), V(vcenter), V(kvm), V(qemu), V(xen), V(lxc), V(test) or V(bmc).
      type: str
      sample: esxi
    product:
      description: Product name as the endpoint reports it.
      type: str
      sample: VMware ESXi
    version:
      description: Product version (the Redfish version for a BMC).
      type: str
      sample: 8.0.2
    build:
      description: Product build.
      type: str
      sample: "22380479"
    vendor:
      description: Vendor.
      type: str
      sample: VMware, Inc.
    instance_uuid:
      description: The endpoint's own UUID (vCenter instance, Redfish service), where it has one.
      type: str
      sample: null
  sample: {"api": "vsphere", "type": "esxi", "product": "VMware ESXi", "version": "8.0.2", "build": "22380479",
           "vendor": "VMware, Inc.", "instance_uuid": null}
hypervisors:
  description: One entry per hypervisor behind the endpoint (one for ESXi and libvirt, one per host for vCenter).
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: The hypervisor's name (its inventory name in the P(virtfleet.core.hypervisors#inventory) plugin).
      type: str
      sample: esx01.example.com
    type:
      description: V(esxi), V(kvm), V(qemu), V(xen), V(lxc) or V(test).
      type: str
      sample: esxi
    api:
      description: V(vsphere) or V(libvirt).
      type: str
      sample: vsphere
    endpoint:
      description: The endpoint URI it was read through.
      type: str
      sample: vsphere://esx01.example.com
    product:
      description: Hypervisor product.
      type: str
      sample: VMware ESXi
    version:
      description: Hypervisor version.
      type: str
      sample: 8.0.2
    build:
      description: Hypervisor build.
      type: str
      sample: "22380479"
    manager:
      description: The vCenter that manages this host, when read through one.
      type: str
      sample: null
    datacenter:
      description: vSphere datacenter.
      type: str
      sample: null
    cluster:
      description: vSphere cluster.
      type: str
      sample: null
    hardware:
      description: C(vendor), C(model) and C(serial) of the server.
      type: dict
      sample: {"vendor": "Dell Inc.", "model": "PowerEdge R650", "serial": "ABC1234"}
    cpu:
      description: C(model), C(sockets), C(cores), C(threads) and C(mhz).
      type: dict
      sample: {"model": "Intel(R) Xeon(R) Gold 6338", "sockets": 2, "cores": 64, "threads": 128, "mhz": 2000}
    memory_mib:
      description: Memory in MiB.
      type: int
      sample: 524288
    memory_free_mib:
      description: Memory not in use, in MiB, where the hypervisor reports it.
      type: int
      sample: 262144
    storage:
      description: Datastores or storage pools, each with C(name), C(type), C(capacity_gib) and C(free_gib).
      type: list
      elements: dict
      sample: [{"name": "datastore1", "type": "VMFS", "capacity_gib": 3725.5, "free_gib": 2210.25}]
    networks:
      description: Network and port group names.
      type: list
      elements: str
      sample: [VM Network]
    guests:
      description: Guest counts - C(total), C(running), C(stopped) (templates not counted).
      type: dict
      sample: {"total": 12, "running": 10, "stopped": 2}
    connection_state:
      description: V(connected) for libvirt; for a vSphere host, its connection state (V(connected),
        V(disconnected), V(notResponding)).
      type: str
      sample: connected
  sample: [{"name": "esx01.example.com", "type": "esxi", "api": "vsphere", "memory_mib": 524288,
            "cpu": {"model": "Intel(R) Xeon(R) Gold 6338", "sockets": 2, "cores": 64, "threads": 128, "mhz": 2000},
            "guests": {"total": 12, "running": 10, "stopped": 2}}]
guests:
  description: The endpoint's guests (templates left out); empty unless O(guests=true).
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
      sample: 4210c8f2-7d1e-4b0a-9c3f-2e5d8a6b1f40
    power_state:
      description: V(running), V(stopped), V(paused), V(suspended) or V(unknown).
      type: str
      sample: running
    hypervisor:
      description: The name of the hypervisor it runs on (as in RV(hypervisors)).
      type: str
      sample: esx01.example.com
    vcpus:
      description: Virtual CPUs.
      type: int
      sample: 2
    memory_mib:
      description: Memory in MiB.
      type: int
      sample: 4096
    guest_os:
      description: Guest operating system as the hypervisor reports it.
      type: str
      sample: Debian GNU/Linux 12 (64-bit)
    ip_addresses:
      description: Addresses the hypervisor knows of (vSphere guest tools; libvirt DHCP leases).
      type: list
      elements: str
      sample: [192.0.2.10]
    disks:
      description: Disks, each with C(name), C(size_gib), C(source) and C(bus).
      type: list
      elements: dict
      sample: [{"name": "Hard disk 1", "size_gib": 20.0, "source": "[datastore1] web01/web01.vmdk", "bus": "scsi"}]
    nics:
      description: NICs, each with C(mac), C(network) and C(model).
      type: list
      elements: dict
      sample: [{"mac": "00:50:56:aa:bb:cc", "network": "VM Network", "model": "vmxnet3"}]
    tags:
      description: The guest's tags.
      type: dict
      sample: {"role": "web"}
    owner:
      description: The owner id of this collection's ownership mark on this very guest; null when it has none.
      type: str
      sample: null
bmc:
  description: Redfish service facts; null unless the endpoint is a Redfish BMC.
  returned: always
  type: dict
  contains:
    vendor:
      description: BMC vendor.
      type: str
      sample: Dell
    product:
      description: BMC product.
      type: str
      sample: Integrated Dell Remote Access Controller
    redfish_version:
      description: Redfish version of the service.
      type: str
      sample: 1.11.0
    endpoint:
      description: The endpoint URI.
      type: str
      sample: redfish://bmc01.example.com
    systems:
      description: Ids of the systems the BMC manages.
      type: list
      elements: str
      sample: [System.Embedded.1]
  sample: null
calls:
  description: Remote calls made.
  returned: always
  type: int
  sample: 6
endpoint:
  description: The endpoint as parsed - never its credentials.
  returned: always
  type: dict
  contains:
    api:
      description: V(vsphere), V(libvirt) or V(redfish).
      type: str
      sample: vsphere
    uri:
      description: The endpoint URI.
      type: str
      sample: vsphere://esx01.example.com
    host:
      description: Host name or address; null for a local libvirt URI.
      type: str
      sample: esx01.example.com
    port:
      description: Port (443 by default for vSphere and Redfish); for libvirt, the one the URI gives, else null.
      type: int
      sample: 443
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.virtfleet.core.plugins.module_utils._argspec import (
    connection_argument_spec,
    connection_secrets,
    endpoint_from_params,
)
from ansible_collections.virtfleet.core.plugins.module_utils._discovery import discover_endpoint, paused_gc
from ansible_collections.virtfleet.core.plugins.module_utils._errors import VirtfleetError


def main() -> None:
    spec = connection_argument_spec()
    spec["guests"] = {"type": "bool", "default": False}
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    # A password in the uri (refused below) or read from VIRTFLEET_PASSWORD_FILE: hidden from every output.
    module.no_log_values.update(connection_secrets(module.params))
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
