# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""Discovery against the lab: the vSphere VM read split into concurrent parts returns exactly what one request
returns, and what pyVmomi itself lists; results (guest facts skip the JSON round trip) are plain data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ansible_collections.virtfleet.core.plugins.module_utils._endpoints import (
    Credentials,
    parse_endpoint,
    with_credentials,
)
from ansible_collections.virtfleet.core.plugins.module_utils._model import gib
from ansible_collections.virtfleet.core.plugins.module_utils.backends import _vsphere_raw, vsphere
from ansible_collections.virtfleet.core.plugins.module_utils.backends.vsphere import VsphereBackend

pytestmark = pytest.mark.lab


def backend(lab: dict[str, Any]) -> VsphereBackend:
    address = lab["vcsim"]["vcenter"]["address"]
    endpoint = with_credentials(parse_endpoint(f"vsphere://{address}"),
                                Credentials(lab["username"], lab["password"], False))
    return VsphereBackend(endpoint, 10)


def discover(lab: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    with backend(lab) as b:
        found = b.discover(guests=True)
        return [g.to_dict() for g in found.guests], found.calls


def test_vm_read_in_parts_equals_one_request_and_pyvmomi(lab: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from pyVmomi import vim

    one, one_calls = discover(lab)
    monkeypatch.setattr(vsphere, "VM_CHUNK_MIN", 1)
    monkeypatch.setattr(vsphere, "VM_CHUNKS", 3)
    parts, parts_calls = discover(lab)

    assert len(one) >= 3, "the lab vCenter should hold a few VMs"
    assert parts == one
    # One RetrievePropertiesEx per part instead of one in all. (vcsim ignores maxObjects, so continuation
    # pages cannot be exercised here; the unit tests page by token.)
    assert parts_calls == one_calls + 2

    with backend(lab) as b:
        content = b._login()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        listed = sorted((vm.name, vm.config.uuid, vm.config.hardware.numCPU, vm.config.hardware.memoryMB)
                        for vm in view.view if not vm.config.template)
    assert sorted((g["name"], g["uuid"], g["vcpus"], g["memory_mib"]) for g in one) == listed


@pytest.mark.parametrize("where", ["vcenter", "esx01"])
def test_host_facts_read_without_pyvmomi_equal_pyvmomis_reading(lab: dict[str, Any], where: str) -> None:
    """Discovery reads hosts, datastores, networks and the inventory tree through its own SOAP session; the
    same endpoint read through pyVmomi, property by property, gives the same facts."""
    from pyVmomi import vim

    endpoint = with_credentials(parse_endpoint(f"vsphere://{lab['vcsim'][where]['address']}"),
                                Credentials(lab["username"], lab["password"], False))
    with VsphereBackend(endpoint, 10) as b:
        found = {h.key: h for h in b.discover(guests=False).hypervisors}
        content = b._login()  # pyVmomi's own session, beside discovery's
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.HostSystem], True)
        expected = {}
        for host in view.view:
            hw, product = host.summary.hardware, host.summary.config.product
            parents, node = [], host.parent
            while not isinstance(node, vim.Datacenter):  # compute resource, folders (vcsim fails on the root's)
                parents.append(node)
                node = node.parent
            parents.append(node)
            serials = [i.identifierValue for i in hw.otherIdentifyingInfo or []
                       if i.identifierType.key in vsphere._SERIAL_KEYS and i.identifierValue]
            memory_mib = hw.memorySize // (1024 * 1024)
            expected[host._moId] = {
                "name": host.name if where == "vcenter" else endpoint.host,
                "serial": serials[0] if serials else None,
                "memory_free_mib": memory_mib - host.summary.quickStats.overallMemoryUsage,
                "connection_state": str(host.runtime.connectionState),
                "manager": endpoint.host if where == "vcenter" else (host.summary.managementServerIp or None),
                "product": (product.fullName, product.version, product.build),
                "hardware": (hw.vendor, hw.model),
                "cpu": (hw.cpuModel, hw.numCpuPkgs, hw.numCpuCores, hw.numCpuThreads, hw.cpuMhz),
                "memory_mib": memory_mib,
                "datacenter": next((p.name for p in parents if isinstance(p, vim.Datacenter)), None),
                "cluster": next((p.name for p in parents if isinstance(p, vim.ClusterComputeResource)), None),
                "storage": sorted((ds.summary.name, ds.summary.type, gib(ds.summary.capacity),
                                   gib(ds.summary.freeSpace)) for ds in host.datastore),
                "networks": sorted(n.name for n in host.network),
            }
    got = {key: {"name": h.name, "serial": h.hardware.serial, "memory_free_mib": h.memory_free_mib,
                 "connection_state": h.connection_state, "manager": h.manager,
                 "product": (h.product, h.version, h.build),
                 "hardware": (h.hardware.vendor, h.hardware.model),
                 "cpu": (h.cpu.model, h.cpu.sockets, h.cpu.cores, h.cpu.threads, h.cpu.mhz),
                 "memory_mib": h.memory_mib, "datacenter": h.datacenter, "cluster": h.cluster,
                 "storage": sorted((s.name, s.type, s.capacity_gib, s.free_gib) for s in h.storage),
                 "networks": h.networks}
           for key, h in found.items()}
    assert got == expected
    assert any(h["cluster"] for h in got.values()) == (where == "vcenter")


