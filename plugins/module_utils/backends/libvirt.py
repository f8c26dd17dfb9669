# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""libvirt backend: one connection, listAllDomains + getAllDomainStats, one XMLDesc per domain.

Only this module (and the other backends) import a hypervisor library.
"""

from __future__ import annotations

import socket
import xml.etree.ElementTree as ET
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

from .._endpoints import Endpoint
from .._errors import EndpointError, MissingLibraryError, one_line
from .._model import (
    Cpu,
    Discovery,
    GuestDisk,
    GuestFacts,
    GuestNic,
    Hardware,
    HypervisorFacts,
    Identity,
    Storage,
    count_guests,
    gib,
    mib,
)
from .base import HypervisorBackend

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


class LibvirtBackend(HypervisorBackend):
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
        for iface in root.findall("./devices/interface"):
            mac_el, src_el, model_el = iface.find("mac"), iface.find("source"), iface.find("model")
            mac = mac_el.get("address", "").lower() if mac_el is not None else None
            network = None
            if src_el is not None:
                network = src_el.get("network") or src_el.get("bridge") or src_el.get("dev")
            model = model_el.get("type") if model_el is not None else None
            nics.append(GuestNic(mac=mac, network=network, model=model))
            if mac:
                addresses.extend(leases.get(mac, []))
        tags = {}
        meta = root.find(f"./metadata/{{{METADATA_NS}}}guest")
        if meta is not None:
            for tag in meta.findall(f"{{{METADATA_NS}}}tag"):
                if tag.get("name"):
                    tags[tag.get("name", "")] = tag.text or ""
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


def _unit_bytes(unit: str) -> int:
    """Bytes per libvirt memory unit (libvirt writes KiB, but a user-defined XML may say otherwise)."""
    scale = {"b": 1, "bytes": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2, "mib": 1024**2,
             "mb": 1000**2, "g": 1024**3, "gib": 1024**3, "gb": 1000**3}
    return scale.get(unit.lower(), 1024)
