# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""Issue 10's libvirt defects against the lab's real libvirtd: console passwords kept, names that cannot
round-trip refused or rolled back, one reading of memory, buses the host cannot do refused while planning, and
a create or restart stopped part-way converged by the next run.

Each test makes its own `vftest-` guests (unique names) and removes them and their volumes when it ends.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any, Callable

import pytest

libvirt = pytest.importorskip("libvirt")

from test_guests_libvirt import base_args, exists, unique, volumes  # noqa: E402  (the suite's own helpers)

from ansible_collections.virtfleet.core.plugins.module_utils._endpoints import parse_endpoint  # noqa: E402
from ansible_collections.virtfleet.core.plugins.module_utils._errors import EndpointError  # noqa: E402
from ansible_collections.virtfleet.core.plugins.module_utils._model import (  # noqa: E402
    DiskSpec,
    GuestSpec,
    NicSpec,
    Placement,
)
from ansible_collections.virtfleet.core.plugins.module_utils.backends.libvirt import LibvirtBackend  # noqa: E402

Run = Callable[..., dict[str, Any]]


def spec(name: str, lab: dict[str, Any], **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"name": name, "vcpus": 1, "memory_mib": 64, "disks": [{"name": "root", "size_gib": 0.01}],
                            "nics": [{"network": lab["libvirt"]["network"]}]}
    data.update(extra)
    return data


def secure(dom: Any) -> str:
    return str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))


def virt_install_like(name: str, lab: dict[str, Any]) -> str:
    """What virt-install writes for a small guest: a console password, video, input, a channel, libosinfo."""
    return f"""<domain type='{lab["domain_type"]}'><name>{name}</name>
<metadata><libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
<libosinfo:os id="http://debian.org/debian/12"/></libosinfo:libosinfo></metadata>
<memory unit='KiB'>65536</memory><currentMemory unit='KiB'>65536</currentMemory><vcpu placement='static'>4</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os><features><acpi/><apic/></features>
<clock offset='utc'/><on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
<devices><interface type='network'><source network='{lab["libvirt"]["network"]}'/><model type='virtio'/></interface>
<graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1' passwd='vnc-s3cr'/>
<video><model type='vga'/></video><input type='tablet' bus='usb'/>
<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel></devices></domain>"""


def without(root: ET.Element, *paths: str) -> str:
    for path in paths:
        for parent in root.iter():
            for child in parent.findall(path):
                parent.remove(child)
    return ET.tostring(root, encoding="unicode")


# ------------------------------------------------------------------ C
def test_a_guest_made_elsewhere_keeps_its_console_password_and_everything_not_asked(
        lab: dict[str, Any], libvirt_conn: Any, run_module: Run, names: list[str]) -> None:
    name = unique("vnc")
    names.append(name)
    dom = libvirt_conn.defineXML(virt_install_like(name, lab))
    before = ET.fromstring(secure(dom))
    assert before.find("./devices/graphics").get("passwd") == "vnc-s3cr"

    result = run_module("guest", {"uri": lab["libvirt"]["uri"], "name": name, "autostart": True, "vcpus": 2})
    assert result["changed"] is True and {c["field"] for c in result["changes"]} == {"autostart", "vcpus"}, result
    assert "vnc-s3cr" not in repr(result), "a console password reached the results"
    after = ET.fromstring(secure(dom))
    assert after.find("./devices/graphics").get("passwd") == "vnc-s3cr", "the update removed the console password"
    assert dom.autostart() == 1 and after.find("vcpu").get("current") == "2"
    # Nothing else changed: the same XML once the vCPU element is set aside.
    assert without(after, "vcpu") == without(before, "vcpu")
    assert run_module("guest", {"uri": lab["libvirt"]["uri"], "name": name, "autostart": True,
                                "vcpus": 2})["changed"] is False
    info = run_module("guest_info", {"uri": lab["libvirt"]["uri"], "name": name})
    assert "vnc-s3cr" not in repr(info)


