# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""The guest modules against the lab's real libvirtd (QEMU, KVM or TCG as the lab decided).

Each test makes its own `vftest-` guests and removes them (domains and volumes) when it ends.
"""

from __future__ import annotations

import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

import pytest

libvirt = pytest.importorskip("libvirt")

Run = Callable[..., dict[str, Any]]


def base_args(lab: dict[str, Any]) -> dict[str, Any]:
    return {"uri": lab["libvirt"]["uri"], "datastore": lab["libvirt"]["pool"], "domain_type": lab["domain_type"]}


def spec(name: str, lab: dict[str, Any], **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"name": name, "vcpus": 1, "memory_mib": 64,
                            "disks": [{"name": "root", "size_gib": 1}],
                            "nics": [{"network": lab["libvirt"]["network"]}], "tags": {"suite": "integration"}}
    data.update(extra)
    return data


def booting(lab: dict[str, Any], hostname: str) -> dict[str, Any]:
    """The lab's tiny guest: direct kernel boot, reads its NoCloud seed and prints the hostname (it needs
    128 MiB to unpack its kernel and initramfs). The hostname is in user_data, which is no_log: a hostname equal
    to the guest name would mask the name in every message."""
    boot = {"kernel": lab["guest"]["kernel"], "initrd": lab["guest"]["initrd"],
            "cmdline": "console=ttyS0 quiet panic=-1"}
    return {"memory_mib": 128, "boot": boot,
            "cloud_init": {"meta_data": f"instance-id: {hostname}\nlocal-hostname: {hostname}\n",
                           "user_data": {"hostname": hostname}}}


def unique(prefix: str) -> str:
    return f"vftest-{prefix}-{uuid.uuid4().hex[:6]}"


def volumes(conn: Any, lab: dict[str, Any], name: str) -> set[str]:
    pool = conn.storagePoolLookupByName(lab["libvirt"]["pool"])
    pool.refresh(0)
    return {v.name() for v in pool.listAllVolumes(0) if v.name().startswith(name + "+")}


def exists(conn: Any, name: str) -> bool:
    try:
        conn.lookupByName(name)
        return True
    except libvirt.libvirtError:
        return False


def without_uuid(facts: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in facts.items() if k != "uuid"}


def test_create_check_mode_is_exact_and_harmless_then_rerun_changes_nothing(
        lab: dict[str, Any], libvirt_conn: Any, run_module: Run, names: list[str]) -> None:
    name = unique("create")
    names.append(name)
    args = {**base_args(lab), **spec(name, lab), "cloud_init": {"meta_data": {"instance-id": name}}}

    planned = run_module("guest", args, check=True, diff=True)
    assert planned["changed"] is True and planned["action"] == "create", planned
    assert not exists(libvirt_conn, name), "check mode created the guest"
    assert volumes(libvirt_conn, lab, name) == set(), "check mode created a volume"

    done = run_module("guest", args, diff=True)
    assert done["changed"] is True and done["changes"] == planned["changes"]
    assert without_uuid(done["guest"]) == without_uuid(planned["guest"])
    assert planned["_diff_text"] and done["_diff_text"].count("+") > 5
    assert "<domain" not in done["_diff_text"], "diff must be the model, not XML"

    dom = libvirt_conn.lookupByName(name)
    root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    assert root.findtext("currentMemory") == str(64 * 1024)
    assert root.find("./devices/disk/alias[@name='ua-root']") is not None
    assert volumes(libvirt_conn, lab, name) == {f"{name}+root.qcow2", f"{name}+cidata.iso"}
    assert done["guest"]["uuid"] == dom.UUIDString()
    assert done["guest"]["nics"][0]["mac"] == planned["guest"]["nics"][0]["mac"]

    again = run_module("guest", args)
    assert again["changed"] is False and again["changes"] == [], again
    assert run_module("guest", args, check=True)["changed"] is False
    assert run_module("guests", {**base_args(lab), "guests": [spec(name, lab)]})["changed"] is False


def test_in_place_changes_report_live_and_restart_required(
        lab: dict[str, Any], libvirt_conn: Any, run_module: Run, names: list[str]) -> None:
    name = unique("change")
    names.append(name)
    args = {**base_args(lab), **spec(name, lab), **booting(lab, f"host-{name[-6:]}"), "state": "running"}
    assert run_module("guest", args)["changed"] is True
    dom = libvirt_conn.lookupByName(name)
    assert dom.isActive()

    live_change = {**args, "vcpus": 2, "tags": {"suite": "integration", "tier": "web"},
                   "disks": [{"name": "root", "size_gib": 2}, {"name": "data", "size_gib": 1}],
                   "nics": [{"network": lab["libvirt"]["network"]}, {"network": lab["libvirt"]["network"]}]}
    planned = run_module("guest", live_change, check=True)
    assert dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE) == 1, "check mode touched the running guest"
    done = run_module("guest", live_change)
    fields = {c["field"]: c["live"] for c in done["changes"]}
    assert done["changes"] == planned["changes"]
    assert fields["vcpus"] is True and fields["disks[root].size_gib"] is True and fields["disks[data]"] is True
    assert fields["tags"] is True and any(f.startswith("nics[") for f in fields)
    assert done["restart_required"] is False
    assert dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE) == 2, "vCPU not hot-added"
    live = ET.fromstring(dom.XMLDesc(0))
    assert len(live.findall("./devices/interface")) == 2, "NIC not attached live"
    assert live.find("./devices/disk/alias[@name='ua-data']") is not None, "disk not attached live"
    assert dom.blockInfo("vda")[0] == 2 * 1024**3, "disk not grown live"
    rerun = run_module("guest", live_change)
    assert rerun["changed"] is False and rerun["restart_required"] is False, "live changes left a restart pending"

    memory = {**live_change, "memory_mib": 160}
    pending = run_module("guest", memory)
    assert pending["changes"] == [{"field": "memory_mib", "before": 128, "after": 160, "live": False}]
    assert pending["restart_required"] is True
    assert dom.maxMemory() == 128 * 1024, "a restart-only change reached the running guest"
    assert ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).findtext("currentMemory") == str(160 * 1024)
    # The next run changes nothing but still says the guest waits for a restart (read from the live definition).
    waiting = run_module("guest", memory)
    assert waiting["changed"] is False and waiting["restart_required"] is True and waiting["changes"] == []

    firmware_kernel = {**memory, "boot": {**memory["boot"], "cmdline": "console=ttyS0 panic=-1"},
                       "allow_restart": True, "force": True, "shutdown_timeout": 2}
    restarted = run_module("guest", firmware_kernel)
    assert restarted["_status"] != "FAILED!", restarted
    assert restarted["restart_required"] is False
    assert {"field": "power_state", "before": "running", "after": "restarted", "live": True} in restarted["changes"]
    assert dom.isActive() and dom.maxMemory() == 160 * 1024, "restart did not apply the pending memory"


def test_stop_waits_then_fails_clearly_or_forces(
        lab: dict[str, Any], libvirt_conn: Any, run_module: Run, names: list[str]) -> None:
    name = unique("stop")
    names.append(name)
    args = {**base_args(lab), **spec(name, lab), **booting(lab, f"host-{name[-6:]}"), "state": "running"}
    run_module("guest", args)
    # The tiny guest has no ACPI daemon: it ignores the shutdown request, like a hung guest would.
    refused = run_module("guest", {**args, "state": "stopped", "shutdown_timeout": 2})
    assert refused["_status"] == "FAILED!"
    assert f"guest '{name}' did not shut down within 2s" in refused["msg"] and "force" in refused["msg"]
    assert libvirt_conn.lookupByName(name).isActive()
    forced = run_module("guest", {**args, "state": "stopped", "shutdown_timeout": 2, "force": True})
    assert forced["changed"] is True
    assert not libvirt_conn.lookupByName(name).isActive()
    assert run_module("guest", {**args, "state": "stopped"})["changed"] is False


def test_absent_keeps_disks_unless_asked_and_never_foreign_ones(
        lab: dict[str, Any], libvirt_conn: Any, run_module: Run, names: list[str]) -> None:
    kept, removed = unique("keep"), unique("drop")
    names.extend([kept, removed])
    for name in (kept, removed):
        run_module("guest", {**base_args(lab), **spec(name, lab)})
    # A disk made elsewhere and attached to the guest: never deleted by this collection.
    pool = libvirt_conn.storagePoolLookupByName(lab["libvirt"]["pool"])
    foreign = f"{removed}+foreign.qcow2"
    pool.createXML(f"<volume><name>{foreign}</name><capacity unit='MiB'>8</capacity>"
                   "<target><format type='qcow2'/></target></volume>", 0)
    libvirt_conn.lookupByName(removed).attachDeviceFlags(
        f"<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/><source pool='{pool.name()}' "
        f"volume='{foreign}'/><target dev='vdc' bus='virtio'/></disk>", libvirt.VIR_DOMAIN_AFFECT_CONFIG)

    planned = run_module("guest", {**base_args(lab), "name": kept, "state": "absent"}, check=True)
    assert planned["changed"] is True and exists(libvirt_conn, kept)
    gone = run_module("guest", {**base_args(lab), "name": kept, "state": "absent"})
    assert gone["changed"] is True and not exists(libvirt_conn, kept)
    assert volumes(libvirt_conn, lab, kept) == {f"{kept}+root.qcow2"}, "disk removed without remove_storage"

    # Re-created under the same name, the guest gets its kept disk back: grown if asked, never shrunk.
    smaller = run_module("guest", {**base_args(lab), **spec(kept, lab, disks=[{"name": "root", "size_gib": 0.5}])})
    assert smaller["_status"] == "FAILED!" and "a 1 GiB disk kept from an earlier guest" in smaller["msg"]
    assert not exists(libvirt_conn, kept)
    bigger = {**base_args(lab), **spec(kept, lab, disks=[{"name": "root", "size_gib": 2}])}
    planned_again = run_module("guest", bigger, check=True)
    again = run_module("guest", bigger)
    assert without_uuid(again["guest"]) == without_uuid(planned_again["guest"])
    assert again["guest"]["disks"][0]["size_gib"] == 2.0
    assert run_module("guest", bigger)["changed"] is False

    run_module("guest", {**base_args(lab), "name": removed, "state": "absent", "remove_storage": True})
    assert not exists(libvirt_conn, removed)
    assert volumes(libvirt_conn, lab, removed) == {foreign}, "remove_storage must delete only our own disks"
    assert run_module("guest", {**base_args(lab), "name": removed, "state": "absent"})["changed"] is False


def test_exclusive_removes_only_owned_guests(
        lab: dict[str, Any], libvirt_conn: Any, run_module: Run, names: list[str]) -> None:
    keep, prune, foreign = unique("ex-keep"), unique("ex-prune"), unique("ex-foreign")
    names.extend([keep, prune, foreign])
    owner = f"test-{keep}"  # an owner of this test's own: exclusive prunes every other guest that owner owns
    run_module("guests", {**base_args(lab), "owner": owner, "guests": [spec(keep, lab), spec(prune, lab)]})
    libvirt_conn.defineXML(f"<domain type='qemu'><name>{foreign}</name><memory unit='MiB'>32</memory>"
                           "<os><type arch='x86_64'>hvm</type></os></domain>")
    args = {**base_args(lab), "owner": owner, "guests": [spec(keep, lab)], "exclusive": True, "remove_storage": True}
    planned = run_module("guests", args, check=True)
    removed = {g["name"] for g in planned["guests"] if g["action"] == "remove"}
    assert removed == {prune}, planned
    assert exists(libvirt_conn, prune)
    done = run_module("guests", args)
    assert {g["name"] for g in done["guests"] if g["action"] == "remove"} == removed
    assert exists(libvirt_conn, keep) and exists(libvirt_conn, foreign) and not exists(libvirt_conn, prune)
    for lab_domain in lab["libvirt"]["domains"]:
        assert exists(libvirt_conn, lab_domain)


BAD_INPUTS = [
    ({"disks": [{"name": "root", "size_gib": -1}]}, "disks[0].size_gib=-1"),
    ({"vcpus": 0}, "vcpus=0"),
    ({"vcpus": 4096}, "vcpus=4096"),
    ({"memory_mib": 64 * 1024 * 1024}, "memory_mib=67108864"),
    ({"nics": [{"network": "no-such-net"}]}, "nics[0].network='no-such-net'"),
    ({"disks": [{"name": "root", "size_gib": 1, "pool": "no-such-pool"}]}, "disks[0].pool='no-such-pool'"),
    ({"disks": [{"name": "root", "size_gib": 1}, {"name": "root", "size_gib": 2}]}, "disks[1].name='root'"),
    ({"nics": [{"network": "virtfleet-lab", "mac": "52:54:00:00:00:01"},
               {"network": "virtfleet-lab", "mac": "52:54:00:00:00:01"}]}, "nics[1].mac"),
    ({"nics": [{"network": "virtfleet-lab", "mac": "52:54:00:zz:00:01"}]}, "nics[0].mac='52:54:00:zz:00:01'"),
    ({"firmware": "coreboot"}, "firmware"),
    ({"colour": "blue"}, "colour"),
]


@pytest.mark.parametrize(("bad", "field"), BAD_INPUTS, ids=[b[1] for b in BAD_INPUTS])
def test_bad_input_is_one_line_naming_guest_and_field_and_changes_nothing(
        lab: dict[str, Any], libvirt_conn: Any, run_module: Run, names: list[str], bad: dict[str, Any],
        field: str) -> None:
    good, wrong = unique("good"), unique("bad")
    names.extend([good, wrong])
    before = {d.name() for d in libvirt_conn.listAllDomains(0)}
    result = run_module("guests", {**base_args(lab), "guests": [spec(good, lab), {**spec(wrong, lab), **bad}]})
    assert result["_status"] == "FAILED!", result
    msg = result["msg"]
    assert "\n" not in msg and wrong in msg and field in msg, msg
    assert {d.name() for d in libvirt_conn.listAllDomains(0)} == before, "something was created"
    assert volumes(libvirt_conn, lab, good) == set() and volumes(libvirt_conn, lab, wrong) == set()


def test_mac_taken_and_disk_shrink_are_refused_before_any_change(
        lab: dict[str, Any], libvirt_conn: Any, run_module: Run, names: list[str]) -> None:
    name, other = unique("shrink"), unique("mac")
    names.extend([name, other])
    created = run_module("guest", {**base_args(lab), **spec(name, lab, disks=[{"name": "root", "size_gib": 2}])})
    taken = created["guest"]["nics"][0]["mac"]
    shrink = run_module("guests", {**base_args(lab), "guests": [
        spec(name, lab, vcpus=2, disks=[{"name": "root", "size_gib": 1}])]})
    assert shrink["_status"] == "FAILED!" and "disks[0].size_gib=1" in shrink["msg"] and "shrink" in shrink["msg"]
    dom = libvirt_conn.lookupByName(name)
    assert ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).find("vcpu").get("current") == "1"
    nics = [{"network": lab["libvirt"]["network"], "mac": taken}]
    clash = run_module("guest", {**base_args(lab), **spec(other, lab, nics=nics)})
    assert clash["_status"] == "FAILED!" and f"already used by guest '{name}'" in clash["msg"]
    assert not exists(libvirt_conn, other)


def test_real_guest_boots_and_reads_its_cloud_init_seed(
        lab: dict[str, Any], libvirt_conn: Any, run_module: Run, names: list[str]) -> None:
    """Proof that the seed reached the guest: it prints the hostname it read from it on its serial console."""
    name = unique("boot")
    names.append(name)
    hostname = f"seeded-{uuid.uuid4().hex[:8]}"
    result = run_module("guest", {**base_args(lab), **spec(name, lab), **booting(lab, hostname), "state": "running"})
    assert result["changed"] is True
    console = Path(f"/var/log/libvirt/qemu/{name}-serial.log")
    deadline = time.monotonic() + 90
    text = ""
    while time.monotonic() < deadline:
        text = console.read_text(errors="replace") if console.exists() else ""
        if "virtfleet-guest: done" in text:
            break
        time.sleep(0.5)
    assert f"hostname={hostname}" in text, f"guest console ({lab['domain_type']}):\n{text[-2000:]}"


def test_guest_info_filters_and_module_defaults_group(
        lab: dict[str, Any], run_module: Run, names: list[str], ansible_env: dict[str, str], tmp_path: Path) -> None:
    import subprocess
    import sys

    web, db = unique("info-web"), unique("info-db")
    names.extend([web, db])
    run_module("guests", {**base_args(lab), "guests": [spec(web, lab, tags={"role": "web"}),
                                                       spec(db, lab, tags={"role": "db"})]})
    found = run_module("guest_info", {"uri": lab["libvirt"]["uri"], "name": "vftest-info-*", "tags": {"role": "web"}})
    assert [g["name"] for g in found["guests"]] == [web]
    status = found["guests"][0]["status"]
    assert status["owner"] == "virtfleet.core" and status["power_state"] == "stopped"
    assert found["changed"] is False

    playbook = tmp_path / "defaults.yml"
    playbook.write_text(f"""
