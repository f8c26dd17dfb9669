# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""Exported guest facts: every field of GuestFacts but the internal ones, as plain data."""

from __future__ import annotations

import dataclasses
import gc

from ansible_collections.virtfleet.core.plugins.module_utils._discovery import paused_gc
from ansible_collections.virtfleet.core.plugins.module_utils._model import GuestDisk, GuestFacts, GuestNic


def test_guest_to_dict_exports_every_field_but_the_internal_ones() -> None:
    guest = GuestFacts(name="web01", uuid="u-1", power_state="running", hypervisor="esx01", vcpus=2,
                       memory_mib=512, guest_os="Debian", ip_addresses=["192.0.2.5"],
                       disks=[GuestDisk(name="root", size_gib=8.0, source="[ds] web01/root.vmdk", bus="scsi")],
                       nics=[GuestNic(mac="52:54:00:00:00:01", network="lan", model="virtio")],
                       tags={"role": "web"}, template=True, host_key="host-9")
    data = guest.to_dict()
    internal = {"template", "host_key"}
    assert set(data) == {f.name for f in dataclasses.fields(GuestFacts)} - internal
    assert data["disks"] == [dataclasses.asdict(d) for d in guest.disks]
    assert data["nics"] == [dataclasses.asdict(n) for n in guest.nics]
    assert data["tags"] == {"role": "web"} and data["ip_addresses"] == ["192.0.2.5"]
    # Copies: the exported data does not alias the facts.
    data["tags"]["x"] = "y"
    data["ip_addresses"].append("x")
    assert guest.tags == {"role": "web"} and guest.ip_addresses == ["192.0.2.5"]


def test_paused_gc_restores_the_collector_as_it_was_also_on_error() -> None:
    assert gc.isenabled()
    try:
        with paused_gc():
            assert not gc.isenabled()
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()  # it was off before: left off
    finally:
        gc.enable()