def test_an_autostart_only_change_makes_no_define(
        lab: dict[str, Any], libvirt_conn: Any, names: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    name = unique("auto")
    names.append(name)
    libvirt_conn.defineXML(virt_install_like(name, lab))
    from ansible_collections.virtfleet.core.plugins.module_utils._converge import RunOptions, converge

    defines: list[str] = []
    real = libvirt.virConnect.defineXML
    monkeypatch.setattr(libvirt.virConnect, "defineXML", lambda self, xml: defines.append(xml) or real(self, xml))
    with LibvirtBackend(parse_endpoint(lab["libvirt"]["uri"]), 10) as backend:
        results = converge(backend, [GuestSpec(name=name, autostart=True, tags={"k": "v"})], Placement(),
                           RunOptions())
    assert results[0].changed and not results[0].failed, results[0]
    assert defines == [], "autostart/tags re-defined the whole domain"
    assert libvirt_conn.lookupByName(name).autostart() == 1


# ------------------------------------------------------------------ A
@pytest.mark.parametrize("disk", ["virtfleet-cidata", "vdb", "sda", "hdc", "nvme0n1", "root.v1"])
def test_disk_names_that_cannot_round_trip_are_refused_with_one_line(
        lab: dict[str, Any], libvirt_conn: Any, run_module: Run, names: list[str], disk: str) -> None:
    name = unique("dname")
    names.append(name)
    result = run_module("guest", {**base_args(lab), **spec(name, lab, disks=[{"name": "root", "size_gib": 0.01},
                                                                             {"name": disk, "size_gib": 0.01}])})
    assert result["_status"] == "FAILED!" and "\n" not in result["msg"], result
    assert name in result["msg"] and f"disks[1].name='{disk}'" in result["msg"]
    assert not exists(libvirt_conn, name) and volumes(libvirt_conn, lab, name) == set()


def test_what_libvirt_stored_is_compared_with_what_was_sent(
        lab: dict[str, Any], libvirt_conn: Any, names: list[str]) -> None:
    """Past the model's name check (as another caller could be): libvirtd drops the alias 'ua-root.v1'; the
    backend sees it in the stored definition, undefines the new domain and names guest and disk."""
    name = unique("alias")
    names.append(name)
    pool = lab["libvirt"]["pool"]
    new = GuestSpec(name=name, vcpus=1, memory_mib=64, firmware="bios", autostart=False, tags={},
                    disks=[DiskSpec(name="root.v1", size_gib=0.01, pool=pool, format="qcow2", bus="virtio")],
                    nics=[NicSpec(network=lab["libvirt"]["network"], mac="52:54:00:7a:00:01", model="virtio")])
    with LibvirtBackend(parse_endpoint(lab["libvirt"]["uri"]), 10) as backend:
        backend.capacity(Placement(pool=pool))
        with pytest.raises(EndpointError) as failure:
            backend.create_guest(new, Placement(pool=pool, domain_type=lab["domain_type"]), "virtfleet.core")
    assert f"guest '{name}' disk 'root.v1': libvirt dropped its alias 'ua-root.v1'" in str(failure.value)
    assert not exists(libvirt_conn, name) and volumes(libvirt_conn, lab, name) == set()


# ------------------------------------------------------------------ D
def test_lowered_memory_is_the_same_for_every_reader(
        lab: dict[str, Any], libvirt_conn: Any, run_module: Run, names: list[str]) -> None:
    name = unique("mem")
    names.append(name)
    run_module("guest", {**base_args(lab), **spec(name, lab, memory_mib=96)})
    lowered = run_module("guest", {**base_args(lab), **spec(name, lab, memory_mib=48)})
    assert lowered["changed"] is True
    root = ET.fromstring(libvirt_conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    assert root.findtext("memory") == root.findtext("currentMemory") == str(48 * 1024)
    facts = run_module("hypervisor_info", {"uri": lab["libvirt"]["uri"], "guests": True})
    discovered = next(g for g in facts["guests"] if g["name"] == name)
    listed = run_module("guest_info", {"uri": lab["libvirt"]["uri"], "name": name})["guests"][0]
    assert discovered["memory_mib"] == listed["memory_mib"] == 48

    def disks(guest: dict[str, Any]) -> list[tuple[str, Any]]:
        return [(d["name"], d["source"]) for d in guest["disks"]]

    assert disks(discovered) == disks(listed)


# ------------------------------------------------------------------ E
def test_a_disk_bus_the_host_cannot_do_is_refused_in_check_mode_and_in_the_run(
        lab: dict[str, Any], libvirt_conn: Any, run_module: Run, names: list[str]) -> None:
    name = unique("nvme")
    names.append(name)
    args = {**base_args(lab), **spec(name, lab, disks=[{"name": "root", "size_gib": 0.01, "bus": "nvme"}])}
    for check in (True, False):
        result = run_module("guest", args, check=check)
        assert result["_status"] == "FAILED!" and result.get("changed") is not True, result
        assert f"guest '{name}' disks[0].bus='nvme': this libvirt host cannot attach nvme disks" in result["msg"]
    assert not exists(libvirt_conn, name) and volumes(libvirt_conn, lab, name) == set()


# ------------------------------------------------------------------ B
class Killed(BaseException):
    """The run died here (no clean-up of ours runs, as with SIGKILL)."""


@pytest.mark.parametrize("point", ["volume", "seed-upload"])
def test_a_create_killed_part_way_is_converged_and_stays_removable(
        lab: dict[str, Any], libvirt_conn: Any, run_module: Run, names: list[str], point: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ansible_collections.virtfleet.core.plugins.module_utils._converge import RunOptions, converge
    from ansible_collections.virtfleet.core.plugins.module_utils._model import guest_spec_from_dict

    name = unique("kill")
    names.append(name)
    data = spec(name, lab, disks=[{"name": "root", "size_gib": 0.01}, {"name": "data", "size_gib": 0.01}],
                cloud_init={"meta_data": {"instance-id": name}})
    if point == "volume":
        monkeypatch.setattr(libvirt.virStoragePool, "createXML", lambda *_a: (x for x in ()).throw(Killed()))
    else:
        monkeypatch.setattr(libvirt.virStorageVol, "upload", lambda *_a: (x for x in ()).throw(Killed()))
    place = Placement(pool=lab["libvirt"]["pool"], domain_type=lab["domain_type"])
    with LibvirtBackend(parse_endpoint(lab["libvirt"]["uri"]), 10) as backend, pytest.raises(Killed):
        converge(backend, [guest_spec_from_dict(data)], place, RunOptions())
    monkeypatch.undo()
    assert exists(libvirt_conn, name), "the domain is defined first, knowing the volumes it is about to get"

    again = run_module("guest", {**base_args(lab), **data})
    assert again["_status"] != "FAILED!" and again["changed"] is True, again
    assert run_module("guest", {**base_args(lab), **data})["changed"] is False
    assert volumes(libvirt_conn, lab, name) == {f"{name}+root.qcow2", f"{name}+data.qcow2", f"{name}+cidata.iso"}
    run_module("guest", {**base_args(lab), "name": name, "state": "absent", "remove_storage": True})
    assert not exists(libvirt_conn, name) and volumes(libvirt_conn, lab, name) == set(), "something we made stayed"


def test_a_restart_that_could_not_start_the_guest_is_finished_by_the_next_present_run(
        lab: dict[str, Any], libvirt_conn: Any, run_module: Run, names: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    name = unique("restart")
    names.append(name)
    boot = {"kernel": lab["guest"]["kernel"], "initrd": lab["guest"]["initrd"], "cmdline": "console=ttyS0 quiet"}
    args = {**base_args(lab), **spec(name, lab, memory_mib=128, boot=boot), "state": "running"}
    assert run_module("guest", args)["changed"] is True
    with LibvirtBackend(parse_endpoint(lab["libvirt"]["uri"]), 10) as backend:
        current = next(s for s in backend.read_guests(Placement()) if s.spec.name == name)
        monkeypatch.setattr(libvirt.virDomain, "create",
                            lambda *_a: (x for x in ()).throw(libvirt.libvirtError("start refused (injected)")))
        with pytest.raises(EndpointError):
            backend.restart_guest(current, 2, True)
        monkeypatch.undo()
        left = next(s for s in backend.read_guests(Placement()) if s.spec.name == name)
    assert left.power_state == "stopped" and left.interrupted_restart is True
    finished = run_module("guest", {**args, "state": "present"})
    assert finished["changed"] is True and libvirt_conn.lookupByName(name).isActive(), finished
    assert run_module("guest", {**args, "state": "present"})["changed"] is False
