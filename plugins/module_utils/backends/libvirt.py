# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""libvirt backend: one connection, listAllDomains + getAllDomainStats, one XMLDesc per domain.

Only this module (and the other backends) import a hypervisor library.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
import socket
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from typing import Any, Callable, Dict, List, Optional, Set, Tuple
from urllib.parse import urlsplit

from .._changes import Change, GuestPlan
from .._endpoints import Endpoint
from .._errors import ConfigError, EndpointError, MissingLibraryError, one_line
from .._model import (
    OWNER_TAG,
    BootSpec,
    CloudInit,
    Cpu,
    Discovery,
    DiskSpec,
    GuestDisk,
    GuestFacts,
    GuestNic,
    GuestSpec,
    GuestState,
    Hardware,
    HostCapacity,
    HypervisorFacts,
    Identity,
    NicSpec,
    Placement,
    Storage,
    count_guests,
    gib,
    mib,
)
from .base import GuestBackend

try:
    import libvirt

    HAS_LIBVIRT = True
except ImportError:  # pragma: no cover - depends on the environment
    libvirt = None
    HAS_LIBVIRT = False

# Our own XML namespace for the small tag dict kept in a domain's <metadata>.
METADATA_NS = "https://virtfleet.dev/xmlns/guest/1"
# A separate element, set just before a restart stops a guest and cleared once it runs again: a stopped guest
# that still has it was left down by an interrupted restart (GuestState.interrupted_restart).
RESTART_NS = "https://virtfleet.dev/xmlns/restart/1"
ET.register_namespace("vf", METADATA_NS)
LIBOSINFO_NS = "http://libosinfo.org/xmlns/libvirt/domain/1.0"
TRANSPORT_PORTS = {"tcp": 16509, "tls": 16514, "ssh": 22, "libssh": 22, "libssh2": 22}

# virDomainState -> normalised power state
_POWER = {0: "unknown", 1: "running", 2: "running", 3: "paused", 4: "running", 5: "stopped", 6: "stopped",
          7: "suspended"}


def _version(number: int) -> str:
    """libvirt encodes versions as major * 1,000,000 + minor * 1,000 + micro."""
    return f"{number // 1000000}.{(number // 1000) % 1000}.{number % 1000}"


def _quiet(_ctx: Any, _err: Any) -> None:
    """libvirt prints every error to stderr by default; we raise them as exceptions instead."""


def _unit_bytes(unit: str) -> int:
    """Bytes per libvirt memory unit (libvirt writes KiB, but a user-defined XML may say otherwise)."""
    scale = {"b": 1, "bytes": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2, "mib": 1024**2,
             "mb": 1000**2, "g": 1024**3, "gib": 1024**3, "gb": 1000**3}
    return scale.get(unit.lower(), 1024)


# ====================================================================================== convergence
# A guest is described to libvirt with XML built element by element (ElementTree), never from a string
# template: user values can never inject XML. Persistent changes edit the domain's inactive XML in
# place (only the elements a change names), so everything the user configured by other means stays.

SEED_ALIAS = "ua-virtfleet-cidata"
_TARGET_PREFIX = {"virtio": "vd", "scsi": "sd", "sata": "sd", "ide": "hd", "nvme": "nvme"}
_VOL_EXT = {"qcow2": "qcow2", "raw": "img"}
_MISSING = -1.0  # a volume lookup that found no such volume (not: a volume that could not be read)


def _ns(tag: str) -> str:
    return f"{{{METADATA_NS}}}{tag}"


def _sub(parent: ET.Element, tag: str, text: Optional[str] = None, **attrs: Optional[str]) -> ET.Element:
    child = ET.SubElement(parent, tag, {k: v for k, v in attrs.items() if v is not None})
    if text is not None:
        child.text = text
    return child


def _xml(element: ET.Element) -> str:
    return ET.tostring(element, encoding="unicode")


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


class _Disk:
    """One <disk> of a domain as the convergence code sees it."""

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
class _DomainView:
    """One parse of a domain definition. Discovery facts (GuestFacts) and convergence state (GuestState) are
    both built from it, so that the two readers of a guest cannot disagree."""

    name: str
    uuid: Optional[str]
    power_state: str
    vcpus: int
    max_vcpus: int
    memory_mib: Optional[int]  # what the guest gets: <currentMemory>, else <memory>
    max_memory_mib: Optional[int]  # <memory>
    disks: List[_Disk]  # device='disk' only, the seed left out
    seed: Optional[_Disk]
    sizes: Dict[str, float]  # target dev -> GiB, from the bulk block stats (running guests)
    sources: Dict[str, str]  # disk name -> the image it was copied from at creation (our metadata)
    recorded: Dict[str, bool]  # disk name -> whether this collection created its volume (our metadata)
    nics: List[Tuple[Optional[str], Optional[str], Optional[str]]]
    tags: Dict[str, str]
    owner: Optional[str]  # our mark's owner, only when the mark names this domain's uuid
    digest: Optional[str]
    restart_marked: bool
    firmware: str
    boot: Optional[BootSpec]
    guest_os: Optional[str]


def _view(root: ET.Element, stats: Dict[str, Any]) -> _DomainView:
    meta = root.find(f"./metadata/{_ns('guest')}")
    uuid = root.findtext("uuid")
    owner = None
    sources: Dict[str, str] = {}
    recorded: Dict[str, bool] = {}
    digest = None
    if meta is not None:
        # A clone or a copy of this XML under a new uuid carries the mark but owns nothing, nor its disks.
        if meta.get("owner") and meta.get("uuid") == uuid:
            owner = meta.get("owner")
        for record in meta.findall(_ns("disk")):
            recorded[record.get("name", "")] = record.get("created") == "yes"
            if record.get("source"):
                sources[record.get("name", "")] = record.get("source", "")
        seed_el = meta.find(_ns("cloud-init"))
        digest = seed_el.get("digest") if seed_el is not None else None
    sizes = {}
    for i in range(int(stats.get("block.count", 0))):
        if f"block.{i}.name" in stats and f"block.{i}.capacity" in stats:
            sizes[stats[f"block.{i}.name"]] = gib(stats[f"block.{i}.capacity"]) or 0.0
    disks, seed = [], None
    for element in root.findall("./devices/disk"):
        if element.get("device", "disk") != "disk":
            continue
        disk = _Disk(element)
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
    max_memory = _mib_of(root.find("memory"))
    libosinfo = root.find(f"./metadata/{{{LIBOSINFO_NS}}}libosinfo/{{{LIBOSINFO_NS}}}os")
    return _DomainView(
        name=root.findtext("name") or "",
        uuid=uuid,
        power_state=_POWER.get(int(stats.get("state.state", 0)), "unknown"),
        vcpus=int(vcpu.get("current") or max_vcpus) if vcpu is not None else 1,
        max_vcpus=max_vcpus,
        memory_mib=_mib_of(root.find("currentMemory")) or max_memory,
        max_memory_mib=max_memory,
        disks=disks,
        seed=seed,
        sizes=sizes,
        sources=sources,
        recorded=recorded if owner else {},
        nics=_interfaces(root),
        tags=_tags(meta),
        owner=owner,
        digest=digest,
        restart_marked=root.find(f"./metadata/{{{RESTART_NS}}}restart") is not None,
        firmware=_firmware_of(os_el),
        boot=boot,
        guest_os=libosinfo.get("id") if libosinfo is not None else None,
    )


