# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Connection options shared by every module; matches plugins/module_utils/_argspec.py one to one."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  uri:
    description:
      - The hypervisor endpoint.
      - V(vsphere://host[:port]) for an ESXi server or a vCenter (port 443 by default).
      - Any libvirt URI for KVM/QEMU, for example V(qemu:///system), V(qemu+ssh://root@kvm01/system),
        V(qemu+tls://kvm01/system), V(qemu+tcp://kvm01/system) or V(test:///default).
      - Falls back to the E(LIBVIRT_DEFAULT_URI) environment variable.
    type: str
    required: true
  username:
    description:
      - User to log in with (vSphere; libvirt SASL).
      - Falls back to the E(VMWARE_USER) environment variable, which AWX's VMware credential sets.
    type: str
    aliases: [user]
  password:
    description:
      - Password for O(username). Never logged, never returned.
      - Falls back to the E(VMWARE_PASSWORD) environment variable.
    type: str
    aliases: [pass, pwd]
  validate_certs:
    description:
      - Verify the endpoint's TLS certificate. Only set V(false) for a lab or a simulator.
      - Falls back to the E(VMWARE_VALIDATE_CERTS) environment variable.
    type: bool
    default: true
  timeout:
    description:
      - Seconds allowed for each network operation on the endpoint.
    type: float
    default: 10
"""
