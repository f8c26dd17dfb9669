# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""What a vSphere VM's configuration means in the collection's model, both ways.

Reading: one function per field (power state, counts, disk name/size/datastore/bus, NIC network/model/MAC,
extraConfig, tags). Discovery (raw SOAP, _vsphere_raw) and convergence (pyVmomi) read the same properties
through different parsers; both hand the plain values to these functions, so the two readers of one VM cannot
disagree. Writing: the extraConfig bookkeeping keys and the cloud-init options (configspec.py builds the rest).
"""

from __future__ import annotations

import base64
import json
from typing import Any, Dict, Iterable, List, Optional, Tuple

from ..._errors import one_line
from ..._model import CloudInit, gib
from .session import vim

# Bookkeeping in extraConfig: ownership, tags (TAG_PREFIX), the disks this collection created (name -> its
# backing file), disks it reused (kept from an earlier guest of the name: named, not created) and the digest of
# the cloud-init documents last written.
#
# The ownership mark is the owner id plus the VM's config.instanceUuid it was written on. A clone, a VM deployed
# from a template and a registered copy of the files copy extraConfig, and vCenter gives each of them a new
# instanceUuid (it keeps instance UUIDs unique in its inventory; the user cannot ask for a duplicate the way
# `uuid` (config.uuid, the BIOS UUID) can be set in a clone spec or kept by "I moved it"). So the BIOS uuid is
# not used: only the instance UUID tells the VM the mark was written on from its copies. The mark is written
# by CreateVM itself (the ConfigSpec carries an instanceUuid chosen here), so no VM of ours ever exists unmarked.
TAG_PREFIX = "virtfleet.tag."
OWNER_KEY = "virtfleet.owner"
OWNER_UUID_KEY = "virtfleet.owner.uuid"
DISK_PREFIX = "virtfleet.disk."
KEPT_PREFIX = "virtfleet.kept."
# Set (to the VM's instanceUuid) before the stop of a restart, cleared after the start: found on a powered-off
# VM, it means a run stopped the guest and did not get to start it again.
RESTARTING_KEY = "virtfleet.restarting"
CLOUD_INIT_DIGEST_KEY = "virtfleet.cloud_init.digest"
GUEST_ID = "otherLinux64Guest"
VSPHERE_DISK_BUSES = ("scsi", "sata", "nvme", "ide")
VSPHERE_DISK_FORMATS = ("thin", "thick", "eagerzeroedthick")
NIC_CLASSES = {"vmxnet3": "VirtualVmxnet3", "e1000": "VirtualE1000", "e1000e": "VirtualE1000e",
               "pcnet32": "VirtualPCNet32"}

_POWER = {"poweredOn": "running", "poweredOff": "stopped", "suspended": "suspended"}


# ---------------------------------------------------------------------------------------- one function per field
def power_state(value: Optional[str]) -> str:
    """runtime.powerState -> running | stopped | suspended | unknown."""
    return _POWER.get(value or "", "unknown")


def count(value: Any) -> Optional[int]:
    """config.hardware.numCPU / memoryMB (MiB, as vSphere gives it) -> int, or None when not read."""
    return int(value) if value is not None else None


def mac(value: Optional[str]) -> Optional[str]:
    return (value or "").lower() or None


def extra_config(options: Iterable[Tuple[str, Optional[str]]]) -> Dict[str, str]:
    """extraConfig (key, value) pairs as a dict. vSphere deletes a key set to ""; vcsim appends instead, so the
    last value wins and an empty value means absent."""
    out: Dict[str, str] = {}
    for key, value in options:
        out[key] = "" if value is None else str(value)
    return {k: v for k, v in out.items() if v != ""}


def owner(extra: Dict[str, str], instance_uuid: Optional[str]) -> Optional[str]:
    """The mark's owner id, only when the mark was written on this very VM (it names its instanceUuid)."""
    uuid = (instance_uuid or "").lower()
    return extra.get(OWNER_KEY) if uuid and extra.get(OWNER_UUID_KEY, "").lower() == uuid else None


def tags(extra: Dict[str, str]) -> Dict[str, str]:
    return {k[len(TAG_PREFIX):]: v for k, v in extra.items() if k.startswith(TAG_PREFIX)}


def disk_records(extra: Dict[str, str]) -> Dict[str, str]:
    """Disk file -> the name this collection gave it (created or reused), from extraConfig."""
    return {v: k[len(prefix):] for prefix in (KEPT_PREFIX, DISK_PREFIX) for k, v in extra.items()
            if k.startswith(prefix)}


def disk_name(records: Dict[str, str], file_name: Optional[str], label: Optional[str], key: Any) -> str:
    """A disk this collection made or reused is named by its extraConfig record, any other disk by its label."""
    return records.get(file_name or "", label or str(key))


def disk_size_gib(size_bytes: Optional[int], size_kib: Optional[int]) -> Optional[float]:
    return gib(size_bytes or (size_kib or 0) * 1024)


def datastore_of(file_name: Optional[str]) -> Optional[str]:
    """'[ds1] dir/file.vmdk' -> 'ds1'."""
    if not file_name or not file_name.startswith("["):
        return None
    return file_name[1:].split("]", 1)[0]