class LibvirtGuests:
    """The convergence half of the libvirt backend; LibvirtBackend mixes it in."""

    endpoint: Endpoint
    timeout: float
    calls: int

    def connect(self) -> Any:  # provided by LibvirtBackend
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def _call(self, what: str, func: Any, *args: Any) -> Any:
        """One libvirt call; a libvirt error becomes EndpointError naming WHAT."""
        self.calls += 1
        try:
            return func(*args)
        except libvirt.libvirtError as exc:
            raise EndpointError(self.endpoint.label, f"{what}: {one_line(exc.get_error_message())}") from None

    def _pool(self, name: str) -> Any:
        return self._call(f"storage pool {name!r}", self.connect().storagePoolLookupByName, name)

    # ------------------------------------------------------------------ reads
    def capacity(self, placement: Placement) -> HostCapacity:
        conn = self.connect()
        info = self._call("host info", conn.getInfo)
        networks = [n.name() for n in self._call("networks", conn.listAllNetworks, 0)]
        pools = [p.name() for p in self._call("storage pools", conn.listAllStoragePools, 0)]
        default_pool = placement.pool or ("default" if "default" in pools else (sorted(pools)[0] if pools else None))
        self._capacity = HostCapacity(vcpus=info[2], memory_mib=info[1], networks=sorted(networks),
                                      pools=sorted(pools), default_pool=default_pool)
        return self._capacity

    def read_guests(self, placement: Placement) -> List[GuestState]:
        conn = self.connect()
        flags = libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_BLOCK
        stats = self._call("domain stats", conn.getAllDomainStats, flags, 0)
        autostarting = self._call("domains", conn.listAllDomains, libvirt.VIR_CONNECT_LIST_DOMAINS_AUTOSTART)
        autostart = {d.UUIDString() for d in autostarting}
        volumes: Dict[Tuple[str, str, str], Optional[float]] = {}
        states, macs = [], {}
        self._in_use: Dict[Tuple[str, str], str] = {}
        for dom, values in stats:
            try:
                self.calls += 1
                xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            except libvirt.libvirtError:
                continue  # undefined meanwhile
            root = ET.fromstring(xml)  # noqa: S314
            state = self._state(dom, root, values, autostart, volumes)
            if state.power_state in ("running", "paused", "suspended"):
                # What a restart would change: compare the persistent definition with the running one.
                live = ET.fromstring(self._call("live definition", dom.XMLDesc, 0))  # noqa: S314
                wanted, running = _restart_view(root), _restart_view(live)
                state.pending_restart = sorted(k for k in wanted if wanted[k] != running[k])
            states.append(state)
            for element in root.findall("./devices/disk/source"):
                if element.get("pool") and element.get("volume"):
                    self._in_use[(element.get("pool", ""), element.get("volume", ""))] = state.spec.name
            for nic in state.spec.nics or []:
                if nic.mac:
                    macs[nic.mac] = state.spec.name
        if getattr(self, "_capacity", None) is not None:
            self._capacity.macs = macs
        return sorted(states, key=lambda s: s.spec.name)

    def _disk_volume(self, disk: _Disk) -> Any:
        """The storage volume behind a disk (by pool and volume name, else by path); raises libvirtError."""
        conn = self.connect()
        self.calls += 2
        if disk.pool and disk.volume:
            return conn.storagePoolLookupByName(disk.pool).storageVolLookupByName(disk.volume)
        return conn.storageVolLookupByPath(disk.path)

    def _volume_gib(self, disk: _Disk, cache: Dict[Tuple[str, str, str], Optional[float]]) -> Optional[float]:
        """The volume's size, None when it cannot be read, _MISSING when its pool says it has no such volume."""
        if disk.where not in cache:
            try:
                cache[disk.where] = gib(self._disk_volume(disk).info()[1])
            except libvirt.libvirtError as exc:
                missing = bool(disk.pool and disk.volume) and exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL
                cache[disk.where] = _MISSING if missing else None
        return cache[disk.where]

    def _state(self, dom: Any, root: ET.Element, stats: Dict[str, Any], autostart: set,
               volumes: Dict[Tuple[str, str, str], Optional[float]]) -> GuestState:
        view = _view(root, stats)
        disks = []
        for disk in view.disks:
            size = view.sizes.get(disk.dev)
            if size is None:
                size = self._volume_gib(disk, volumes)
            if size == _MISSING:
                if disk.name in view.recorded:
                    # Our guest names a volume it never got (a run stopped between the define and creating it):
                    # reported as missing, so the next run creates it for the definition that already names it.
                    continue
                size = None
            disks.append(DiskSpec(name=disk.name, size_gib=size, pool=disk.pool, format=disk.format,
                                  source=view.sources.get(disk.name), bus=disk.bus))
        spec = GuestSpec(
            name=view.name,
            uuid=view.uuid,
            vcpus=view.vcpus,
            memory_mib=view.memory_mib,
            firmware=view.firmware,
            disks=disks,
            nics=[NicSpec(network=network or "", mac=mac, model=model) for mac, network, model in view.nics],
            # The digest is recorded only once the seed is written, so a seed cut short is written again.
            cloud_init=CloudInit(stored_digest=view.digest) if view.digest else None,
            boot=view.boot,
            autostart=view.uuid in autostart,
            tags=view.tags,
        )
        return GuestState(spec=spec, power_state=view.power_state, owner=view.owner,
                          created_disks=[name for name, created in view.recorded.items() if created],
                          max_vcpus=view.max_vcpus, max_memory_mib=view.max_memory_mib,
                          interrupted_restart=view.restart_marked and view.power_state == "stopped", ref=dom)

    def leftover_disks(self, specs: List[GuestSpec], placement: Placement) -> Dict[Tuple[str, str], float]:
        """Volumes named like a disk of these guests already in their pools: one listing per pool."""
        default = placement.pool or (getattr(self, "_capacity", None) or HostCapacity()).default_pool
        wanted: Dict[Tuple[str, str], Tuple[str, str]] = {}
        for spec in specs:
            for disk in spec.disks or []:
                pool = disk.pool or default
                if pool:
                    full = DiskSpec(name=disk.name, format=disk.format or "qcow2")
                    wanted[(pool, self._volume_name(spec.name, full))] = (spec.name, disk.name)
        found: Dict[Tuple[str, str], float] = {}
        for pool_name in sorted({pool for pool, _vol in wanted}):
            try:
                pool = self.connect().storagePoolLookupByName(pool_name)
                names = set(pool.listVolumes())
                self.calls += 2
            except libvirt.libvirtError:
                continue  # an unknown pool is the planner's to report
            for (where, volume), key in wanted.items():
                if where != pool_name or volume not in names:
                    continue
                holder = getattr(self, "_in_use", {}).get((where, volume))
                if holder is not None and holder != key[0]:
                    problem = f"its volume {volume!r} in pool {where!r} is in use by guest {holder!r}"
                    raise ConfigError(f"guest {key[0]!r} disks", key[1], problem)
                if holder is None:
                    vol = self._call("volume", pool.storageVolLookupByName, volume)
                    found[key] = gib(self._call("volume info", vol.info)[1]) or 0.0
        return found

    # ------------------------------------------------------------------ verify
    def verify_spec(self, spec: GuestSpec) -> None:
        for i, disk in enumerate(spec.disks or []):
            # Disk names (reserved ones, device names, what round-trips through an alias) are _model's to check.
            if disk.format is not None and disk.format not in _VOL_EXT:
                raise ConfigError(f"guest {spec.name!r} disks[{i}].format", disk.format,
                                  "libvirt volumes are qcow2 or raw")
        for i, nic in enumerate(spec.nics or []):
            if nic.model in ("vmxnet3", "pcnet32"):
                raise ConfigError(f"guest {spec.name!r} nics[{i}].model", nic.model,
                                  "a VMware NIC model; use virtio, e1000, e1000e or rtl8139 on libvirt")
        buses, uefi = self._domain_caps()
        for i, disk in enumerate(spec.disks or []):
            if disk.bus is not None and buses and disk.bus not in buses:
                raise ConfigError(f"guest {spec.name!r} disks[{i}].bus", disk.bus,
                                  f"this libvirt host cannot attach {disk.bus} disks (it offers "
                                  f"{', '.join(sorted(buses))})")
        if spec.firmware == "uefi" and uefi is False:
            raise ConfigError(f"guest {spec.name!r} firmware", spec.firmware,
                              "this libvirt host offers no UEFI firmware (no efi loader in its domain capabilities)")

    _domcaps: Optional[Tuple[Set[str], Optional[bool]]] = None

    def _domain_caps(self) -> Tuple[Set[str], Optional[bool]]:
        """(disk buses, whether UEFI firmware is there) from the host's domain capabilities for the machine type
        guests are created with; read once per backend. Empty/None when the host cannot say (nothing refused)."""
        if self._domcaps is None:
            self._domcaps = (set(), None)
            try:
                self.calls += 1
                caps = ET.fromstring(self.connect().getDomainCapabilities(None, "x86_64", "pc", None, 0))  # noqa: S314
            except (libvirt.libvirtError, ET.ParseError):
                return self._domcaps
            buses = {v.text or "" for v in caps.findall("./devices/disk/enum[@name='bus']/value")}
            efi = caps.findall("./os/enum[@name='firmware']/value[.='efi']") or caps.findall("./os/loader/value")
            self._domcaps = (buses - {"fdc", "usb"}, bool(efi))
        return self._domcaps

    # ------------------------------------------------------------------ XML pieces
    def _domain_type(self, placement: Placement) -> str:
        if placement.domain_type:
            return placement.domain_type
        caps = ET.fromstring(self._call("capabilities", self.connect().getCapabilities))  # noqa: S314
        return "kvm" if caps.findall("./guest/arch/domain[@type='kvm']") else "qemu"

    @staticmethod
    def _volume_name(guest: str, disk: DiskSpec) -> str:
        # '+' cannot occur in guest or disk names, so no two (guest, disk) pairs share a volume name.
        return f"{guest}+{disk.name}.{_VOL_EXT.get(disk.format or 'qcow2', 'img')}"

    @staticmethod
    def _disk_element(guest: str, disk: DiskSpec, dev: str) -> ET.Element:
        element = ET.Element("disk", {"type": "volume", "device": "disk"})
        _sub(element, "driver", name="qemu", type=disk.format or "qcow2")
        _sub(element, "source", pool=disk.pool or "", volume=LibvirtGuests._volume_name(guest, disk))
        _sub(element, "target", dev=dev, bus=disk.bus or "virtio")
        _sub(element, "alias", name=f"ua-{disk.name}")
        return element

    @staticmethod
    def _nic_element(nic: NicSpec) -> ET.Element:
        element = ET.Element("interface", {"type": "network"})
        _sub(element, "mac", address=nic.mac or "")
        _sub(element, "source", network=nic.network)
        _sub(element, "model", type=nic.model or "virtio")
        return element

    @staticmethod
    def _seed_element(pool: str, guest: str, dev: str) -> ET.Element:
        element = ET.Element("disk", {"type": "volume", "device": "disk"})
        _sub(element, "driver", name="qemu", type="raw")
        _sub(element, "source", pool=pool, volume=f"{guest}+cidata.iso")
        _sub(element, "target", dev=dev, bus="virtio")
        _sub(element, "readonly")
        _sub(element, "alias", name=SEED_ALIAS)
        return element

    @staticmethod
    def _free_dev(root: ET.Element, bus: str) -> str:
        prefix = _TARGET_PREFIX.get(bus, "vd")
        used = {t.get("dev") for t in root.findall("./devices/disk/target")}
        for i in range(26):
            dev = f"{prefix}{chr(ord('a') + i)}" if prefix != "nvme" else f"nvme0n{i + 1}"
            if dev not in used:
                return dev
        raise EndpointError("libvirt", f"no free {bus} disk target left")

    @staticmethod
    def _metadata(root: ET.Element, owner: Optional[str] = None, uuid: Optional[str] = None) -> ET.Element:
        """Our <metadata> element, created when missing. Only a guest this collection creates is marked as
        OWNER's, and the mark names its UUID (a copy of the XML under a new uuid owns nothing): editing a guest
        made elsewhere must never make `exclusive` remove it later."""
        metadata = root.find("metadata")
        if metadata is None:
            metadata = ET.Element("metadata")
            root.insert(3, metadata)
        meta = metadata.find(_ns("guest"))
        if meta is None:
            meta = _sub(metadata, _ns("guest"), owner=owner, uuid=uuid if owner else None)
        return meta

    def _put_metadata(self, dom: Any, name: str, meta: Optional[ET.Element], running: bool,
                      uri: str = METADATA_NS) -> None:
        """Write (or, when META is None, remove) one of our metadata elements without re-defining the domain:
        a re-define from a copy would be a chance to lose what that copy lacks. libvirt puts the element into
        URI's namespace itself, so it is sent without one."""
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if running else 0)
        text = None
        if meta is not None:
            plain = copy.deepcopy(meta)
            for element in plain.iter():
                element.tag = element.tag.rsplit("}", 1)[-1]
            text = _xml(plain)
        key = "vf" if uri == METADATA_NS else "vfr"
        self._call(f"guest {name!r}: metadata", dom.setMetadata, libvirt.VIR_DOMAIN_METADATA_ELEMENT, text,
                   key if text is not None else None, uri, flags)

    @staticmethod
    def _set_tags(meta: ET.Element, tags: Dict[str, str]) -> None:
        for tag in meta.findall(_ns("tag")):
            meta.remove(tag)
        for key in sorted(tags):
            _sub(meta, _ns("tag"), tags[key], name=key)

    @staticmethod
    def _set_digest(meta: ET.Element, digest: str) -> None:
        for seed in meta.findall(_ns("cloud-init")):
            meta.remove(seed)
        _sub(meta, _ns("cloud-init"), digest=digest)

    def _domain_xml(self, spec: GuestSpec, domain_type: str, reused: Set[str], owner: str) -> ET.Element:
        """The new domain: defined before any of its storage exists, its metadata already lists the volumes it
        is about to get (a run stopped in between leaves a guest that knows them). The seed's digest is not in
        it: it is recorded once the seed is written."""
        root = ET.Element("domain", {"type": domain_type})
        _sub(root, "name", spec.name)
        _sub(root, "uuid", spec.uuid)
        meta = self._metadata(root, owner=owner, uuid=spec.uuid)
        self._set_tags(meta, spec.tags or {})
        for disk in spec.disks or []:
            # A reused volume (kept from an earlier guest of this name) is not recorded as created here, so
            # remove_storage never deletes storage this run did not make.
            _sub(meta, _ns("disk"), name=disk.name, created="no" if disk.name in reused else "yes",
                 source=disk.source)
        memory_kib = str((spec.memory_mib or 1024) * 1024)
        _sub(root, "memory", memory_kib, unit="KiB")
        _sub(root, "currentMemory", memory_kib, unit="KiB")
        vcpus = spec.vcpus or 1
        # Room to hot-add vCPUs up to the host's count (libvirt/QEMU plug them live); memory has no
        # such headroom (a larger <memory> would be what the guest sees without a balloon driver).
        capacity: Optional[HostCapacity] = getattr(self, "_capacity", None)
        host_cpus = capacity.vcpus if capacity is not None else None
        _sub(root, "vcpu", str(max(vcpus, host_cpus or vcpus)), placement="static", current=str(vcpus))
        os_el = _sub(root, "os", firmware="efi" if spec.firmware == "uefi" else None)
        _sub(os_el, "type", "hvm", arch="x86_64", machine="pc")
        if spec.boot is not None:
            _sub(os_el, "kernel", spec.boot.kernel)
            if spec.boot.initrd:
                _sub(os_el, "initrd", spec.boot.initrd)
            if spec.boot.cmdline:
                _sub(os_el, "cmdline", spec.boot.cmdline)
        else:
            _sub(os_el, "boot", dev="hd")
        features = _sub(root, "features")
        _sub(features, "acpi")
        _sub(features, "apic")
        _sub(root, "clock", offset="utc")
        _sub(root, "on_poweroff", "destroy")
        _sub(root, "on_reboot", "restart")
        _sub(root, "on_crash", "destroy")
        devices = _sub(root, "devices")
        for disk in spec.disks or []:
            devices.append(self._disk_element(spec.name, disk, self._free_dev(root, disk.bus or "virtio")))
        if spec.cloud_init is not None:
            devices.append(self._seed_element(self._seed_pool(spec), spec.name, self._free_dev(root, "virtio")))
        for nic in spec.nics or []:
            devices.append(self._nic_element(nic))
        serial = _sub(devices, "serial", type="pty")
        if urlsplit(self.endpoint.uri).path.rstrip("/") == "/system":
            # The serial console is also kept in a file on the hypervisor (what the boot test reads).
            _sub(serial, "log", file=f"/var/log/libvirt/qemu/{spec.name}-serial.log", append="off")
        _sub(devices, "console", type="pty")
        return root

    def _seed_pool(self, spec: GuestSpec) -> str:
        for disk in spec.disks or []:
            if disk.pool:
                return disk.pool
        capacity = getattr(self, "_capacity", None)
        if capacity is None or not capacity.default_pool:
            raise EndpointError(self.endpoint.label, f"guest {spec.name!r}: no storage pool for the cloud-init seed")
        return str(capacity.default_pool)

    # ------------------------------------------------------------------ volumes
    def _existing_volume(self, pool_name: str, volume: str) -> Optional[Any]:
        pool = self._pool(pool_name)
        try:
            self.calls += 1
            return pool.storageVolLookupByName(volume)
        except libvirt.libvirtError:
            return None

    def _make_volume(self, guest: str, disk: DiskSpec, pool_name: str, volume: str,
                     kept: Optional[Any]) -> Tuple[Any, bool]:
        """Grow KEPT (a volume kept from an earlier guest of this name) to the disk's size, or create VOLUME
        (cloned from DISK.source when set). Returns (volume, whether this call created it). Create-exclusive:
        a volume of that name that appeared meanwhile was made by another run; it is an error, not ours."""
        pool = self._pool(pool_name)
        size = int((disk.size_gib or 0) * 1024**3)
        if kept is not None:
            if size > self._call("volume info", kept.info)[1]:
                self._call("volume resize", kept.resize, size, 0)
            return kept, False
        vol_xml = ET.Element("volume")
        _sub(vol_xml, "name", volume)
        _sub(vol_xml, "capacity", str(size), unit="bytes")
        _sub(_sub(vol_xml, "target"), "format", type=disk.format or "qcow2")
        source = None
        if disk.source:
            conn = self.connect()
            source = (self._call(f"disk source {disk.source!r}", conn.storageVolLookupByPath, disk.source)
                      if disk.source.startswith("/") else
                      self._call(f"disk source {disk.source!r}", pool.storageVolLookupByName, disk.source))
        try:
            self.calls += 1
            vol = (pool.createXMLFrom(_xml(vol_xml), source, 0) if source is not None
                   else pool.createXML(_xml(vol_xml), 0))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_STORAGE_VOL_EXIST:
                raise EndpointError(self.endpoint.label, f"guest {guest!r} disk {disk.name!r}: volume {volume!r} "
                                                         "was created meanwhile by another run") from None
            what = f"clone of {disk.source!r}" if source is not None else f"volume {volume!r}"
            raise EndpointError(self.endpoint.label, f"{what}: {one_line(exc.get_error_message())}") from None
        if source is not None and size and self._call("volume info", vol.info)[1] < size:
            self._call("volume resize", vol.resize, size, 0)
        return vol, True

    def _grow_volume(self, disk: _Disk, size: int) -> None:
        vol = self._call(f"volume of disk {disk.name!r}", self._disk_volume, disk)
        self._call(f"grow disk {disk.name!r}", vol.resize, size, 0)

    def _write_seed(self, spec: GuestSpec, cloud_init: CloudInit, pool_name: Optional[str] = None,
                    name: Optional[str] = None) -> List[Any]:
        """Write the seed ISO to POOL_NAME/NAME (default: the guest's seed pool and name); returns the volume
        when this call created it. A volume only grows: ISO readers ignore bytes after the image."""
        data = build_seed_iso(cloud_init)
        pool = self._pool(pool_name or self._seed_pool(spec))
        name = name or f"{spec.name}+cidata.iso"
        created = []
        try:
            self.calls += 1
            vol = pool.storageVolLookupByName(name)
            if vol.info()[1] < len(data):
                self._call("seed resize", vol.resize, len(data), 0)
        except libvirt.libvirtError:
            vol_xml = ET.Element("volume")
            _sub(vol_xml, "name", name)
            _sub(vol_xml, "capacity", str(len(data)), unit="bytes")
            _sub(_sub(vol_xml, "target"), "format", type="raw")
            vol = self._call("seed volume", pool.createXML, _xml(vol_xml), 0)
            created.append(vol)
        stream = self.connect().newStream(0)
        self._call("seed upload", vol.upload, stream, 0, len(data), 0)
        self._call("seed upload", stream.send, data)
        self._call("seed upload", stream.finish)
        return created

    # ------------------------------------------------------------------ defining, checked
    def _check_stored(self, dom: Any, sent: ET.Element, name: str, undo: Callable[[], None]) -> None:
        """libvirt may store less than it was sent without failing: it drops a user alias that does not match
        ^ua-[A-Za-z0-9_-]+$, and the disk then reads back under its target name, which the next run would attach
        again. Compare every
        disk sent with what was stored; on a difference UNDO the define and say which disk."""
        stored = ET.fromstring(self._call(f"read guest {name!r} back", dom.XMLDesc,  # noqa: S314
                                          libvirt.VIR_DOMAIN_XML_INACTIVE))
        have = {(d.alias, d.where) for d in map(_Disk, stored.findall("./devices/disk"))}
        places = {where for _alias, where in have}
        for disk in map(_Disk, sent.findall("./devices/disk")):
            if (disk.alias, disk.where) in have:
                continue
            problem = (f"libvirt dropped its alias {disk.alias!r}" if disk.alias and disk.where in places
                       else "libvirt did not store it as sent")
            undo()
            raise EndpointError(self.endpoint.label, f"guest {name!r} disk {disk.name!r}: {problem}; the definition "
                                                     "was rolled back")

    def _define_new(self, spec: GuestSpec, root: ET.Element, user_uuid: bool) -> Any:
        """Define a new domain, never over another: libvirt refuses a second domain of that name under another
        uuid; a uuid the user gave is looked up first (a define under the same name and uuid would replace)."""
        conn = self.connect()
        name = spec.name
        meanwhile = f"guest {name!r} was created meanwhile by another run; nothing was changed (run again)"
        if user_uuid and self._lookup(conn.lookupByUUIDString, spec.uuid) is not None:
            raise EndpointError(self.endpoint.label, meanwhile)
        try:
            self.calls += 1
            dom = conn.defineXML(_xml(root))
        except libvirt.libvirtError as exc:
            if self._lookup(conn.lookupByName, name) is not None:
                raise EndpointError(self.endpoint.label, meanwhile) from None
            raise EndpointError(self.endpoint.label, f"define guest {name!r}: {one_line(exc.get_error_message())}") \
                from None
        self._check_stored(dom, root, name, undo=lambda: self._undo_create(dom, []))
        return dom

    def _lookup(self, func: Any, key: Optional[str]) -> Optional[Any]:
        try:
            self.calls += 1
            return func(key)
        except libvirt.libvirtError:
            return None

    @staticmethod
    def _undo_create(dom: Optional[Any], made: List[Any]) -> None:
        """Remove what one call made: the domain it defined (when DOM) and the volumes it created (never a kept
        one, nor one another run made). Best effort: the error that got us here is the one to report."""
        steps: List[Callable[[], Any]] = [functools.partial(vol.delete, 0) for vol in made]
        if dom is not None:
            steps.insert(0, functools.partial(dom.undefineFlags, libvirt.VIR_DOMAIN_UNDEFINE_NVRAM))
        for step in steps:
            try:
                step()
            except libvirt.libvirtError:
                pass

    # ------------------------------------------------------------------ mutators
    def create_guest(self, spec: GuestSpec, placement: Placement, owner: str = OWNER_TAG) -> GuestState:
        """Define first, with metadata that lists the volumes it is about to get, then make them: a run stopped
        at any point leaves a guest that knows its volumes (created ones stay removable, missing ones are made
        by the next run, a seed without its recorded digest is written again)."""
        user_uuid = spec.uuid is not None
        spec = dataclasses.replace(spec, uuid=spec.uuid or str(uuidlib.uuid4()))  # the mark must name it
        name = spec.name
        kept = {d.name: self._existing_volume(d.pool or "", self._volume_name(name, d)) for d in spec.disks or []}
        reused = {disk for disk, vol in kept.items() if vol is not None}
        root = self._domain_xml(spec, self._domain_type(placement), reused, owner)
        dom = self._define_new(spec, root, user_uuid)
        made: List[Any] = []
        try:
            for disk in spec.disks or []:
                vol, created = self._make_volume(name, disk, disk.pool or "", self._volume_name(name, disk),
                                                 kept[disk.name])
                if created:
                    made.append(vol)
            if spec.cloud_init is not None:
                made.extend(self._write_seed(spec, spec.cloud_init))
                meta = self._metadata(root)
                self._set_digest(meta, spec.cloud_init.digest())
                self._put_metadata(dom, name, meta, running=False)
            if spec.autostart:
                self._call("autostart", dom.setAutostart, 1)
        except Exception:
            self._undo_create(dom, made)
            raise
        return GuestState(spec=spec, power_state="stopped", owner=owner,
                          created_disks=[d.name for d in spec.disks or [] if d.name not in reused], ref=dom)

    def update_guest(self, current: GuestState, plan: GuestPlan) -> None:
        """Each change is applied by its own function (_APPLY, keyed by kind and attribute) to the persistent
        definition, read with its secrets (VIR_DOMAIN_XML_SECURE) so a re-define keeps console passwords. Then,
        in this order: define only if something beyond our metadata changed (else setMetadata), check what was
        stored, make the storage it names (undone with the define if that fails), write the seed and record its
        digest, then autostart and the running guest's changes."""
        dom = current.ref
        name = current.spec.name
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
        previous = self._call("read definition", dom.XMLDesc, flags)
        edit = _Edit(self, current, plan, ET.fromstring(previous))  # noqa: S314
        for change in plan.changes:
            if change.kind in ("power_state", "guest"):
                continue  # power is the caller's (start/stop/restart), never a definition change
            apply = _APPLY.get((change.kind, change.attr))
            if apply is None:
                raise EndpointError(self.endpoint.label, f"guest {name!r}: cannot apply {change.field} on libvirt")
            apply(edit, change)
        old_meta = ET.fromstring(previous).find(f"./metadata/{_ns('guest')}")  # noqa: S314

        def undo() -> None:
            if edit.redefine:
                self._call(f"restore guest {name!r}", self.connect().defineXML, previous)
            else:
                self._put_metadata(dom, name, old_meta, running=False)

        if edit.redefine:
            self._call(f"define guest {name!r}", self.connect().defineXML, _xml(edit.root))
            self._check_stored(dom, edit.root, name, undo)
        elif edit.meta_changed:
            self._put_metadata(dom, name, edit.meta, running=False)
        made: List[Any] = []
        try:
            for _what, func, args in edit.storage:
                vol, created = func(*args)
                if created:
                    made.append(vol)
        except Exception:
            undo()
            self._undo_create(None, made)
            raise
        if edit.seed is not None:
            cloud_init, pool, volume = edit.seed
            self._write_seed(edit.after, cloud_init, pool, volume)
            self._set_digest(edit.meta, cloud_init.digest())
            self._put_metadata(dom, name, edit.meta, running=edit.running)
        elif edit.meta_changed and edit.running:
            self._put_metadata(dom, name, edit.meta, running=True)  # discovery reads the running guest's copy
        for what, func, args in edit.then:
            self._call(f"guest {name!r}: {what}", func, *args)

    def _wait_state(self, dom: Any, wanted: Tuple[int, ...], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self._call("guest state", dom.state)[0] in wanted:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    def start_guest(self, current: GuestState) -> None:
        dom = current.ref
        state = self._call("guest state", dom.state)[0]
        if state == libvirt.VIR_DOMAIN_PAUSED:
            self._call(f"resume guest {current.spec.name!r}", dom.resume)
        elif state == libvirt.VIR_DOMAIN_PMSUSPENDED:
            self._call(f"wake guest {current.spec.name!r}", dom.pMWakeup, 0)
        elif state != libvirt.VIR_DOMAIN_RUNNING:
            self._call(f"start guest {current.spec.name!r}", dom.create)
        if current.interrupted_restart:  # the restart an earlier run began is complete now
            self._put_metadata(dom, current.spec.name, None, running=True, uri=RESTART_NS)

    def restart_guest(self, current: GuestState, timeout: float, force: bool,
                      plan: Optional[GuestPlan] = None) -> None:
        """Mark the guest (its persistent metadata, no re-define) before stopping it and clear the mark once it
        runs again: a run killed, or a start that failed, in between leaves a stopped guest with the mark, which
        the next run reads as interrupted_restart and starts. PLAN's offline changes are already in the
        persistent definition (update_guest), so there is nothing to apply in between."""
        mark = ET.Element("restart", {"by": OWNER_TAG})
        self._put_metadata(current.ref, current.spec.name, mark, running=False, uri=RESTART_NS)
        self.stop_guest(current, timeout, force)
        self.start_guest(dataclasses.replace(current, interrupted_restart=True))

    def stop_guest(self, current: GuestState, timeout: float, force: bool) -> None:
        dom = current.ref
        name = current.spec.name
        off = (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED)
        if self._call("guest state", dom.state)[0] in off:
            return
        try:
            self.calls += 1
            dom.shutdown()
        except libvirt.libvirtError:
            pass  # e.g. a paused guest cannot take ACPI; the wait below decides
        if self._wait_state(dom, off, timeout):
            return
        if not force:
            raise EndpointError(self.endpoint.label, f"guest {name!r} did not shut down within {timeout:g}s "
                                                     "(ACPI ignored?); set force: true to power it off")
        self._call(f"power off guest {name!r}", dom.destroy)

    def remove_guest(self, current: GuestState, remove_storage: bool) -> None:
        dom = current.ref
        name = current.spec.name
        root = ET.fromstring(self._call("read definition", dom.XMLDesc, libvirt.VIR_DOMAIN_XML_INACTIVE))  # noqa: S314
        if self._call("guest state", dom.state)[0] not in (libvirt.VIR_DOMAIN_SHUTOFF,):
            self._call(f"power off guest {name!r}", dom.destroy)
        flags = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                 | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        self._call(f"undefine guest {name!r}", dom.undefineFlags, flags)
        for element in root.findall("./devices/disk"):
            disk = _Disk(element)
            # The seed is generated from the guest's options, never user data: it goes with the guest.
            if not (disk.is_seed or (remove_storage and disk.name in current.created_disks)):
                continue
            try:
                self._disk_volume(disk).delete(0)
            except libvirt.libvirtError:
                continue  # already gone


# ====================================================================================== applying changes
# update_guest applies each planned change through _APPLY, keyed by (kind, attribute): one small function per
# attribute, each editing the persistent definition and queuing what has to happen once it is stored.


class _Edit:
    """One update_guest call: the persistent definition being edited, and what follows once it is stored."""

    def __init__(self, backend: LibvirtGuests, current: GuestState, plan: GuestPlan, root: ET.Element) -> None:
        self.backend = backend
        self.dom = current.ref
        self.name = current.spec.name
        self.plan = plan
        self.after = plan.after or current.spec
        self.root = root
        self.running = current.power_state in ("running", "paused", "suspended")  # QEMU holds the images open
        devices = root.find("devices")
        self.devices = devices if devices is not None else _sub(root, "devices")
        self.disks = {d.name: d for d in map(_Disk, root.findall("./devices/disk"))}
        self.redefine = False  # the definition changed beyond our metadata element: defineXML
        self.meta_changed = False  # only our metadata element changed: setMetadata
        self.storage: List[Tuple[str, Callable[..., Tuple[Any, bool]], Tuple[Any, ...]]] = []  # volumes to make
        self.seed: Optional[Tuple[CloudInit, Optional[str], Optional[str]]] = None  # (data, pool, volume)
        self.then: List[Tuple[str, Callable[..., Any], Tuple[Any, ...]]] = []  # autostart, the running guest

    @property
    def meta(self) -> ET.Element:
        return LibvirtGuests._metadata(self.root)

    def hot(self, change: Change) -> bool:
        return self.running and change.live

    def live(self, what: str, func: Callable[..., Any], *args: Any) -> None:
        """Queue a change of the running guest (after the define; libvirt's AFFECT_LIVE flag appended)."""
        self.then.append((f"{what} (live)", func, (*args, libvirt.VIR_DOMAIN_AFFECT_LIVE)))


def _apply_vcpus(edit: _Edit, change: Change) -> None:
    vcpu = edit.root.find("vcpu")
    if vcpu is None:
        vcpu = _sub(edit.root, "vcpu")
    if int(vcpu.text or 1) < change.after:
        vcpu.text = str(change.after)
    vcpu.set("current", str(change.after))
    edit.redefine = True
    if edit.hot(change):
        edit.live("vcpus", edit.dom.setVcpusFlags, change.after)


def _apply_memory(edit: _Edit, change: Change) -> None:
    kib = str(change.after * 1024)
    memory = edit.root.find("memory")
    if memory is None:
        memory = ET.Element("memory")
        edit.root.insert(2, memory)
    # <memory> is both the maximum and what a guest without a balloon driver gets: it follows the new value,
    # except while a running guest takes more within that maximum.
    if not edit.hot(change) or (_mib_of(memory) or 0) < change.after:
        memory.text, memory.attrib["unit"] = kib, "KiB"
    current_memory = edit.root.find("currentMemory")
    if current_memory is None:
        current_memory = ET.Element("currentMemory")
        edit.root.insert(list(edit.root).index(memory) + 1, current_memory)
    current_memory.text, current_memory.attrib["unit"] = kib, "KiB"
    edit.redefine = True
    if edit.hot(change):
        edit.live("memory", edit.dom.setMemoryFlags, change.after * 1024)


def _apply_firmware(edit: _Edit, change: Change) -> None:
    os_el = edit.root.find("os")
    if os_el is None:
        return
    if change.after == "uefi":
        os_el.set("firmware", "efi")
    else:
        os_el.attrib.pop("firmware", None)
        for loader in os_el.findall("loader") + os_el.findall("nvram"):
            os_el.remove(loader)
    edit.redefine = True


def _apply_boot(edit: _Edit, change: Change) -> None:
    os_el = edit.root.find("os")
    if os_el is None or change.key not in ("kernel", "initrd", "cmdline"):
        return
    element = os_el.find(change.key)
    if element is None:
        element = _sub(os_el, change.key)
    element.text = change.after
    for boot_dev in os_el.findall("boot"):
        os_el.remove(boot_dev)
    edit.redefine = True


def _apply_autostart(edit: _Edit, change: Change) -> None:
    edit.then.append(("autostart", edit.dom.setAutostart, (1 if change.after else 0,)))  # no re-define


def _apply_tags(edit: _Edit, change: Change) -> None:
    LibvirtGuests._set_tags(edit.meta, change.after)
    edit.meta_changed = True


def _apply_cloud_init(edit: _Edit, change: Change) -> None:
    cloud_init = edit.after.cloud_init or edit.plan.desired.cloud_init
    if cloud_init is None:
        return
    # The old digest goes until the new seed is written: a run stopped in between writes it again.
    for old in edit.meta.findall(_ns("cloud-init")):
        edit.meta.remove(old)
    edit.meta_changed = True
    seed = next((d for d in edit.disks.values() if d.is_seed), None)
    if seed is not None:
        edit.seed = (cloud_init, seed.pool, seed.volume)
        return
    pool = edit.backend._seed_pool(edit.after)
    edit.devices.append(LibvirtGuests._seed_element(pool, edit.name, LibvirtGuests._free_dev(edit.root, "virtio")))
    edit.redefine = True
    edit.seed = (cloud_init, pool, None)


def _add_disk(edit: _Edit, change: Change) -> None:
    disk = DiskSpec(**change.after)
    element = edit.disks[disk.name].element if disk.name in edit.disks else None
    if element is not None and edit.disks[disk.name].volume:
        # Our definition names this disk but its volume was never made (see _state): make it, define nothing.
        pool, volume = edit.disks[disk.name].pool or "", edit.disks[disk.name].volume or ""
    else:
        element = LibvirtGuests._disk_element(edit.name, disk, LibvirtGuests._free_dev(edit.root, disk.bus or "virtio"))
        edit.devices.append(element)
        edit.redefine = True
        pool, volume = disk.pool or "", LibvirtGuests._volume_name(edit.name, disk)
    kept = edit.backend._existing_volume(pool, volume)
    # Recorded before the volume is made, so that a run stopped in between leaves a guest that knows it.
    records = [r for r in edit.meta.findall(_ns("disk")) if r.get("name") == disk.name]
    record = records[0] if records else _sub(edit.meta, _ns("disk"), name=disk.name, source=disk.source)
    record.set("created", "no" if kept is not None else "yes")
    edit.meta_changed = True
    edit.storage.append((f"disk {disk.name!r}", edit.backend._make_volume, (edit.name, disk, pool, volume, kept)))
    if edit.hot(change):
        edit.live(f"attach disk {disk.name!r}", edit.dom.attachDeviceFlags, _xml(element))


def _grow_disk(edit: _Edit, change: Change) -> None:
    target = edit.disks[str(change.key)]
    size = int(change.after * 1024**3)
    if edit.running:  # QEMU resizes the image it has open
        edit.then.append((f"grow disk {target.name!r} (live)", edit.dom.blockResize,
                          (target.dev, size, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)))
    else:
        edit.then.append((f"grow disk {target.name!r}", edit.backend._grow_volume, (target, size)))


def _move_disk_bus(edit: _Edit, change: Change) -> None:
    disk = edit.disks[str(change.key)]
    target_el = disk.element.find("target")
    if not disk.alias.startswith("ua-"):
        # The disk was named by its target, which is about to change: give it an alias to keep its name.
        _sub(disk.element, "alias", name=f"ua-{disk.name}")
    if target_el is not None:
        target_el.set("bus", change.after)
        target_el.set("dev", LibvirtGuests._free_dev(edit.root, change.after))
        address = disk.element.find("address")
        if address is not None:
            disk.element.remove(address)
    edit.redefine = True


def _add_nic(edit: _Edit, change: Change) -> None:
    element = LibvirtGuests._nic_element(NicSpec(**change.after))
    edit.devices.append(element)
    edit.redefine = True
    if edit.hot(change):
        edit.live("attach NIC", edit.dom.attachDeviceFlags, _xml(element))


def _interface(edit: _Edit, key: Optional[str]) -> Optional[ET.Element]:
    """The <interface> a NIC change names: by MAC, or '#N' (the Nth) for a NIC without one."""
    interfaces = edit.root.findall("./devices/interface")
    if key and key.startswith("#"):
        index = int(key[1:])
        return interfaces[index] if index < len(interfaces) else None
    for iface in interfaces:
        mac_el = iface.find("mac")
        if mac_el is not None and mac_el.get("address", "").lower() == key:
            return iface
    return None


def _move_nic(edit: _Edit, change: Change) -> None:
    iface = _interface(edit, change.key)
    if iface is None:
        return
    iface.set("type", "network")
    for source in iface.findall("source"):
        iface.remove(source)
    iface.insert(1, ET.Element("source", {"network": change.after}))
    edit.redefine = True
    if edit.hot(change):
        edit.live("NIC network", edit.dom.updateDeviceFlags, _xml(iface))


def _set_nic_model(edit: _Edit, change: Change) -> None:
    iface = _interface(edit, change.key)
    if iface is None:
        return
    model = iface.find("model")
    if model is None:
        model = _sub(iface, "model")
    model.set("type", change.after)
    address = iface.find("address")
    if address is not None:
        iface.remove(address)
    edit.redefine = True


_APPLY: Dict[Tuple[str, Optional[str]], Callable[[_Edit, Change], None]] = {
    ("vcpus", None): _apply_vcpus,
    ("memory_mib", None): _apply_memory,
    ("firmware", None): _apply_firmware,
    ("boot", None): _apply_boot,
    ("autostart", None): _apply_autostart,
    ("tags", None): _apply_tags,
    ("cloud_init", None): _apply_cloud_init,
    ("disks", None): _add_disk,
    ("disks", "size_gib"): _grow_disk,
    ("disks", "bus"): _move_disk_bus,
    ("nics", None): _add_nic,
    ("nics", "network"): _move_nic,
    ("nics", "model"): _set_nic_model,
}


def _interfaces(root: ET.Element) -> List[Tuple[Optional[str], Optional[str], Optional[str]]]:
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


def _tags(meta: Optional[ET.Element]) -> Dict[str, str]:
    """The tag dict kept in our <metadata> element (named tags only)."""
    if meta is None:
        return {}
    return {tag.get("name", ""): tag.text or "" for tag in meta.findall(_ns("tag")) if tag.get("name")}


def _firmware_of(os_el: Optional[ET.Element]) -> str:
    if os_el is None:
        return "bios"
    loader = os_el.find("loader")
    if os_el.get("firmware") == "efi" or (loader is not None and loader.get("type") == "pflash"):
        return "uefi"
    return "bios"


def _restart_view(root: ET.Element) -> Dict[str, Any]:
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
        "memory_mib": _mib_of(root.find("memory")),
        "firmware": _firmware_of(os_el),
        "boot": tuple(os_el.findtext(k) for k in ("kernel", "initrd", "cmdline")) if os_el is not None else None,
        "disks": sorted(disks),
        "nics": sorted(nics),
    }


