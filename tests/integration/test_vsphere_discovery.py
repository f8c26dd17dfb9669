"""vSphere discovery against the lab's vcsim vCenter: the VM read split into concurrent parts returns exactly
what one request returns, and what pyVmomi itself lists."""

from __future__ import annotations

from typing import Any

import pytest

from ansible_collections.virtfleet.core.plugins.module_utils._endpoints import (
    Credentials,
    parse_endpoint,
    with_credentials,
)
from ansible_collections.virtfleet.core.plugins.module_utils.backends import vsphere
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
    # One RetrievePropertiesEx per part instead of one in all.
    assert parts_calls == one_calls + 2

    with backend(lab) as b:
        content = b._login()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        listed = sorted((vm.name, vm.config.uuid, vm.config.hardware.numCPU, vm.config.hardware.memoryMB)
                        for vm in view.view if not vm.config.template)
    assert sorted((g["name"], g["uuid"], g["vcpus"], g["memory_mib"]) for g in one) == listed
