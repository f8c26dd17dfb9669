# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""vSphere backend (ESXi or vCenter) over pyVmomi, in bulk.

One ContainerView per object type and one paged RetrievePropertiesEx of just the needed properties;
folder, datacenter and cluster names come from one parent map. No lazy per-object property reads.
The views belong to the session and go with the logout, so they are not destroyed one by one.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any, Dict, Iterator, List, Optional, Tuple

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
    from pyVmomi import SoapStubAdapter, vim, vmodl

    HAS_PYVMOMI = True
except ImportError:  # pragma: no cover - depends on the environment
    HAS_PYVMOMI = False

# Guest tags live in extraConfig under this prefix (see the guest modules).
TAG_PREFIX = "virtfleet.tag."
PAGE_SIZE = 1000

HOST_PROPS = [
    "name", "parent", "datastore", "network", "runtime.connectionState",
    "summary.config.product", "summary.hardware", "summary.quickStats.overallMemoryUsage",
    "summary.managementServerIp",
]
VM_PROPS = [
    "name", "config.uuid", "config.template", "config.guestFullName", "config.hardware.numCPU",
    "config.hardware.memoryMB", "config.hardware.device", "config.extraConfig", "runtime.powerState",
    "runtime.host", "guest.net",
]
DATASTORE_PROPS = ["summary.name", "summary.type", "summary.capacity", "summary.freeSpace"]
PARENT_PROPS = ["name", "parent"]

_POWER = {"poweredOn": "running", "poweredOff": "stopped", "suspended": "suspended"}
_SERIAL_KEYS = ("SerialNumberTag", "ServiceTag", "EnclosureSerialNumberTag")


def _bus(controller: Any) -> Optional[str]:
    if controller is None:
        return None
    name = type(controller).__name__
    for marker, bus in (("NVME", "nvme"), ("SATA", "sata"), ("AHCI", "sata"), ("IDE", "ide"), ("SCSI", "scsi"),
                        ("LsiLogic", "scsi"), ("BusLogic", "scsi")):
        if marker.lower() in name.lower():
            return bus
    return None


