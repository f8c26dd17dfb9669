# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Where new guests go; matches placement_argument_spec() in plugins/module_utils/_argspec.py one to one."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  datacenter:
    description:
      - vSphere datacenter. Defaults to the only datacenter of a vCenter; required when there are several.
    type: str
  cluster:
    description:
      - vSphere cluster new guests are created in (its root resource pool).
    type: str
  esxi_host:
    description:
      - ESXi host (its name in vCenter) new guests are created on.
    type: str
  datastore:
    description:
      - Default datastore (vSphere) or storage pool (libvirt) for new disks and the cloud-init seed; a disk's
        own C(pool) wins.
      - Defaults to the first datastore of the host, or the libvirt pool named C(default).
    type: str
    aliases: [pool]
  folder:
    description:
      - vSphere VM folder path below the datacenter's VM folder, for example V(prod/web).
    type: str
  resource_pool:
    description:
      - vSphere resource pool name for new guests.
    type: str
  domain_type:
    description:
      - libvirt domain type of new guests. V(kvm) needs working hardware virtualisation; V(qemu) is TCG emulation.
      - Defaults to V(kvm) when the host offers it, else V(qemu).
    type: str
    choices: [kvm, qemu]
"""
