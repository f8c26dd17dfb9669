# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
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
      - A password in the URI (V(vsphere://user:secret@host)) is refused; use O(password).
        A user in a vSphere or Redfish URI is refused too (use O(username)); libvirt uses the user of its URI.
      - A libvirt URI that makes libvirt run a program (the C(ext) transport, C(command=), C(netcat=)) is refused
        unless O(allow_uri_commands=true).
      - A libvirt URI with C(no_verify=1) is refused while O(validate_certs=true).
      - V(qemu+libssh://user@host/system?keyfile=/path/key&known_hosts=/path/known_hosts) checks the SSH host key
        against that known_hosts file; C(known_hosts_verify=ignore) or C(auto) is refused while O(validate_certs=true).
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
      - Falls back to the E(VMWARE_PASSWORD) environment variable, then to the first line of the file that
        E(VIRTFLEET_PASSWORD_FILE) names (how the collection's AWX credential type injects it).
    type: str
    aliases: [pass, pwd]
  validate_certs:
    description:
      - Verify the endpoint's TLS certificate. Only set V(false) for a lab or a simulator.
      - Falls back to the E(VMWARE_VALIDATE_CERTS) environment variable.
    type: bool
    default: true
  ca_path:
    description:
      - A PEM file of CA certificates, or a directory of hashed certificates, to verify the endpoint's TLS
        certificate with (vSphere and Redfish). Only these CAs are then trusted, not the system store.
      - Not used when O(validate_certs=false). libvirt over TLS uses its own C(pkipath=) URI parameter.
      - Falls back to the E(VIRTFLEET_CA_PATH), then the E(REQUESTS_CA_BUNDLE) environment variable.
    type: path
  allow_uri_commands:
    description:
      - Allow a libvirt URI that makes libvirt run a program, on this machine (the C(ext) transport and its
        C(command=)) or on the remote one (C(netcat=)).
    type: bool
    default: false
  timeout:
    description:
      - Seconds allowed for each network operation on the endpoint; more than 0, at most 3600.
      - One vSphere call (its whole answer) may take at most six times this long; a remote libvirt connection
        whose peer stops answering is closed after about this long (libvirt keepalive).
    type: float
    default: 10
"""