class VsphereBackend(HypervisorBackend):
    api = "vsphere"

    def __init__(self, endpoint: Endpoint, timeout: float = 10.0) -> None:
        super().__init__(endpoint, timeout)
        self._content: Any = None
        self._logged_in = False

    # ------------------------------------------------------------------ connection
    def _ssl_context(self) -> ssl.SSLContext:
        if self.endpoint.credentials.validate_certs:
            return ssl.create_default_context()
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # validate_certs: false, the user's explicit choice
        return ctx

    def _fail(self, exc: BaseException) -> EndpointError:
        """Turn whatever pyVmomi or the network raised into one line naming the endpoint."""
        label = self.endpoint.label
        if isinstance(exc, socket.timeout) or "timed out" in str(exc):
            return EndpointError(label, f"timed out after {self.timeout:g}s")
        if isinstance(exc, ssl.SSLCertVerificationError):
            return EndpointError(label, f"TLS certificate not trusted ({exc.verify_message}); "
                                        "install its CA or set validate_certs: false")
        if isinstance(exc, ConnectionRefusedError):
            return EndpointError(label, f"connection refused on port {self.endpoint.port}")
        if isinstance(exc, OSError):
            return EndpointError(label, f"cannot connect on port {self.endpoint.port}: {exc.strerror or exc}")
        if HAS_PYVMOMI and isinstance(exc, vim.fault.InvalidLogin):
            return EndpointError(label, f"login refused for user '{self.endpoint.credentials.username}' "
                                        "(wrong user name or password)")
        msg = getattr(exc, "msg", None) or str(exc)
        return EndpointError(label, f"vSphere: {one_line(msg)}")

    def _service_content(self) -> Any:
        if self._content is not None:
            return self._content
        if not HAS_PYVMOMI:
            raise MissingLibraryError("pyvmomi", "vSphere endpoints")
        try:
            stub = SoapStubAdapter(host=self.endpoint.host, port=self.endpoint.port or 443,
                                   sslContext=self._ssl_context(), httpConnectionTimeout=self.timeout)
            self._content = vim.ServiceInstance("ServiceInstance", stub).RetrieveContent()
        except Exception as exc:  # noqa: BLE001 - network, TLS and SOAP errors all become one line
            raise self._fail(exc) from None
        self.calls += 1
        return self._content

    def _login(self) -> Any:
        content = self._service_content()
        if self._logged_in:
            return content
        creds = self.endpoint.credentials
        if not creds.username or not creds.password:
            raise EndpointError(self.endpoint.label, "no credentials: set username and password (or a matching "
                                                     "credentials entry, or VMWARE_USER / VMWARE_PASSWORD)")
        try:
            content.sessionManager.Login(creds.username, creds.password)
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc) from None
        self.calls += 1
        self._logged_in = True
        return content

    def close(self) -> None:
        if self._logged_in and self._content is not None:
            try:
                self._content.sessionManager.Logout()
                self.calls += 1
            except Exception:  # noqa: BLE001, S110 - the session dies with the connection anyway
                pass
        self._logged_in = False
        self._content = None

    # ------------------------------------------------------------------ identity
    def identify(self) -> Identity:
        about = self._service_content().about
        api_type = about.apiType
        if api_type == "HostAgent":
            kind = "esxi"
        elif api_type == "VirtualCenter":
            kind = "vcenter"
        else:
            raise EndpointError(self.endpoint.label, f"vSphere endpoint of unknown apiType {api_type!r}")
        return Identity(api="vsphere", type=kind, product=about.fullName, version=about.version, build=about.build,
                        vendor=about.vendor, instance_uuid=getattr(about, "instanceUuid", None))

    # ------------------------------------------------------------------ bulk retrieval
    def _retrieve(self, content: Any, specs: List[Tuple[List[Any], List[Tuple[Any, List[str]]]]]) -> Iterator[Any]:
        """One RetrievePropertiesEx (plus continuation pages) over several container views.

        SPECS: for each view, (managed object types to put in the view, [(type, property paths)]).
        """
        pc = vmodl.query.PropertyCollector
        object_specs, prop_specs = [], []
        for view_types, props in specs:
            view = content.viewManager.CreateContainerView(content.rootFolder, view_types, True)
            self.calls += 1
            traverse = pc.TraversalSpec(name="view", type=vim.view.ContainerView, path="view", skip=False)
            object_specs.append(pc.ObjectSpec(obj=view, skip=True, selectSet=[traverse]))
            for mo_type, paths in props:
                prop_specs.append(pc.PropertySpec(type=mo_type, pathSet=paths, all=False))
        filter_spec = pc.FilterSpec(objectSet=object_specs, propSet=prop_specs, reportMissingObjectsInResults=False)
        collector = content.propertyCollector
        result = collector.RetrievePropertiesEx([filter_spec], pc.RetrieveOptions(maxObjects=PAGE_SIZE))
        self.calls += 1
        while result is not None:
            yield from result.objects
            if not result.token:
                break
            result = collector.ContinueRetrievePropertiesEx(result.token)
            self.calls += 1

    def discover(self, guests: bool = True) -> Discovery:
        try:
            identity = self.identify()
            content = self._login()
            specs: List[Tuple[List[Any], List[Tuple[Any, List[str]]]]] = [
                ([vim.HostSystem], [(vim.HostSystem, HOST_PROPS)]),
                ([vim.Datastore], [(vim.Datastore, DATASTORE_PROPS)]),
                ([vim.Network], [(vim.Network, ["name"])]),
                ([vim.Folder, vim.Datacenter, vim.ComputeResource],
                 [(vim.Folder, PARENT_PROPS), (vim.Datacenter, PARENT_PROPS), (vim.ComputeResource, PARENT_PROPS),
                  (vim.ClusterComputeResource, PARENT_PROPS)]),
            ]
            if guests:
                specs.append(([vim.VirtualMachine], [(vim.VirtualMachine, VM_PROPS)]))
            else:
                specs.append(([vim.VirtualMachine], [(vim.VirtualMachine, ["runtime.powerState", "runtime.host",
                                                                           "config.template"])]))
            by_type: Dict[str, Dict[str, Dict[str, Any]]] = {}
            for obj in self._retrieve(content, specs):
                props = {p.name: p.val for p in obj.propSet}
                kind = type(obj.obj).__name__
                by_type.setdefault(kind, {})[obj.obj._moId] = props
        except EndpointError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc) from None
        hosts = self._hosts(identity, by_type)
        vms = by_type.get("vim.VirtualMachine", {})
        guest_list = [self._guest(moid, props, by_type, include_details=guests) for moid, props in vms.items()]
        count_guests(hosts, guest_list)
        return Discovery(identity=identity, hypervisors=sorted(hosts, key=lambda h: h.name),
                         guests=sorted((g for g in guest_list if not g.template), key=lambda g: g.name)
                         if guests else [], calls=self.calls)

    # ------------------------------------------------------------------ mapping
    def _parents(self, by_type: Dict[str, Dict[str, Dict[str, Any]]]) -> Dict[str, Tuple[str, str, Optional[str]]]:
        """moref id -> (kind, name, parent moref id) for folders, datacenters and compute resources."""
        out: Dict[str, Tuple[str, str, Optional[str]]] = {}
        for kind in ("vim.Folder", "vim.Datacenter", "vim.ComputeResource", "vim.ClusterComputeResource"):
            for moid, props in by_type.get(kind, {}).items():
                parent = props.get("parent")
                out[moid] = (kind, props.get("name", ""), parent._moId if parent is not None else None)
        return out

    def _hosts(self, identity: Identity, by_type: Dict[str, Dict[str, Dict[str, Any]]]) -> List[HypervisorFacts]:
        parents = self._parents(by_type)
        datastores = by_type.get("vim.Datastore", {})
        networks = {}
        for kind, objs in by_type.items():
            if kind in ("vim.Network", "vim.dvs.DistributedVirtualPortgroup", "vim.OpaqueNetwork"):
                networks.update({moid: props.get("name", moid) for moid, props in objs.items()})
        managed = identity.type == "vcenter"
        hosts = []
        for moid, props in by_type.get("vim.HostSystem", {}).items():
            datacenter = cluster = None
            cursor = props.get("parent")
            node = cursor._moId if cursor is not None else None
            while node in parents:
                kind, name, up = parents[node]
                if kind == "vim.ClusterComputeResource":
                    cluster = name
                elif kind == "vim.Datacenter":
                    datacenter = name
                node = up
            hw = props.get("summary.hardware")
            product = props.get("summary.config.product")
            serial = None
            for ident in getattr(hw, "otherIdentifyingInfo", None) or []:
                if ident.identifierType.key in _SERIAL_KEYS and ident.identifierValue:
                    serial = ident.identifierValue
                    break
            memory_mib = mib(getattr(hw, "memorySize", None))
            used = props.get("summary.quickStats.overallMemoryUsage")
            storage = []
            for ds in props.get("datastore") or []:
                ds_props = datastores.get(ds._moId, {})
                storage.append(Storage(name=ds_props.get("summary.name", ds._moId), type=ds_props.get("summary.type"),
                                       capacity_gib=gib(ds_props.get("summary.capacity")),
                                       free_gib=gib(ds_props.get("summary.freeSpace"))))
            manager = self.endpoint.host if managed else (props.get("summary.managementServerIp") or None)
            hosts.append(HypervisorFacts(
                name=props.get("name", moid) if managed else (self.endpoint.host or props.get("name", moid)),
                type="esxi",
                api="vsphere",
                endpoint=self.endpoint.uri,
                product=getattr(product, "fullName", None),
                version=getattr(product, "version", None),
                build=getattr(product, "build", None),
                manager=manager,
                datacenter=datacenter,
                cluster=cluster,
                hardware=Hardware(vendor=getattr(hw, "vendor", None), model=getattr(hw, "model", None), serial=serial),
                cpu=Cpu(model=getattr(hw, "cpuModel", None), sockets=getattr(hw, "numCpuPkgs", None),
                        cores=getattr(hw, "numCpuCores", None), threads=getattr(hw, "numCpuThreads", None),
                        mhz=getattr(hw, "cpuMhz", None)),
                memory_mib=memory_mib,
                memory_free_mib=max(memory_mib - used, 0) if memory_mib is not None and used is not None else None,
                storage=sorted(storage, key=lambda s: s.name),
                networks=sorted(networks.get(n._moId, n._moId) for n in props.get("network") or []),
                connection_state=str(props.get("runtime.connectionState")) if props.get("runtime.connectionState")
                else None,
                key=moid,
            ))
        return hosts

    def _guest(self, moid: str, props: Dict[str, Any], by_type: Dict[str, Dict[str, Dict[str, Any]]],
               include_details: bool) -> GuestFacts:
        host = props.get("runtime.host")
        guest = GuestFacts(
            name=props.get("name", moid),
            uuid=props.get("config.uuid"),
            power_state=_POWER.get(str(props.get("runtime.powerState")), "unknown"),
            template=bool(props.get("config.template")),
            host_key=host._moId if host is not None else "",
        )
        if not include_details:
            return guest
        guest.vcpus = props.get("config.hardware.numCPU")
        guest.memory_mib = props.get("config.hardware.memoryMB")
        guest.guest_os = props.get("config.guestFullName")
        devices = props.get("config.hardware.device") or []
        by_key = {d.key: d for d in devices}
        networks = {}
        for kind in ("vim.Network", "vim.dvs.DistributedVirtualPortgroup", "vim.OpaqueNetwork"):
            networks.update({m: p.get("name", m) for m, p in by_type.get(kind, {}).items()})
        for dev in devices:
            if isinstance(dev, vim.vm.device.VirtualDisk):
                size = getattr(dev, "capacityInBytes", None) or (dev.capacityInKB or 0) * 1024
                guest.disks.append(GuestDisk(name=dev.deviceInfo.label if dev.deviceInfo else str(dev.key),
                                             size_gib=gib(size), source=getattr(dev.backing, "fileName", None),
                                             bus=_bus(by_key.get(dev.controllerKey))))
            elif isinstance(dev, vim.vm.device.VirtualEthernetCard):
                backing: Any = dev.backing
                network = getattr(backing, "deviceName", None)
                port = getattr(backing, "port", None)
                if port is not None and getattr(port, "portgroupKey", None):
                    network = networks.get(port.portgroupKey, port.portgroupKey)
                elif getattr(backing, "network", None) is not None:
                    network = networks.get(backing.network._moId, network)
                model = type(dev).__name__.rsplit(".", 1)[-1].replace("Virtual", "").lower()
                guest.nics.append(GuestNic(mac=(dev.macAddress or "").lower() or None, network=network, model=model))
        addresses: List[str] = []
        for nic in props.get("guest.net") or []:
            addresses.extend(a for a in (nic.ipAddress or []) if a)
        guest.ip_addresses = sorted(set(addresses))
        for opt in props.get("config.extraConfig") or []:
            if opt.key.startswith(TAG_PREFIX):
                guest.tags[opt.key[len(TAG_PREFIX):]] = str(opt.value)
        return guest
