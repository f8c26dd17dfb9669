# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""One VM, two readers: discovery (raw SOAP, GuestFacts) and convergence (pyVmomi, GuestState) read the same
vSphere VM through different parsers, and normalise every field they share with the same function (codec.py).
Against the lab's vcsim, on the vCenter and on esx01: a guest with two disks, two NICs and tags is created
through converge(), then both readings must agree field by field."""

from __future__ import annotations

import uuid
from typing import Any, Iterator

import pytest

from ansible_collections.virtfleet.core.plugins.module_utils._converge import RunOptions, converge
from ansible_collections.virtfleet.core.plugins.module_utils._endpoints import (
    Credentials,
    parse_endpoint,
    with_credentials,
)
from ansible_collections.virtfleet.core.plugins.module_utils._model import (
    GuestFacts,
    GuestState,
    Placement,
    guest_spec_from_dict,
)
from ansible_collections.virtfleet.core.plugins.module_utils._plan import PlanOptions
from ansible_collections.virtfleet.core.plugins.module_utils.backends.vsphere import VsphereBackend, codec

pytestmark = pytest.mark.lab
PREFIX = "vftest-one-"
WHERE = {"vcenter": Placement(cluster="DC0_C0"), "esx01": Placement()}


def backend_for(lab: dict[str, Any], where: str) -> VsphereBackend:
    endpoint = with_credentials(parse_endpoint(f"vsphere://{lab['vcsim'][where]['address']}"),
                                Credentials(lab["username"], lab["password"], False))
    return VsphereBackend(endpoint, 10)


def converge_one(lab: dict[str, Any], where: str, guest: dict[str, Any], **options: Any) -> None:
    with backend_for(lab, where) as backend:
        (result,) = converge(backend, [guest_spec_from_dict(guest)], WHERE[where], RunOptions(**options))
    assert not result.failed, result.msg


def second_network(lab: dict[str, Any], where: str) -> str:
    """Another network the target hosts see (a distributed port group on the vCenter); esx01 has one only."""
    with backend_for(lab, where) as backend:
        networks = [n for n in backend.capacity(WHERE[where]).networks if n != "VM Network"]
    return next((n for n in networks if "DVPG" in n), networks[0] if networks else "VM Network")


@pytest.fixture()
def name(lab: dict[str, Any]) -> Iterator[str]:
    """A unique guest name; that guest (and its disks) is removed afterwards, whatever happened, and is gone."""
    made = f"{PREFIX}{uuid.uuid4().hex[:8]}"
    yield made
    for where in WHERE:
        converge_one(lab, where, {"name": made, "state": "absent"}, plan=PlanOptions(remove_storage=True))
        with backend_for(lab, where) as backend:
            assert made not in {g.name for g in backend.discover(guests=True).guests}


def both_readings(lab: dict[str, Any], where: str, guest: str) -> tuple[GuestFacts, GuestState]:
    with backend_for(lab, where) as backend:
        (facts,) = [g for g in backend.discover(guests=True).guests if g.name == guest]
    with backend_for(lab, where) as backend:
        (state,) = [s for s in backend.read_guests(WHERE[where]) if s.spec.name == guest]
    return facts, state


@pytest.mark.parametrize("where", list(WHERE))
def test_discovery_facts_and_convergence_state_agree_on_every_shared_field(lab: dict[str, Any], where: str,
                                                                           name: str) -> None:
    other = second_network(lab, where)
    converge_one(lab, where, {
        "name": name, "vcpus": 2, "memory_mib": 768, "state": "running",
        "disks": [{"name": "root", "size_gib": 2}, {"name": "data", "size_gib": 1.5, "bus": "sata"}],
        "nics": [{"network": "VM Network"}, {"network": other, "model": "e1000e"}],
        "tags": {"role": "web", "team": "blue"},
    })
    facts, state = both_readings(lab, where, name)
    spec = state.spec

    assert facts.power_state == state.power_state == "running"
    assert facts.uuid == spec.uuid
    assert (facts.vcpus, facts.memory_mib) == (spec.vcpus, spec.memory_mib) == (2, 768)
    assert facts.tags == spec.tags == {"role": "web", "team": "blue"}

    # Disks: name (the collection's record, not the device label), size, bus, and where the file is.
    fact_disks = sorted((d.name, d.size_gib, d.bus, codec.datastore_of(d.source)) for d in facts.disks)
    state_disks = sorted((d.name, d.size_gib, d.bus, d.pool) for d in spec.disks or [])
    assert fact_disks == state_disks
    assert [d[:3] for d in state_disks] == [("data", 1.5, "sata"), ("root", 2.0, "scsi")]
    assert all(d.source and d.source.endswith(f"/{name}_{d.name}.vmdk") for d in facts.disks)

    # NICs: MAC, network (a distributed port group by its name on the vCenter), model; in device order.
    fact_nics = [(n.mac, n.network, n.model) for n in facts.nics]
    state_nics = [(n.mac, n.network, n.model) for n in spec.nics or []]
    assert fact_nics == state_nics
    assert [(n[1], n[2]) for n in state_nics] == [("VM Network", "vmxnet3"), (other, "e1000e")]
    assert all(mac and mac == mac.lower() for mac, _net, _model in fact_nics)