def bus_of_type(name: Optional[str]) -> Optional[str]:
    """Disk bus from a controller's type name (pyVmomi class or xsi:type)."""
    if not name:
        return None
    for marker, bus in (("NVME", "nvme"), ("SATA", "sata"), ("AHCI", "sata"), ("IDE", "ide"), ("SCSI", "scsi"),
                        ("LsiLogic", "scsi"), ("BusLogic", "scsi")):
        if marker.lower() in name.lower():
            return bus
    return None


def nic_network(device_name: Optional[str], network: Optional[str], portgroup: Optional[str],
                networks: Dict[str, str]) -> Optional[str]:
    """The network name a NIC backing points at: a distributed port group (by key), a network moref (standard
    or opaque), else the backing's device name. NETWORKS: moref id -> name."""
    if portgroup:
        return networks.get(portgroup, portgroup)
    if network:
        return networks.get(network, device_name)
    return device_name


def nic_model(type_name: str) -> str:
    """'vim.vm.device.VirtualVmxnet3' or 'VirtualVmxnet3' -> 'vmxnet3'."""
    return type_name.rsplit(".", 1)[-1].replace("Virtual", "").lower()


# ---------------------------------------------------------------------------------------- pyVmomi devices
def bus(controller: Any) -> Optional[str]:
    if controller is None:
        return None
    return bus_of_type(type(controller).__name__)


def backing_network(backing: Any, networks: Dict[str, str]) -> Optional[str]:
    """nic_network for a pyVmomi NIC backing."""
    port = getattr(backing, "port", None)
    ref = getattr(backing, "network", None)
    return nic_network(getattr(backing, "deviceName", None), ref._moId if ref is not None else None,
                       getattr(port, "portgroupKey", None) if port is not None else None, networks)


def disk_format(backing: Any) -> Optional[str]:
    if not isinstance(backing, vim.vm.device.VirtualDisk.FlatVer2BackingInfo):
        return None
    if backing.thinProvisioned:
        return "thin"
    return "eagerzeroedthick" if backing.eagerlyScrub else "thick"


def options(values: Any) -> Dict[str, str]:
    """extra_config of a pyVmomi OptionValue list."""
    return extra_config((opt.key, opt.value) for opt in values or [])


def disks(props: Dict[str, Any], extra: Dict[str, str]) -> List[Tuple[str, Any]]:
    """(name, device) of every disk of a VM's properties, in a stable order: by controller, then unit."""
    records = disk_records(extra)
    found = [d for d in props.get("config.hardware.device") or [] if isinstance(d, vim.vm.device.VirtualDisk)]
    found.sort(key=lambda d: (d.controllerKey or 0, d.unitNumber or 0, d.key))
    return [(disk_name(records, getattr(dev.backing, "fileName", None),
                       dev.deviceInfo.label if dev.deviceInfo is not None else None, dev.key), dev) for dev in found]


def kib(size_gib: Optional[float]) -> int:
    return round((size_gib or 0) * 1024 * 1024)


def written_gib(config: Any) -> float:
    """GiB a ConfigSpec's task writes, generously: the whole size of every non-thin disk it creates or grows."""
    total = 0.0
    for change in getattr(config, "deviceChange", None) or []:
        dev = change.device
        if isinstance(dev, vim.vm.device.VirtualDisk) and (change.fileOperation == "create"
                                                           or change.operation == "edit"):
            if not getattr(dev.backing, "thinProvisioned", False):
                total += (dev.capacityInKB or 0) / 1024 / 1024
    return total


# ---------------------------------------------------------------------------------------- cloud-init
def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _mapping(text: Optional[str]) -> Dict[str, Any]:
    """A meta-data document (JSON or YAML) as a dict; ValueError if it is not a mapping."""
    if not text or not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        try:
            import yaml
        except ImportError:  # pragma: no cover - PyYAML ships with ansible-core
            raise ValueError("not JSON (and PyYAML is missing to read YAML)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(one_line(exc)) from None
    if not isinstance(data, dict):
        raise ValueError("not a mapping")
    return data


def metadata(cloud_init: CloudInit) -> Optional[str]:
    """guestinfo.metadata: the user's meta-data; with a network config, that goes inside it as ``network`` +
    ``network.encoding`` (cloud-init's VMware datasource reads no separate network key)."""
    if cloud_init.network_config is None:
        return cloud_init.meta_data
    meta = _mapping(cloud_init.meta_data)
    meta["network"] = _b64(cloud_init.network_config)
    meta["network.encoding"] = "base64"
    return json.dumps(meta, sort_keys=True)


def cloud_init_options(cloud_init: CloudInit, clear: bool) -> List[Tuple[str, str]]:
    """The guestinfo keys of the VMware datasource (base64) plus our digest. CLEAR: empty the keys of a
    document that is no longer given (a reconfigure), so no stale document stays behind."""
    out: List[Tuple[str, str]] = []
    for key, text in (("guestinfo.userdata", cloud_init.user_data), ("guestinfo.metadata", metadata(cloud_init))):
        if text is not None:
            out += [(key, _b64(text)), (key + ".encoding", "base64")]
        elif clear:
            out += [(key, ""), (key + ".encoding", "")]
    out.append((CLOUD_INIT_DIGEST_KEY, cloud_init.digest()))
    return out
