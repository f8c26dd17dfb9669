# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The options of one guest; matches guest_argument_spec() in plugins/module_utils/_argspec.py one to one.

DOCUMENTATION documents them as a module's own options (virtfleet.core.guest). GUESTS is the same text as the
suboptions of the guests module's ``guests`` list (virtfleet.core.guest_spec.guests): indented, and each reference
to a guest option made to point below it (O(disks[].name) -> O(guests[].disks[].name)). Both are plain strings (the
sanity tests read doc fragments as literals); tests/unit/test_docs.py keeps GUESTS equal to DOCUMENTATION and
prints the text to paste when they differ."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  name:
    description:
      - Guest name (libvirt domain name, vSphere VM name). 1-80 letters, digits, V(.), V(_) or V(-), starting
        with a letter or digit.
    type: str
    required: true
  uuid:
    description:
      - Guest UUID. When set, it says which of several same-named guests is meant (vSphere names are not unique),
        and a new guest gets this UUID. Otherwise a random one is chosen.
      - A UUID never overrides O(name) - a UUID that belongs to a guest of another name is refused, and two guests
        of one list cannot have the same UUID.
    type: str
  vcpus:
    description:
      - Virtual CPUs. New guests get 1. Growing is live where the guest allows it (libvirt guests created by this
        collection can grow up to the host's CPU count; vSphere with CPU hot add).
    type: int
  memory_mib:
    description:
      - Memory in MiB. New guests get 1024. Growing is live on vSphere with memory hot add; on libvirt only up to
        the domain's maximum memory, otherwise it needs a restart.
    type: int
  firmware:
    description:
      - V(bios) or V(uefi). A change needs a restart. New guests get V(bios).
    type: str
    choices: [bios, uefi]
  disks:
    description:
      - Disks, identified by O(disks[].name). Disks the guest has that are not listed are left alone.
      - A listed disk that is missing is created (and attached live); a larger O(disks[].size_gib) grows it.
        Shrinking is refused.
    type: list
    elements: dict
    suboptions:
      name:
        description:
          - Disk name. On libvirt the disk carries the alias C(ua-NAME) (an existing disk may also be named by its
            target, for example V(vda)); on vSphere this collection records the name in the VM's extraConfig (an
            existing disk may be named by its label, for example V(Hard disk 1)).
        type: str
        required: true
      size_gib:
        description:
          - Size in GiB. Required for a new disk unless O(disks[].source) is given.
        type: float
      pool:
        description:
          - libvirt storage pool or vSphere datastore of a new disk. Defaults to O(datastore).
        type: str
        aliases: [datastore]
      format:
        description:
          - V(qcow2) or V(raw) on libvirt (default V(qcow2)); V(thin), V(thick) or V(eagerzeroedthick) on vSphere
            (default V(thin)). Used when the disk is created.
        type: str
        choices: [qcow2, raw, thin, thick, eagerzeroedthick]
      source:
        description:
          - libvirt only. A volume (name in the same pool, or an absolute path) copied into the new disk, for
            example a cloud image. Used when the disk is created.
        type: str
      bus:
        description:
          - Disk bus. libvirt default V(virtio); vSphere default V(scsi) (paravirtual). A change needs a restart.
        type: str
        choices: [virtio, scsi, sata, ide, nvme]
  nics:
    description:
      - Network interfaces. A listed NIC is matched by O(nics[].mac) when given, else by network (the first NIC on
        that network not matched yet). Unmatched listed NICs are added live; NICs of the guest that are not listed
        are left alone.
      - A NIC without a MAC gets one derived from the guest name and its position, so check mode shows the address
        the real run will use.
    type: list
    elements: dict
    suboptions:
      network:
        description:
          - libvirt network or vSphere network/port group name. Must exist on the host.
        type: str
        required: true
      mac:
        description:
          - MAC address. Must not be used by another guest.
        type: str
      model:
        description:
          - NIC model. libvirt default V(virtio); vSphere default V(vmxnet3). A change needs a restart.
        type: str
        choices: [virtio, e1000, e1000e, rtl8139, vmxnet3, pcnet32]
  cloud_init:
    description:
      - First-boot data for cloud-init. On libvirt a NoCloud seed ISO (volume label C(cidata)) is built and attached
        read-only; on vSphere it goes into C(guestinfo.*) extraConfig. A change needs a restart.
      - Compared by content digest; the documents themselves are not returned.
    type: dict
    suboptions:
      user_data:
        description:
          - user-data document (string), or a dict sent as C(#cloud-config).
          - Never logged or returned (it often holds passwords); results and diffs show only the digest.
        type: raw
      meta_data:
        description: meta-data document (string or dict), for example C(instance-id) and C(local-hostname).
        type: raw
      network_config:
        description: network-config document (string or dict).
        type: raw
  boot:
    description:
      - libvirt direct kernel boot (paths on the hypervisor host). A change needs a restart.
    type: dict
    suboptions:
      kernel:
        description: Kernel image path.
        type: str
        required: true
      initrd:
        description: Initrd path.
        type: str
      cmdline:
        description: Kernel command line.
        type: str
  autostart:
    description:
      - Start the guest when the hypervisor starts (libvirt).
    type: bool
  tags:
    description:
      - A small dict of strings kept on the guest (libvirt domain metadata in this collection's XML namespace;
        vSphere extraConfig C(virtfleet.tag.*)). When set, it is the whole tag set.
    type: dict
  state:
    description:
      - V(present) the guest is defined; its power state is left as it is.
      - V(running) defined and running. V(stopped) defined and shut down (see O(shutdown_timeout), O(force)).
      - V(absent) the definition is removed (nvram, managed save and snapshot metadata included); disks are kept
        unless O(remove_storage=true).
    type: str
    default: present
    choices: [present, running, stopped, absent]
  status:
    description:
      - Read-only facts as M(virtfleet.core.guest_info) returns them. Ignored, so that module's output can be
        fed back as desired state unchanged.
    type: dict
"""

    # The guests module documents the option itself (description, type, elements, required); the two are merged
    # by key.
    GUESTS = r"""
options:
  guests:
    suboptions:
      name:
        description:
          - Guest name (libvirt domain name, vSphere VM name). 1-80 letters, digits, V(.), V(_) or V(-), starting with a
            letter or digit.
        type: str
        required: true
      uuid:
        description:
          - Guest UUID. When set, it says which of several same-named guests is meant (vSphere names are not unique),
            and a new guest gets this UUID. Otherwise a random one is chosen.
          - A UUID never overrides O(guests[].name) - a UUID that belongs to a guest of another name is refused, and two
            guests of one list cannot have the same UUID.
        type: str
      vcpus:
        description:
          - Virtual CPUs. New guests get 1. Growing is live where the guest allows it (libvirt guests created by this
            collection can grow up to the host's CPU count; vSphere with CPU hot add).
        type: int
      memory_mib:
        description:
          - Memory in MiB. New guests get 1024. Growing is live on vSphere with memory hot add; on libvirt only up to
            the domain's maximum memory, otherwise it needs a restart.
        type: int
      firmware:
        description:
          - V(bios) or V(uefi). A change needs a restart. New guests get V(bios).
        type: str
        choices: [bios, uefi]
      disks:
        description:
          - Disks, identified by O(guests[].disks[].name). Disks the guest has that are not listed are left alone.
          - A listed disk that is missing is created (and attached live); a larger O(guests[].disks[].size_gib) grows
            it. Shrinking is refused.
        type: list
        elements: dict
        suboptions:
          name:
            description:
              - Disk name. On libvirt the disk carries the alias C(ua-NAME) (an existing disk may also be named by its
                target, for example V(vda)); on vSphere this collection records the name in the VM's extraConfig (an
                existing disk may be named by its label, for example V(Hard disk 1)).
            type: str
            required: true
          size_gib:
            description:
              - Size in GiB. Required for a new disk unless O(guests[].disks[].source) is given.
            type: float
          pool:
            description:
              - libvirt storage pool or vSphere datastore of a new disk. Defaults to O(datastore).
            type: str
            aliases: [datastore]
          format:
            description:
              - V(qcow2) or V(raw) on libvirt (default V(qcow2)); V(thin), V(thick) or V(eagerzeroedthick) on vSphere
                (default V(thin)). Used when the disk is created.
            type: str
            choices: [qcow2, raw, thin, thick, eagerzeroedthick]
          source:
            description:
              - libvirt only. A volume (name in the same pool, or an absolute path) copied into the new disk, for
                example a cloud image. Used when the disk is created.
            type: str
          bus:
            description:
              - Disk bus. libvirt default V(virtio); vSphere default V(scsi) (paravirtual). A change needs a restart.
            type: str
            choices: [virtio, scsi, sata, ide, nvme]
      nics:
        description:
          - Network interfaces. A listed NIC is matched by O(guests[].nics[].mac) when given, else by network (the first
            NIC on that network not matched yet). Unmatched listed NICs are added live; NICs of the guest that are not
            listed are left alone.
          - A NIC without a MAC gets one derived from the guest name and its position, so check mode shows the address
            the real run will use.
        type: list
        elements: dict
        suboptions:
          network:
            description:
              - libvirt network or vSphere network/port group name. Must exist on the host.
            type: str
            required: true
          mac:
            description:
              - MAC address. Must not be used by another guest.
            type: str
          model:
            description:
              - NIC model. libvirt default V(virtio); vSphere default V(vmxnet3). A change needs a restart.
            type: str
            choices: [virtio, e1000, e1000e, rtl8139, vmxnet3, pcnet32]
      cloud_init:
        description:
          - First-boot data for cloud-init. On libvirt a NoCloud seed ISO (volume label C(cidata)) is built and attached
            read-only; on vSphere it goes into C(guestinfo.*) extraConfig. A change needs a restart.
          - Compared by content digest; the documents themselves are not returned.
        type: dict
        suboptions:
          user_data:
            description:
              - user-data document (string), or a dict sent as C(#cloud-config).
              - Never logged or returned (it often holds passwords); results and diffs show only the digest.
            type: raw
          meta_data:
            description:
              - meta-data document (string or dict), for example C(instance-id) and C(local-hostname).
            type: raw
          network_config:
            description:
              - network-config document (string or dict).
            type: raw
      boot:
        description:
          - libvirt direct kernel boot (paths on the hypervisor host). A change needs a restart.
        type: dict
        suboptions:
          kernel:
            description:
              - Kernel image path.
            type: str
            required: true
          initrd:
            description:
              - Initrd path.
            type: str
          cmdline:
            description:
              - Kernel command line.
            type: str
      autostart:
        description:
          - Start the guest when the hypervisor starts (libvirt).
        type: bool
      tags:
        description:
          - A small dict of strings kept on the guest (libvirt domain metadata in this collection's XML namespace;
            vSphere extraConfig C(virtfleet.tag.*)). When set, it is the whole tag set.
        type: dict
      state:
        description:
          - V(present) the guest is defined; its power state is left as it is.
          - V(running) defined and running. V(stopped) defined and shut down (see O(shutdown_timeout), O(force)).
          - V(absent) the definition is removed (nvram, managed save and snapshot metadata included); disks are kept
            unless O(remove_storage=true).
        type: str
        default: present
        choices: [present, running, stopped, absent]
      status:
        description:
          - Read-only facts as M(virtfleet.core.guest_info) returns them. Ignored, so that module's output can be fed
            back as desired state unchanged.
        type: dict
"""
