# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""libvirt backend: one connection, listAllDomains + getAllDomainStats, one XMLDesc per domain.

Only this module (and the other backends) import a hypervisor library.
"""

from __future__ import annotations

import io
import socket
import time
import xml.etree.ElementTree as ET
from typing import Any, Dict, List, Optional, Set, Tuple
from urllib.parse import urlsplit

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
from .._plan import GuestPlan
from .base import GuestBackend

try:
    import libvirt

    HAS_LIBVIRT = True
except ImportError:  # pragma: no cover - depends on the environment
    libvirt = None
    HAS_LIBVIRT = False

# Our own XML namespace for the small tag dict kept in a domain's <metadata>.
METADATA_NS = "https://virtfleet.dev/xmlns/guest/1"
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
        volumes: Dict[Tuple[str, str], Optional[float]] = {}
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

    def _volume_gib(self, disk: _Disk, cache: Dict[Tuple[str, str], Optional[float]]) -> Optional[float]:
        key = (disk.pool or "", disk.volume or disk.path or "")
        if key not in cache:
            try:
                cache[key] = gib(self._disk_volume(disk).info()[1])
            except libvirt.libvirtError:
                cache[key] = None
        return cache[key]

    def _state(self, dom: Any, root: ET.Element, stats: Dict[str, Any], autostart: set,
               volumes: Dict[Tuple[str, str], Optional[float]]) -> GuestState:
        meta = root.find(f"./metadata/{_ns('guest')}")
        tags, created, sources, digest = _tags(meta), [], {}, None
        if meta is not None:
            for record in meta.findall(_ns("disk")):
                if record.get("created") == "yes":
                    created.append(record.get("name", ""))
                if record.get("source"):
                    sources[record.get("name", "")] = record.get("source")
            seed = meta.find(_ns("cloud-init"))
            digest = seed.get("digest") if seed is not None else None
        capacity = {}
        for i in range(int(stats.get("block.count", 0))):
            if f"block.{i}.capacity" in stats:
                capacity[stats.get(f"block.{i}.name")] = gib(stats[f"block.{i}.capacity"])
        disks = []
        for disk_el in root.findall("./devices/disk"):
            if disk_el.get("device", "disk") != "disk":
                continue
            disk = _Disk(disk_el)
            if disk.is_seed:
                continue
            size = capacity.get(disk.dev)
            if size is None:
                size = self._volume_gib(disk, volumes)
            disks.append(DiskSpec(name=disk.name, size_gib=size, pool=disk.pool, format=disk.format,
                                  source=sources.get(disk.name), bus=disk.bus))
        nics = [NicSpec(network=network or "", mac=mac, model=model) for mac, network, model in _interfaces(root)]
        os_el = root.find("os")
        firmware = _firmware_of(os_el)
        boot = None
        if os_el is not None:
            if os_el.findtext("kernel"):
                boot = BootSpec(kernel=os_el.findtext("kernel"), initrd=os_el.findtext("initrd"),
                                cmdline=os_el.findtext("cmdline"))
        vcpu = root.find("vcpu")
        max_vcpus = int(vcpu.text or 1) if vcpu is not None else 1
        vcpus = int(vcpu.get("current") or max_vcpus) if vcpu is not None else 1
        memory = root.find("memory")
        current_memory = root.find("currentMemory")
        max_memory = _mib_of(memory)
        uuid = root.findtext("uuid")
        spec = GuestSpec(
            name=root.findtext("name") or "",
            uuid=uuid,
            vcpus=vcpus,
            memory_mib=_mib_of(current_memory) or max_memory,
            firmware=firmware,
            disks=disks,
            nics=nics,
            cloud_init=CloudInit(stored_digest=digest) if digest else None,
            boot=boot,
            autostart=uuid in autostart,
            tags=tags,
        )
        return GuestState(spec=spec, power_state=_POWER.get(int(stats.get("state.state", 0)), "unknown"),
                          owned=meta is not None and meta.get("owner") == OWNER_TAG, created_disks=created,
                          max_vcpus=max_vcpus, max_memory_mib=max_memory, ref=dom)

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
            if disk.format is not None and disk.format not in _VOL_EXT:
                raise ConfigError(f"guest {spec.name!r} disks[{i}].format", disk.format,
                                  "libvirt volumes are qcow2 or raw")
        for i, nic in enumerate(spec.nics or []):
            if nic.model in ("vmxnet3", "pcnet32"):
                raise ConfigError(f"guest {spec.name!r} nics[{i}].model", nic.model,
                                  "a VMware NIC model; use virtio, e1000, e1000e or rtl8139 on libvirt")

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
    def _metadata(root: ET.Element, owner: bool = False) -> ET.Element:
        """Our <metadata> element, created when missing. Only a guest this collection creates is marked as
        its own (OWNER): editing a guest made elsewhere must never make `exclusive` remove it later."""
        metadata = root.find("metadata")
        if metadata is None:
            metadata = ET.Element("metadata")
            root.insert(3, metadata)
        meta = metadata.find(_ns("guest"))
        if meta is None:
            meta = _sub(metadata, _ns("guest"), owner=OWNER_TAG if owner else None)
        return meta

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

    def _domain_xml(self, spec: GuestSpec, domain_type: str, reused: Set[str]) -> ET.Element:
        root = ET.Element("domain", {"type": domain_type})
        _sub(root, "name", spec.name)
        if spec.uuid:
            _sub(root, "uuid", spec.uuid)
        meta = self._metadata(root, owner=True)
        self._set_tags(meta, spec.tags or {})
        for disk in spec.disks or []:
            # A reused volume (kept from an earlier guest of this name) is not recorded as created here, so
            # remove_storage never deletes storage this run did not make.
            _sub(meta, _ns("disk"), name=disk.name, created="no" if disk.name in reused else "yes",
                 source=disk.source)
        if spec.cloud_init is not None:
            self._set_digest(meta, spec.cloud_init.digest())
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
    def _create_volume(self, guest: str, disk: DiskSpec) -> Tuple[Any, bool]:
        """Create (or clone from DISK.source) the volume, or reuse (and grow) one kept from an earlier guest of
        this name or left by an interrupted run. Returns (volume, whether this call created it)."""
        pool = self._pool(disk.pool or "")
        name = self._volume_name(guest, disk)
        size = int((disk.size_gib or 0) * 1024**3)
        try:
            self.calls += 1
            kept = pool.storageVolLookupByName(name)
        except libvirt.libvirtError:
            kept = None
        if kept is not None:  # kept from an earlier guest of this name, or an interrupted run: reuse, grow
            if size > self._call("volume info", kept.info)[1]:
                self._call("volume resize", kept.resize, size, 0)
            return kept, False
        vol_xml = ET.Element("volume")
        _sub(vol_xml, "name", name)
        _sub(vol_xml, "capacity", str(size), unit="bytes")
        target = _sub(vol_xml, "target")
        _sub(target, "format", type=disk.format or "qcow2")
        if disk.source:
            conn = self.connect()
            source = (self._call(f"disk source {disk.source!r}", conn.storageVolLookupByPath, disk.source)
                      if disk.source.startswith("/") else
                      self._call(f"disk source {disk.source!r}", pool.storageVolLookupByName, disk.source))
            vol = self._call(f"clone of {disk.source!r}", pool.createXMLFrom, _xml(vol_xml), source, 0)
            if size and self._call("volume info", vol.info)[1] < size:
                self._call("volume resize", vol.resize, size, 0)
            return vol, True
        return self._call(f"volume {name!r}", pool.createXML, _xml(vol_xml), 0), True

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

    # ------------------------------------------------------------------ mutators
    def create_guest(self, spec: GuestSpec, placement: Placement) -> GuestState:
        made: List[Any] = []
        reused: Set[str] = set()
        dom = None
        try:
            for disk in spec.disks or []:
                vol, created = self._create_volume(spec.name, disk)
                if created:
                    made.append(vol)
                else:
                    reused.add(disk.name)
            if spec.cloud_init is not None:
                made.extend(self._write_seed(spec, spec.cloud_init))
            root = self._domain_xml(spec, self._domain_type(placement), reused)
            dom = self._call(f"define guest {spec.name!r}", self.connect().defineXML, _xml(root))
            if spec.autostart:
                self._call("autostart", dom.setAutostart, 1)
            return GuestState(spec=spec, power_state="stopped", owned=True, ref=dom)
        except Exception:
            # Nothing half-created: undefine what was defined, drop the volumes this call made (never a reused one).
            try:
                if dom is not None:
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            except libvirt.libvirtError:
                pass
            for vol in made:
                try:
                    vol.delete(0)
                except libvirt.libvirtError:
                    pass
            raise

    def update_guest(self, current: GuestState, plan: GuestPlan) -> None:
        dom = current.ref
        name = current.spec.name
        running = current.power_state in ("running", "paused", "suspended")  # QEMU holds the image open
        root = ET.fromstring(self._call("read definition", dom.XMLDesc, libvirt.VIR_DOMAIN_XML_INACTIVE))  # noqa: S314
        devices = root.find("devices")
        if devices is None:
            devices = _sub(root, "devices")
        after = plan.after or current.spec
        live: List[Tuple[str, Any, Tuple[Any, ...]]] = []  # (what, function, args) run after the define
        live_flag = libvirt.VIR_DOMAIN_AFFECT_LIVE
        disks = {d.name: d for d in map(_Disk, root.findall("./devices/disk"))}
        for change in plan.changes:
            field, value = change.field, change.after
            hot = running and change.live
            if field == "vcpus":
                vcpu = root.find("vcpu")
                if vcpu is None:
                    vcpu = _sub(root, "vcpu")
                if int(vcpu.text or 1) < value:
                    vcpu.text = str(value)
                vcpu.set("current", str(value))
                if hot:
                    live.append(("vcpus", dom.setVcpusFlags, (value, live_flag)))
            elif field == "memory_mib":
                kib = str(value * 1024)
                memory = root.find("memory")
                if memory is not None and (not change.live or (_mib_of(memory) or 0) < value):
                    # A guest without a balloon driver uses <memory>, so lowering only currentMemory would not
                    # lower what it gets after the restart.
                    memory.text, memory.attrib["unit"] = kib, "KiB"
                current_memory = root.find("currentMemory")
                if current_memory is None:
                    current_memory = ET.Element("currentMemory")
                    root.insert(list(root).index(memory) + 1 if memory is not None else 2, current_memory)
                current_memory.text, current_memory.attrib["unit"] = kib, "KiB"
                if hot:
                    live.append(("memory", dom.setMemoryFlags, (value * 1024, live_flag)))
            elif field == "firmware":
                os_el = root.find("os")
                if os_el is not None:
                    if value == "uefi":
                        os_el.set("firmware", "efi")
                    else:
                        os_el.attrib.pop("firmware", None)
                        for loader in os_el.findall("loader") + os_el.findall("nvram"):
                            os_el.remove(loader)
            elif field.startswith("boot."):
                os_el = root.find("os")
                key = field.split(".", 1)[1]
                if os_el is not None:
                    element = os_el.find(key)
                    if element is None:
                        element = _sub(os_el, key)
                    element.text = value
                    for boot_dev in os_el.findall("boot"):
                        os_el.remove(boot_dev)
            elif field == "autostart":
                self._call("autostart", dom.setAutostart, 1 if value else 0)
            elif field == "tags":
                self._set_tags(self._metadata(root), value)
                if hot:
                    meta = ET.Element(_ns("guest"), {"owner": OWNER_TAG} if current.owned else {})
                    self._set_tags(meta, value)
                    live.append(("tags", dom.setMetadata, (libvirt.VIR_DOMAIN_METADATA_ELEMENT, _xml(meta), "vf",
                                                           METADATA_NS, live_flag)))
            elif field == "cloud_init":
                cloud_init = after.cloud_init or plan.desired.cloud_init
                if cloud_init is not None:
                    seeds = [d for d in disks.values() if d.is_seed]
                    if seeds:
                        self._write_seed(after, cloud_init, seeds[0].pool, seeds[0].volume)
                    else:
                        self._write_seed(after, cloud_init)
                    self._set_digest(self._metadata(root), cloud_init.digest())
                    if not seeds:
                        devices.append(self._seed_element(self._seed_pool(after), name,
                                                          self._free_dev(root, "virtio")))
            elif field.startswith("disks[") and field.endswith("]"):
                disk = DiskSpec(**value)
                created = self._create_volume(name, disk)[1]
                element = self._disk_element(name, disk, self._free_dev(root, disk.bus or "virtio"))
                devices.append(element)
                _sub(self._metadata(root), _ns("disk"), name=disk.name, created="yes" if created else "no",
                     source=disk.source)
                if hot:
                    live.append((f"attach disk {disk.name!r}", dom.attachDeviceFlags, (_xml(element), live_flag)))
            elif field.startswith("disks[") and field.endswith("].size_gib"):
                disk_name = field[len("disks["):-len("].size_gib")]
                target = disks[disk_name]
                size = int(value * 1024**3)
                if running:  # QEMU resizes the image it has open
                    live.append((f"grow disk {disk_name!r}", dom.blockResize,
                                 (target.dev, size, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)))
                else:
                    vol = self._call(f"volume of disk {disk_name!r}", self._disk_volume, target)
                    self._call(f"grow disk {disk_name!r}", vol.resize, size, 0)
            elif field.startswith("disks[") and field.endswith("].bus"):
                disk_name = field[len("disks["):-len("].bus")]
                target_el = disks[disk_name].element.find("target")
                if not disks[disk_name].alias.startswith("ua-"):
                    # The disk was named by its target, which is about to change: give it an alias to keep its name.
                    _sub(disks[disk_name].element, "alias", name=f"ua-{disk_name}")
                if target_el is not None:
                    target_el.set("bus", value)
                    target_el.set("dev", self._free_dev(root, value))
                    address = disks[disk_name].element.find("address")
                    if address is not None:
                        disks[disk_name].element.remove(address)
            elif field.startswith("nics[") and field.endswith("]"):
                element = self._nic_element(NicSpec(**value))
                devices.append(element)
                if hot:
                    live.append(("attach NIC", dom.attachDeviceFlags, (_xml(element), live_flag)))
            elif field.startswith("nics["):
                mac, key = field[len("nics["):].split("].", 1)
                for iface in root.findall("./devices/interface"):
                    mac_el = iface.find("mac")
                    if mac_el is None or mac_el.get("address", "").lower() != mac:
                        continue
                    if key == "network":
                        iface.set("type", "network")
                        for source in iface.findall("source"):
                            iface.remove(source)
                        source = ET.Element("source", {"network": value})
                        iface.insert(1, source)
                        if hot:
                            live.append(("NIC network", dom.updateDeviceFlags, (_xml(iface), live_flag)))
                    elif key == "model":
                        model = iface.find("model")
                        if model is None:
                            model = _sub(iface, "model")
                        model.set("type", value)
                        address = iface.find("address")
                        if address is not None:
                            iface.remove(address)
        self._call(f"define guest {name!r}", self.connect().defineXML, _xml(root))
        for what, func, args in live:
            self._call(f"guest {name!r}: {what} (live)", func, *args)

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
        root = ET.fromstring(xml)  # noqa: S314
        capacity = {}
        for i in range(int(stats.get("block.count", 0))):
            if f"block.{i}.name" in stats and f"block.{i}.capacity" in stats:
                capacity[stats[f"block.{i}.name"]] = stats[f"block.{i}.capacity"]
        disks = []
        for disk in root.findall("./devices/disk"):
            if disk.get("device", "disk") != "disk":
                continue
            target = disk.find("target")
            source = disk.find("source")
            dev = target.get("dev") if target is not None else None
            src = None
            if source is not None:
                src = source.get("file") or source.get("dev") or source.get("volume") or source.get("name")
            disks.append(GuestDisk(name=dev or "?", size_gib=gib(capacity.get(dev)) if dev else None, source=src,
                                   bus=target.get("bus") if target is not None else None))
        nics, addresses = [], []
        for mac, network, model in _interfaces(root):
            nics.append(GuestNic(mac=mac, network=network, model=model))
            if mac:
                addresses.extend(leases.get(mac, []))
        tags = _tags(root.find(f"./metadata/{{{METADATA_NS}}}guest"))
        os_el = root.find(f"./metadata/{{{LIBOSINFO_NS}}}libosinfo/{{{LIBOSINFO_NS}}}os")
        memory = root.find("memory")
        vcpu = root.find("vcpu")
        memory_bytes = int(memory.text or 0) * _unit_bytes(memory.get("unit", "KiB")) if memory is not None else None
        vcpus = None
        if vcpu is not None:
            vcpus = int(vcpu.get("current") or vcpu.text or 0)
        return GuestFacts(
            name=root.findtext("name") or "",
            uuid=root.findtext("uuid"),
            power_state=_POWER.get(int(stats.get("state.state", 0)), "unknown"),
            vcpus=vcpus,
            memory_mib=mib(memory_bytes),
            guest_os=os_el.get("id") if os_el is not None else None,
            ip_addresses=sorted(set(addresses)),
            disks=disks,
            nics=nics,
            tags=tags,
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