def _mib_of(element: Optional[ET.Element]) -> Optional[int]:
    if element is None or not element.text:
        return None
    return mib(int(element.text) * _unit_bytes(element.get("unit", "KiB")))


class LibvirtBackend(LibvirtGuests, GuestBackend):
    api = "libvirt"

    def __init__(self, endpoint: Endpoint, timeout: float = 10.0) -> None:
        super().__init__(endpoint, timeout)
        self._conn: Any = None

    # ------------------------------------------------------------------ connection
    def _reachable(self) -> None:
        """Fail fast with a clear reason when a remote libvirt cannot be reached within the timeout."""
        parts = urlsplit(self.endpoint.uri)
        transport = parts.scheme.split("+", 1)[1] if "+" in parts.scheme else ""
        if not parts.hostname or transport not in TRANSPORT_PORTS:
            return
        port = parts.port or TRANSPORT_PORTS[transport]
        try:
            with socket.create_connection((parts.hostname, port), timeout=self.timeout):
                pass
        except socket.timeout:
            raise EndpointError(self.endpoint.label, f"timed out after {self.timeout:g}s connecting to port {port}") \
                from None
        except OSError as exc:
            raise EndpointError(self.endpoint.label, f"cannot connect to port {port}: {exc.strerror or exc}") \
                from None

    def connect(self) -> Any:
        if self._conn is not None:
            return self._conn
        if not HAS_LIBVIRT:
            raise MissingLibraryError("libvirt-python", "libvirt endpoints")
        libvirt.registerErrorHandler(_quiet, None)
        self._reachable()
        remote = bool(self.endpoint.host)
        if remote:
            # libvirt has no per-call timeout; its keepalive closes a connection whose peer stopped answering,
            # which ends a blocked call. Keepalive needs libvirt's event loop: registered once per process
            # before the connection opens, and run by a daemon thread.
            import threading

            loop = libvirt.__dict__.setdefault("_virtfleet_event_loop", {"lock": threading.Lock(), "thread": None})
            with loop["lock"]:
                if loop["thread"] is None:
                    def _run() -> None:
                        while True:
                            try:
                                libvirt.virEventRunDefaultImpl()
                            except libvirt.libvirtError:
                                time.sleep(0.1)

                    libvirt.virEventRegisterDefaultImpl()
                    thread = threading.Thread(target=_run, name="virtfleet-libvirt-events", daemon=True)
                    thread.start()
                    loop["thread"] = thread
        creds = self.endpoint.credentials
        try:
            if creds.username or creds.password:
                def _answer(cred_list: List[List[Any]], _data: Any) -> int:
                    for cred in cred_list:
                        if cred[0] == libvirt.VIR_CRED_AUTHNAME:
                            cred[4] = creds.username
                        elif cred[0] == libvirt.VIR_CRED_PASSPHRASE:
                            cred[4] = creds.password
                    return 0

                auth = [[libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_PASSPHRASE], _answer, None]
                self._conn = libvirt.openAuth(self.endpoint.uri, auth, 0)
            else:
                self._conn = libvirt.open(self.endpoint.uri)
        except libvirt.libvirtError as exc:
            raise EndpointError(self.endpoint.label, f"libvirt: {one_line(exc.get_error_message())}") from None
        self.calls += 1
        if remote:
            # A ping after INTERVAL idle seconds, the connection closed after COUNT unanswered: about TIMEOUT.
            interval = max(1, int(-(-self.timeout // 3)))
            try:
                self._conn.setKeepAlive(interval, 2)
            except libvirt.libvirtError:  # a driver without keepalive (e.g. over a local socket): nothing to do
                pass
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001, S110 - closing a dead connection must not hide the real error
                pass
            self._conn = None

    # ------------------------------------------------------------------ identity and host facts
    def _capabilities(self) -> ET.Element:
        self.calls += 1
        return ET.fromstring(self.connect().getCapabilities())  # noqa: S314

    def identify(self) -> Identity:
        conn = self.connect()
        try:
            driver = conn.getType()
            hv_version = _version(conn.getVersion())
            caps = self._capabilities()
        except libvirt.libvirtError as exc:
            raise EndpointError(self.endpoint.label, f"libvirt: {one_line(exc.get_error_message())}") from None
        self.calls += 2
        return Identity(api="libvirt", type=self._hv_type(driver, caps), product=driver, version=hv_version,
                        build=None, vendor=None)

    @staticmethod
    def _hv_type(driver: str, caps: ET.Element) -> str:
        if driver.upper() == "QEMU":
            kvm = caps.findall("./guest/arch/domain[@type='kvm']")
            return "kvm" if kvm else "qemu"
        return driver.lower()

    def _hardware(self) -> Hardware:
        try:
            self.calls += 1
            root = ET.fromstring(self.connect().getSysinfo(0))  # noqa: S314
        except (libvirt.libvirtError, ET.ParseError):
            return Hardware()

        def entry(name: str) -> Optional[str]:
            value = root.findtext(f"./system/entry[@name='{name}']")
            return value.strip() if value and value.strip() else None

        return Hardware(vendor=entry("manufacturer"), model=entry("product"), serial=entry("serial"))

    def _storage(self) -> List[Storage]:
        out = []
        self.calls += 1
        for pool in self.connect().listAllStoragePools(0):
            self.calls += 2
            state, capacity, _alloc, available = pool.info()
            pool_type = ET.fromstring(pool.XMLDesc(0)).get("type")  # noqa: S314
            active = state == libvirt.VIR_STORAGE_POOL_RUNNING
            out.append(Storage(name=pool.name(), type=pool_type, capacity_gib=gib(capacity) if active else None,
                               free_gib=gib(available) if active else None))
        return sorted(out, key=lambda s: s.name)

    def _networks(self) -> Tuple[List[str], Dict[str, List[str]]]:
        """Network names, and MAC -> addresses from the DHCP leases of active networks (one call per network)."""
        names: List[str] = []
        leases: Dict[str, List[str]] = {}
        self.calls += 1
        for net in self.connect().listAllNetworks(0):
            names.append(net.name())
            if not net.isActive():
                continue
            try:
                self.calls += 1
                for lease in net.DHCPLeases():
                    leases.setdefault(lease["mac"].lower(), []).append(lease["ipaddr"])
            except libvirt.libvirtError:
                continue
        return sorted(names), leases

    # ------------------------------------------------------------------ guests
    def _guests(self, host_key: str, leases: Dict[str, List[str]]) -> List[GuestFacts]:
        conn = self.connect()
        self.calls += 1
        stats = conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_BLOCK, 0)
        guests = []
        for dom, values in stats:
            self.calls += 1
            try:
                xml = dom.XMLDesc(0)
            except libvirt.libvirtError:
                continue  # undefined between the two calls
            guests.append(self._guest(xml, values, host_key, leases))
        return sorted(guests, key=lambda g: g.name)

    @staticmethod
    def _guest(xml: str, stats: Dict[str, Any], host_key: str, leases: Dict[str, List[str]]) -> GuestFacts:
        # The same parse as convergence state (_state): disks named, sized and sourced the same way.
        view = _view(ET.fromstring(xml), stats)  # noqa: S314
        disks = [GuestDisk(name=d.name or "?", size_gib=view.sizes.get(d.dev), source=view.sources.get(d.name),
                           bus=d.bus) for d in view.disks]
        nics, addresses = [], []
        for mac, network, model in view.nics:
            nics.append(GuestNic(mac=mac, network=network, model=model))
            if mac:
                addresses.extend(leases.get(mac, []))
        return GuestFacts(
            name=view.name,
            uuid=view.uuid,
            power_state=view.power_state,
            vcpus=view.vcpus,
            memory_mib=view.memory_mib,
            guest_os=view.guest_os,
            ip_addresses=sorted(set(addresses)),
            disks=disks,
            nics=nics,
            tags=view.tags,
            host_key=host_key,
        )

    # ------------------------------------------------------------------ discovery
    def discover(self, guests: bool = True) -> Discovery:
        conn = self.connect()
        try:
            caps = self._capabilities()
            driver = conn.getType()
            hv_version = _version(conn.getVersion())
            lib_version = _version(conn.getLibVersion())
            hostname = conn.getHostname()
            model, memory_mib, _cpus, mhz, nodes, sockets, cores, threads = conn.getInfo()
            free = conn.getFreeMemory()
            self.calls += 6
            hv_type = self._hv_type(driver, caps)
            cpu_model = caps.findtext("./host/cpu/model")
            networks, leases = self._networks()
            host = HypervisorFacts(
                name=self.endpoint.host or hostname,
                type=hv_type,
                api="libvirt",
                endpoint=self.endpoint.uri,
                product=f"{driver} (libvirt {lib_version})",
                version=hv_version,
                build=lib_version,
                hardware=self._hardware(),
                cpu=Cpu(model=cpu_model or model, sockets=nodes * sockets, cores=nodes * sockets * cores,
                        threads=nodes * sockets * cores * threads, mhz=mhz or None),
                memory_mib=memory_mib,
                memory_free_mib=mib(free),
                storage=self._storage(),
                networks=networks,
                connection_state="connected",
                key=hostname,
            )
            guest_list = self._guests(host.key, leases) if guests else []
        except libvirt.libvirtError as exc:
            raise EndpointError(self.endpoint.label, f"libvirt: {one_line(exc.get_error_message())}") from None
        if guests:
            count_guests([host], guest_list)
        else:
            self.calls += 1
            host.guests.total = conn.numOfDomains() + conn.numOfDefinedDomains()
            host.guests.running = conn.numOfDomains()
            host.guests.stopped = conn.numOfDefinedDomains()
        identity = Identity(api="libvirt", type=hv_type, product=driver, version=hv_version)
        return Discovery(identity=identity, hypervisors=[host], guests=guest_list, calls=self.calls)