def test_discovery_never_imports_pyvmomi(lab: dict[str, Any]) -> None:
    """pyVmomi costs every inventory run its import: discovery (a vCenter, an ESXi) must not load it."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from ansible_collections.virtfleet.core.plugins.module_utils._discovery import discover_endpoint\n"
        "from ansible_collections.virtfleet.core.plugins.module_utils._endpoints import Credentials, "
        "parse_endpoint, with_credentials\n"
        "lab = json.loads(sys.argv[1])\n"
        "for where in ('vcenter', 'esx01'):\n"
        "    ep = with_credentials(parse_endpoint('vsphere://' + lab['vcsim'][where]['address']),\n"
        "                          Credentials(lab['username'], lab['password'], False))\n"
        "    result = discover_endpoint(ep, True, 10)\n"
        "    assert result['error'] is None and result['guests'], result['error']\n"
        "print('pyVmomi' in sys.modules)\n"
    )
    root = Path(_vsphere_raw.__file__).resolve().parents[6]  # the directory holding ansible_collections/
    out = subprocess.run([sys.executable, "-c", code, json.dumps(lab)], capture_output=True, text=True,
                         check=True, cwd=root)
    assert out.stdout.strip() == "False"


PLAIN = (str, int, float, bool, type(None), list, dict)


def _plain(value: Any, where: str) -> None:
    """Only exact JSON types: guest facts skip the JSON round trip, so a library type must never leak in."""
    assert type(value) in PLAIN, f"{where}: {type(value).__name__}"
    if isinstance(value, dict):
        for key, item in value.items():
            assert type(key) in PLAIN and isinstance(key, str), f"{where}: key {key!r}"
            _plain(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _plain(item, f"{where}[{i}]")


@pytest.mark.parametrize("where", ["vcenter", "esx01", "libvirt"])
def test_discovery_results_are_plain_data(lab: dict[str, Any], where: str) -> None:
    from ansible_collections.virtfleet.core.plugins.module_utils._discovery import discover_endpoint

    if where == "libvirt":
        endpoint = parse_endpoint(lab["libvirt"]["uri"])
    else:
        endpoint = with_credentials(parse_endpoint(f"vsphere://{lab['vcsim'][where]['address']}"),
                                    Credentials(lab["username"], lab["password"], False))
    result = discover_endpoint(endpoint, True, 10)
    assert result["error"] is None and result["guests"]
    _plain(result, where)


def test_a_vm_gone_between_listing_and_reading_is_skipped(lab: dict[str, Any],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    expected, _calls = discover(lab)
    listed = VsphereBackend._inventory

    def with_a_ghost(session: Any, content: Any) -> Any:
        by_type, vm_ids = listed(session, content)
        return by_type, [*vm_ids[:1], "vm-99999", *vm_ids[1:]]  # removed after the view was read

    monkeypatch.setattr(VsphereBackend, "_inventory", staticmethod(with_a_ghost))
    monkeypatch.setattr(vsphere, "VM_CHUNK_MIN", 1)
    guests, _calls = discover(lab)
    assert guests == expected


def test_discovery_leaves_no_connection_open_with_the_collector_paused(lab: dict[str, Any],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """pyVmomi objects hold their stub in reference cycles; with the cycle collector paused for discovery,
    close() must still close the stub's connections, or a probe of many servers runs out of descriptors.
    The same for libvirt over TCP and Redfish."""
    import os

    from ansible_collections.virtfleet.core.plugins.module_utils._discovery import discover_endpoint, paused_gc

    monkeypatch.setattr(vsphere, "VM_CHUNK_MIN", 1)  # several connections for the vCenter's parts

    def sockets() -> int:
        return sum(os.readlink(f"/proc/self/fd/{fd}").startswith("socket:") for fd in os.listdir("/proc/self/fd")
                   if os.path.exists(f"/proc/self/fd/{fd}"))

    uris = [f"vsphere://{lab['vcsim'][where]['address']}" for where in ("vcenter", "esx01", "esx02")]
    uris += [lab["libvirt"]["tcp_uri"], lab["redfish"]["url"].replace("http://", "redfish+http://")]
    before = sockets()
    with paused_gc():
        for uri in uris * 3:
            endpoint = with_credentials(parse_endpoint(uri), Credentials(lab["username"], lab["password"], False))
            assert discover_endpoint(endpoint, True, 10)["error"] is None, uri
        assert sockets() <= before
