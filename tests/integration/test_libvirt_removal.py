# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""remove_storage deletes only the volumes this collection made for the guest, on the lab's libvirtd: a disk
re-pointed by hand at another volume keeps that volume."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from typing import Any, Callable

import pytest

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.lab
Run = Callable[..., dict[str, Any]]


def test_a_disk_repointed_by_hand_keeps_the_volume_it_points_at(lab: dict[str, Any], libvirt_conn: Any,
                                                                run_module: Run) -> None:
    name = f"vftest-repoint-{uuid.uuid4().hex[:6]}"
    foreign = f"{name}-foreign.qcow2"
    args = {"uri": lab["libvirt"]["uri"], "datastore": lab["libvirt"]["pool"], "domain_type": lab["domain_type"]}
    pool = libvirt_conn.storagePoolLookupByName(lab["libvirt"]["pool"])
    pool.createXML(f"<volume><name>{foreign}</name><capacity unit='M'>1</capacity>"
                   "<target><format type='qcow2'/></target></volume>", 0)
    try:
        made = run_module("guest", {**args, "name": name, "memory_mib": 64,
                                    "disks": [{"name": "root", "size_gib": 1}, {"name": "data", "size_gib": 1}]})
        assert made["_status"] == "CHANGED", made
        dom = libvirt_conn.lookupByName(name)
        root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))
        for disk in root.findall("./devices/disk"):
            alias = disk.find("alias")
            if alias is not None and alias.get("name") == "ua-data":
                disk.find("source").set("volume", foreign)  # what `virsh edit` would do
        libvirt_conn.defineXML(ET.tostring(root, encoding="unicode"))
        gone = run_module("guest", {"uri": lab["libvirt"]["uri"], "name": name, "state": "absent",
                                    "remove_storage": True})
        assert gone["_status"] == "CHANGED", gone
        pool.refresh(0)
        left = {v.name() for v in pool.listAllVolumes(0) if v.name().startswith(name)}
        # root (ours, still pointed at) goes; the foreign volume stays; so does the volume made for data, which
        # the guest no longer names after the edit (what a guest does not name is never deleted).
        assert left == {foreign, f"{name}+data.qcow2"}, f"left {left}"
    finally:
        pool.refresh(0)
        for vol in pool.listAllVolumes(0):
            if vol.name().startswith(name):
                vol.delete(0)
        try:
            libvirt_conn.lookupByName(name).undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        except libvirt.libvirtError:
            pass
