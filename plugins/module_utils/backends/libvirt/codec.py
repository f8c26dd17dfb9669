# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Domain XML, both ways: the one parse of a domain definition (DomainView) that discovery facts and convergence
state are both built from, the elements this collection writes (disks, NICs, the seed, its metadata), the NoCloud
seed ISO, and the check of what libvirt stored against what it was sent. No libvirt call is made here.

A guest is described to libvirt with XML built element by element (ElementTree), never from a string template:
user values can never inject XML. Persistent changes edit the domain's inactive XML in place (only the elements
a change names), so everything the user configured by other means stays."""

from __future__ import annotations

import copy
import dataclasses
import io
import xml.etree.ElementTree as ET
from typing import Any, Dict, List, Optional, Set, Tuple

from ..._errors import EndpointError, MissingLibraryError
from ..._model import SEED_DISK, BootSpec, CloudInit, GuestSpec, NicSpec, gib, mib

# Our own XML namespace for the small tag dict kept in a domain's <metadata>.
METADATA_NS = "https://virtfleet.dev/xmlns/guest/1"
# A separate element, set just before a restart stops a guest and cleared once it runs again: a stopped guest
# that still has it was left down by an interrupted restart (GuestState.interrupted_restart).
RESTART_NS = "https://virtfleet.dev/xmlns/restart/1"
ET.register_namespace("vf", METADATA_NS)
LIBOSINFO_NS = "http://libosinfo.org/xmlns/libvirt/domain/1.0"
SEED_ALIAS = f"ua-{SEED_DISK}"  # the user alias libvirt keeps for the seed; the model reserves the name

# virDomainState -> normalised power state
POWER = {0: "unknown", 1: "running", 2: "running", 3: "paused", 4: "running", 5: "stopped", 6: "stopped",
         7: "suspended"}
_TARGET_PREFIX = {"virtio": "vd", "scsi": "sd", "sata": "sd", "ide": "hd", "nvme": "nvme"}
Nic = Tuple[Optional[str], Optional[str], Optional[str]]  # (MAC lowercased, network/bridge/device, model)


def ns(tag: str) -> str:
    return f"{{{METADATA_NS}}}{tag}"


def sub(parent: ET.Element, tag: str, text: Optional[str] = None, **attrs: Optional[str]) -> ET.Element:
    child = ET.SubElement(parent, tag, {k: v for k, v in attrs.items() if v is not None})
    if text is not None:
        child.text = text
    return child


def to_xml(element: ET.Element) -> str:
    return ET.tostring(element, encoding="unicode")


def _unit_bytes(unit: str) -> int:
    """Bytes per libvirt memory unit (libvirt writes KiB, but a user-defined XML may say otherwise)."""
    scale = {"b": 1, "bytes": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2, "mib": 1024**2,
             "mb": 1000**2, "g": 1024**3, "gib": 1024**3, "gb": 1000**3}
    return scale.get(unit.lower(), 1024)


def mib_of(element: Optional[ET.Element]) -> Optional[int]:
    if element is None or not element.text:
        return None
    return mib(int(element.text) * _unit_bytes(element.get("unit", "KiB")))


# ------------------------------------------------------------------------------------------ reading
class Disk:
    """One <disk> of a domain as this collection sees it."""

    def __init__(self, element: ET.Element) -> None:
        self.element = element
        alias = element.find("alias")
        target = element.find("target")
        source = element.find("source")
        driver = element.find("driver")
        self.alias = alias.get("name", "") if alias is not None else ""
        self.dev = target.get("dev", "") if target is not None else ""
        self.bus = target.get("bus") if target is not None else None
        self.pool = source.get("pool") if source is not None else None
        self.volume = source.get("volume") if source is not None else None
        self.path = source.get("file") or source.get("dev") if source is not None else None
        self.format = driver.get("type") if driver is not None else None
        self.name = self.alias[3:] if self.alias.startswith("ua-") else self.dev

    @property
    def is_seed(self) -> bool:
        return self.alias == SEED_ALIAS

    @property
    def where(self) -> Tuple[str, str, str]:
        """Where its data is (pool, volume, path): what must survive a define unchanged."""
        return (self.pool or "", self.volume or "", self.path or "")


@dataclasses.dataclass
class DomainView:
    """One parse of a domain definition. Discovery facts (GuestFacts) and convergence state (GuestState) are
    both built from it, so that the two readers of a guest cannot disagree."""

    name: str
    uuid: Optional[str]
    power_state: str
    vcpus: int
    max_vcpus: int
    memory_mib: Optional[int]  # what the guest gets: <currentMemory>, else <memory>
    max_memory_mib: Optional[int]  # <memory>
    disks: List[Disk]  # device='disk' only, the seed left out
    seed: Optional[Disk]
    sizes: Dict[str, float]  # target dev -> GiB, from the bulk block stats (running guests)
    sources: Dict[str, str]  # disk name -> the image it was copied from at creation (our metadata)
    recorded: Dict[str, bool]  # disk name -> whether this collection created its volume (our metadata)
    nics: List[Nic]
    tags: Dict[str, str]
    owner: Optional[str]  # our mark's owner, only when the mark names this domain's uuid
    digest: Optional[str]
    restart_marked: bool
    firmware: str
    boot: Optional[BootSpec]
    guest_os: Optional[str]


def view(root: ET.Element, stats: Dict[str, Any]) -> DomainView:
    meta = root.find(f"./metadata/{ns('guest')}")
    uuid = root.findtext("uuid")
    owner = None
    sources: Dict[str, str] = {}
    recorded: Dict[str, bool] = {}
    digest = None
    if meta is not None:
        # A clone or a copy of this XML under a new uuid carries the mark but owns nothing, nor its disks.
        if meta.get("owner") and meta.get("uuid") == uuid:
            owner = meta.get("owner")
        for record in meta.findall(ns("disk")):
            recorded[record.get("name", "")] = record.get("created") == "yes"
            if record.get("source"):
                sources[record.get("name", "")] = record.get("source", "")
        seed_el = meta.find(ns("cloud-init"))
        digest = seed_el.get("digest") if seed_el is not None else None
    sizes = {}
    for i in range(int(stats.get("block.count", 0))):
        if f"block.{i}.name" in stats and f"block.{i}.capacity" in stats:
            sizes[stats[f"block.{i}.name"]] = gib(stats[f"block.{i}.capacity"]) or 0.0
    disks, seed = [], None
    for element in root.findall("./devices/disk"):
        if element.get("device", "disk") != "disk":
            continue
        disk = Disk(element)
        if disk.is_seed:
            seed = disk
        else:
            disks.append(disk)
    os_el = root.find("os")
    boot = None
    if os_el is not None and os_el.findtext("kernel"):
        boot = BootSpec(kernel=os_el.findtext("kernel"), initrd=os_el.findtext("initrd"),
                        cmdline=os_el.findtext("cmdline"))
    vcpu = root.find("vcpu")
    max_vcpus = int(vcpu.text or 1) if vcpu is not None else 1
    max_memory = mib_of(root.find("memory"))
    libosinfo = root.find(f"./metadata/{{{LIBOSINFO_NS}}}libosinfo/{{{LIBOSINFO_NS}}}os")
    return DomainView(
        name=root.findtext("name") or "",
        uuid=uuid,
        power_state=POWER.get(int(stats.get("state.state", 0)), "unknown"),
        vcpus=int(vcpu.get("current") or max_vcpus) if vcpu is not None else 1,
        max_vcpus=max_vcpus,
        memory_mib=mib_of(root.find("currentMemory")) or max_memory,
        max_memory_mib=max_memory,
        disks=disks,
        seed=seed,
        sizes=sizes,
        sources=sources,
        recorded=recorded if owner else {},
        nics=interfaces(root),
        tags=_tags(meta),
        owner=owner,
        digest=digest,
        restart_marked=root.find(f"./metadata/{{{RESTART_NS}}}restart") is not None,
        firmware=_firmware_of(os_el),
        boot=boot,
        guest_os=libosinfo.get("id") if libosinfo is not None else None,
    )


def interfaces(root: ET.Element) -> List[Nic]:
    """(MAC lowercased, network/bridge/device, model) of every <interface> of a domain definition."""
    out = []
    for iface in root.findall("./devices/interface"):
        mac_el, src_el, model_el = iface.find("mac"), iface.find("source"), iface.find("model")
        network = None
        if src_el is not None:
            network = src_el.get("network") or src_el.get("bridge") or src_el.get("dev")
        out.append((mac_el.get("address", "").lower() if mac_el is not None else None, network,
                    model_el.get("type") if model_el is not None else None))
    return out


def volumes_of(root: ET.Element) -> List[Tuple[str, str]]:
    """(pool, volume) of every disk of a domain definition that names its storage by pool and volume."""
    return [(e.get("pool", ""), e.get("volume", "")) for e in root.findall("./devices/disk/source")
            if e.get("pool") and e.get("volume")]


def _tags(meta: Optional[ET.Element]) -> Dict[str, str]:
    """The tag dict kept in our <metadata> element (named tags only)."""
    if meta is None:
        return {}
    return {tag.get("name", ""): tag.text or "" for tag in meta.findall(ns("tag")) if tag.get("name")}


def _firmware_of(os_el: Optional[ET.Element]) -> str:
    if os_el is None:
        return "bios"
    loader = os_el.find("loader")
    if os_el.get("firmware") == "efi" or (loader is not None and loader.get("type") == "pflash"):
        return "uefi"
    return "bios"


def restart_view(root: ET.Element) -> Dict[str, Any]:
    """The parts of a domain definition that only a (re)start brings to the guest, normalised, so that the
    persistent and the live definition can be compared field by field."""
    vcpu = root.find("vcpu")
    os_el = root.find("os")
    disks = []
    for element in root.findall("./devices/disk"):
        source, target = element.find("source"), element.find("target")
        where = None
        if source is not None:
            where = f"{source.get('pool')}/{source.get('volume')}" if source.get("volume") else source.get("file")
        disks.append((where or "", target.get("bus", "") if target is not None else ""))
    nics = []
    for iface in root.findall("./devices/interface"):
        mac, model = iface.find("mac"), iface.find("model")
        nics.append(((mac.get("address", "") if mac is not None else "").lower(),
                     model.get("type", "") if model is not None else ""))
    return {
        "vcpus": (vcpu.get("current") or vcpu.text) if vcpu is not None else None,
        "memory_mib": mib_of(root.find("memory")),
        "firmware": _firmware_of(os_el),
        "boot": tuple(os_el.findtext(k) for k in ("kernel", "initrd", "cmdline")) if os_el is not None else None,
        "disks": sorted(disks),
        "nics": sorted(nics),
    }


def stored_mismatch(sent: ET.Element, stored: ET.Element) -> Optional[Tuple[str, str]]:
    """(disk name, problem) of the first disk SENT that libvirt did not STORE as sent, else None. libvirt may
    store less than it was sent without failing: it drops a user alias that does not match ^ua-[A-Za-z0-9_-]+$,
    and the disk then reads back under its target name, which the next run would attach again."""
    have = {(d.alias, d.where) for d in map(Disk, stored.findall("./devices/disk"))}
    places = {where for _alias, where in have}
    for disk in map(Disk, sent.findall("./devices/disk")):
        if (disk.alias, disk.where) in have:
            continue
        if disk.alias and disk.where in places:
            return disk.name, f"libvirt dropped its alias {disk.alias!r}"
        return disk.name, "libvirt did not store it as sent"
    return None


# ------------------------------------------------------------------------------------------ writing
def disk_element(disk_name: str, disk_format: Optional[str], pool: str, volume: str, dev: str,
                 bus: Optional[str]) -> ET.Element:
    element = ET.Element("disk", {"type": "volume", "device": "disk"})
    sub(element, "driver", name="qemu", type=disk_format or "qcow2")
    sub(element, "source", pool=pool, volume=volume)
    sub(element, "target", dev=dev, bus=bus or "virtio")
    sub(element, "alias", name=f"ua-{disk_name}")
    return element


def nic_element(nic: NicSpec) -> ET.Element:
    element = ET.Element("interface", {"type": "network"})
    sub(element, "mac", address=nic.mac or "")
    sub(element, "source", network=nic.network)
    sub(element, "model", type=nic.model or "virtio")
    return element


def seed_element(pool: str, volume: str, dev: str) -> ET.Element:
    element = ET.Element("disk", {"type": "volume", "device": "disk"})
    sub(element, "driver", name="qemu", type="raw")
    sub(element, "source", pool=pool, volume=volume)
    sub(element, "target", dev=dev, bus="virtio")
    sub(element, "readonly")
    sub(element, "alias", name=SEED_ALIAS)
    return element


def free_dev(root: ET.Element, bus: str) -> str:
    """The first target device name on BUS that no disk of ROOT uses."""
    prefix = _TARGET_PREFIX.get(bus, "vd")
    used = {t.get("dev") for t in root.findall("./devices/disk/target")}
    for i in range(26):
        dev = f"{prefix}{chr(ord('a') + i)}" if prefix != "nvme" else f"nvme0n{i + 1}"
        if dev not in used:
            return dev
    raise EndpointError("libvirt", f"no free {bus} disk target left")


def metadata(root: ET.Element, owner: Optional[str] = None, uuid: Optional[str] = None) -> ET.Element:
    """Our <metadata> element, created when missing. Only a guest this collection creates is marked as
    OWNER's, and the mark names its UUID (a copy of the XML under a new uuid owns nothing): editing a guest
    made elsewhere must never make `exclusive` remove it later."""
    container = root.find("metadata")
    if container is None:
        container = ET.Element("metadata")
        root.insert(3, container)
    meta = container.find(ns("guest"))
    if meta is None:
        meta = sub(container, ns("guest"), owner=owner, uuid=uuid if owner else None)
    return meta


def without_namespace(meta: ET.Element) -> str:
    """META as setMetadata takes it: libvirt puts the element into its namespace itself."""
    plain = copy.deepcopy(meta)
    for element in plain.iter():
        element.tag = element.tag.rsplit("}", 1)[-1]
    return to_xml(plain)


def set_tags(meta: ET.Element, tags: Dict[str, str]) -> None:
    for tag in meta.findall(ns("tag")):
        meta.remove(tag)
    for key in sorted(tags):
        sub(meta, ns("tag"), tags[key], name=key)


def set_digest(meta: ET.Element, digest: str) -> None:
    for seed in meta.findall(ns("cloud-init")):
        meta.remove(seed)
    sub(meta, ns("cloud-init"), digest=digest)


def domain_xml(spec: GuestSpec, domain_type: str, owner: str, reused: Set[str], volumes: Dict[str, str],
               seed: Optional[Tuple[str, str]], host_cpus: Optional[int], serial_log: bool) -> ET.Element:
    """A new domain: defined before any of its storage exists, its metadata already lists the volumes it is
    about to get (VOLUMES: disk name -> volume name; SEED: (pool, volume) of the cloud-init seed), so a run
    stopped in between leaves a guest that knows them. The seed's digest is not in it: it is recorded once the
    seed is written."""
    root = ET.Element("domain", {"type": domain_type})
    sub(root, "name", spec.name)
    sub(root, "uuid", spec.uuid)
    meta = metadata(root, owner=owner, uuid=spec.uuid)
    set_tags(meta, spec.tags or {})
    for disk in spec.disks or []:
        # A reused volume (kept from an earlier guest of this name) is not recorded as created here, so
        # remove_storage never deletes storage this run did not make.
        sub(meta, ns("disk"), name=disk.name, created="no" if disk.name in reused else "yes", source=disk.source)
    memory_kib = str((spec.memory_mib or 1024) * 1024)
    sub(root, "memory", memory_kib, unit="KiB")
    sub(root, "currentMemory", memory_kib, unit="KiB")
    vcpus = spec.vcpus or 1
    # Room to hot-add vCPUs up to the host's count (libvirt/QEMU plug them live); memory has no such headroom
    # (a larger <memory> would be what the guest sees without a balloon driver).
    sub(root, "vcpu", str(max(vcpus, host_cpus or vcpus)), placement="static", current=str(vcpus))
    os_el = sub(root, "os", firmware="efi" if spec.firmware == "uefi" else None)
    sub(os_el, "type", "hvm", arch="x86_64", machine="pc")
    if spec.boot is not None:
        sub(os_el, "kernel", spec.boot.kernel)
        if spec.boot.initrd:
            sub(os_el, "initrd", spec.boot.initrd)
        if spec.boot.cmdline:
            sub(os_el, "cmdline", spec.boot.cmdline)
    else:
        sub(os_el, "boot", dev="hd")
    features = sub(root, "features")
    sub(features, "acpi")
    sub(features, "apic")
    sub(root, "clock", offset="utc")
    sub(root, "on_poweroff", "destroy")
    sub(root, "on_reboot", "restart")
    sub(root, "on_crash", "destroy")
    devices = sub(root, "devices")
    for disk in spec.disks or []:
        devices.append(disk_element(disk.name, disk.format, disk.pool or "", volumes[disk.name],
                                    free_dev(root, disk.bus or "virtio"), disk.bus))
    if seed is not None:
        devices.append(seed_element(seed[0], seed[1], free_dev(root, "virtio")))
    for nic in spec.nics or []:
        devices.append(nic_element(nic))
    serial = sub(devices, "serial", type="pty")
    if serial_log:
        # The serial console is also kept in a file on the hypervisor (what the boot test reads).
        sub(serial, "log", file=f"/var/log/libvirt/qemu/{spec.name}-serial.log", append="off")
    sub(devices, "console", type="pty")
    return root


def build_seed_iso(cloud_init: CloudInit) -> bytes:
    """A NoCloud seed: an ISO9660 (+Joliet, +Rock Ridge) volume labelled 'cidata' with user-data,
    meta-data and (when given) network-config, built in memory with pycdlib."""
    try:
        import pycdlib
    except ImportError:
        raise MissingLibraryError("pycdlib", "cloud_init on libvirt (the NoCloud seed ISO)") from None
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    files = [("user-data", cloud_init.user_data or "#cloud-config\n{}\n"), ("meta-data", cloud_init.meta_data or "")]
    if cloud_init.network_config is not None:
        files.append(("network-config", cloud_init.network_config))
    for name, text in files:
        data = text.encode("utf-8")
        iso_name = "/" + name.replace("-", "_").upper()[:8] + ".;1"
        iso.add_fp(io.BytesIO(data), len(data), iso_name, rr_name=name, joliet_path="/" + name)
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()