- hosts: localhost
  gather_facts: false
  module_defaults:
    group/virtfleet.core.hypervisor:
      uri: {lab["libvirt"]["uri"]}
  tasks:
    - virtfleet.core.guest_info:
        name: {db}
      register: info
    - ansible.builtin.assert:
        that: info.guests | map(attribute='name') | list == ['{db}']
""")
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", "-c", "local",
                           str(playbook)], env=ansible_env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_nic_model_and_disk_bus_wait_for_a_restart_autostart_does_not(
        lab: dict[str, Any], libvirt_conn: Any, run_module: Run, names: list[str]) -> None:
    name = unique("devices")
    names.append(name)
    args = {**base_args(lab), **spec(name, lab), **booting(lab, f"host-{name[-6:]}"), "state": "running"}
    created = run_module("guest", args)
    mac = created["guest"]["nics"][0]["mac"]
    changed = {**args, "autostart": True, "disks": [{"name": "root", "size_gib": 1, "bus": "sata"}],
               "nics": [{"network": lab["libvirt"]["network"], "mac": mac, "model": "e1000"}]}
    done = run_module("guest", changed)
    assert {c["field"]: c["live"] for c in done["changes"]} == {
        "autostart": True, "disks[root].bus": False, f"nics[{mac}].model": False}
    assert done["restart_required"] is True
    dom = libvirt_conn.lookupByName(name)
    assert dom.autostart() == 1
    persistent = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    running = ET.fromstring(dom.XMLDesc(0))
    assert persistent.find("./devices/interface/model").get("type") == "e1000"
    assert running.find("./devices/interface/model").get("type") == "virtio", "a restart-only change went live"
    assert persistent.find("./devices/disk/alias[@name='ua-root']/../target").get("bus") == "sata"
    assert run_module("guest", changed)["changed"] is False


def test_a_volume_another_guest_uses_is_never_adopted(
        lab: dict[str, Any], libvirt_conn: Any, run_module: Run, names: list[str]) -> None:
    name, holder = unique("adopt"), unique("holder")
    names.extend([name, holder])
    pool = libvirt_conn.storagePoolLookupByName(lab["libvirt"]["pool"])
    volume = f"{name}+root.qcow2"
    pool.createXML(f"<volume><name>{volume}</name><capacity unit='MiB'>8</capacity>"
                   "<target><format type='qcow2'/></target></volume>", 0)
    libvirt_conn.defineXML(
        f"<domain type='qemu'><name>{holder}</name><memory unit='MiB'>32</memory>"
        "<os><type arch='x86_64'>hvm</type></os><devices><disk type='volume' device='disk'>"
        f"<driver name='qemu' type='qcow2'/><source pool='{pool.name()}' volume='{volume}'/>"
        "<target dev='vda' bus='virtio'/></disk></devices></domain>")
    refused = run_module("guest", {**base_args(lab), **spec(name, lab)})
    assert refused["_status"] == "FAILED!" and f"in use by guest '{holder}'" in refused["msg"], refused
    assert "\n" not in refused["msg"] and not exists(libvirt_conn, name)
    assert volumes(libvirt_conn, lab, name) == {volume}
    assert pool.storageVolLookupByName(volume).info()[1] == 8 * 1024 * 1024, "the other guest's disk was touched"
