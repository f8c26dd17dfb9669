# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""The hypervisors inventory plugin and hypervisor_info module against the real lab."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import libvirt
import pytest
import yaml
from conftest import unwrap

import lab as lab_module

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def write_inventory(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "lab.hypervisors.yml"
    path.write_text(yaml.safe_dump(dict({"plugin": "virtfleet.core.hypervisors", "validate_certs": False}, **config)))
    return path


def inventory(path: Path, env: dict[str, str], *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """ansible-inventory --list; the JSON goes to <path>.json (stdout also carries -v chatter)."""
    out = path.with_suffix(".json")
    out.unlink(missing_ok=True)
    proc = subprocess.run([str(BIN / "ansible-inventory"), "-i", str(path), "--list", "--output", str(out), *extra],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    if check:
        assert proc.returncode == 0, proc.stderr
        assert "Failed to parse" not in proc.stderr + proc.stdout, proc.stderr
    return proc


def read_listing(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = unwrap(json.loads(path.with_suffix(".json").read_text()))
    return data


def listing(path: Path, env: dict[str, str], *extra: str) -> tuple[dict[str, Any], str]:
    proc = inventory(path, env, *extra)
    return read_listing(path), proc.stdout + proc.stderr


def group_hosts(data: dict[str, Any], group: str) -> set[str]:
    return set(data.get(group, {}).get("hosts", []))


def hostvars(data: dict[str, Any], host: str) -> dict[str, Any]:
    return dict(data["_meta"]["hostvars"][host])


def holder_group(hypervisor: str) -> str:
    """The group of a hypervisor's guests: letters, digits and underscores, not starting with a digit."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", f"guests_of_{hypervisor}")
    assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)
    return name


def vms_on(lab: dict[str, Any], address: str) -> dict[str, bool]:
    """{VM name: powered on} of one vcsim ESXi, read through pyVmomi (not through this collection's reader)."""
    from pyVmomi import vim

    from ansible_collections.virtfleet.core.plugins.module_utils._endpoints import (
        Credentials,
        parse_endpoint,
        with_credentials,
    )
    from ansible_collections.virtfleet.core.plugins.module_utils.backends.vsphere import VsphereBackend

    endpoint = with_credentials(parse_endpoint(f"vsphere://{address}"),
                                Credentials(lab["username"], lab["password"], False))
    with VsphereBackend(endpoint, 10) as backend:
        content = backend._login()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        return {vm.name: vm.runtime.powerState == "poweredOn" for vm in view.view if not vm.config.template}


@pytest.fixture()
def lab_env(lab: dict[str, Any], ansible_env: dict[str, str]) -> dict[str, str]:
    """Credentials reach the plugin the AWX way: VMWARE_USER / VMWARE_PASSWORD."""
    return dict(ansible_env, VMWARE_USER=lab["username"], VMWARE_PASSWORD=lab["password"])


def test_whole_lab_in_one_inventory(lab: dict[str, Any], lab_env: dict[str, str], libvirt_conn: Any,
                                    tmp_path: Path) -> None:
    vc = lab["vcsim"]
    path = write_inventory(tmp_path, {
        "endpoints": [
            {"uri": f"vsphere://{vc['esx01']['address']}"},
            {"uri": f"vsphere://{vc['esx02']['address']}"},
            {"uri": f"vsphere://{vc['vcenter']['address']}"},
            {"uri": "qemu:///system"},
            {"uri": lab["redfish"]["url"].replace("http://", "redfish+http://")},
        ],
        "guests": True,
    })
    data, stderr = listing(path, lab_env, "-v")
    esx01, esx02, vcenter = (vc[n]["address"] for n in ("esx01", "esx02", "vcenter"))
    kvm_host = libvirt_conn.getHostname()

    # ESXi servers by the address the user wrote; vCenter hosts by their vCenter names, in cluster groups.
    assert {esx01, esx02} <= group_hosts(data, "esxi")
    assert {"DC0_H0", "DC0_C0_H0", "DC0_C0_H1"} <= group_hosts(data, "esxi")
    assert group_hosts(data, "cluster_DC0_C0") == {"DC0_C0_H0", "DC0_C0_H1"}
    assert group_hosts(data, "vcenters") == {vcenter}
    assert group_hosts(data, "bmcs") == {"127.0.10.20"}
    assert kvm_host in group_hosts(data, "hypervisors")
    assert kvm_host in group_hosts(data, "kvm") | group_hosts(data, "qemu")
    assert group_hosts(data, "unreachable") == set()

    hv = hostvars(data, esx01)["virtfleet_hypervisor"]
    assert hv["type"] == "esxi" and hv["api"] == "vsphere" and hv["manager"] is None
    assert hv["product"].startswith("VMware ESXi") and hv["version"] and hv["build"]
    assert hv["storage"] and hv["storage"][0]["capacity_gib"] > 0
    # Guest counts and names agree with a direct read of each ESXi (other runs, e.g. `make demo`, add guests).
    for address in (esx01, esx02):
        direct = vms_on(lab, address)
        assert len(direct) >= 2, f"the lab's {address} should hold its vcsim VMs"
        counts = hostvars(data, address)["virtfleet_hypervisor"]["guests"]
        assert counts == {"total": len(direct), "running": sum(direct.values()),
                          "stopped": len(direct) - sum(direct.values())}
        listed = {hostvars(data, h)["virtfleet_guest"]["name"] for h in group_hosts(data, holder_group(address))}
        assert listed == set(direct)
    managed = hostvars(data, "DC0_C0_H0")["virtfleet_hypervisor"]
    assert managed["manager"] == vcenter and managed["cluster"] == "DC0_C0" and managed["datacenter"] == "DC0"

    # libvirt facts agree with what libvirt itself says.
    kvm = hostvars(data, kvm_host)["virtfleet_hypervisor"]
    assert kvm["memory_mib"] == libvirt_conn.getInfo()[1]
    domains = libvirt_conn.listAllDomains(0)
    assert kvm["guests"]["total"] == len(domains)
    assert kvm["guests"]["running"] == sum(1 for d in domains if d.isActive())
    assert lab["libvirt"]["pool"] in [s["name"] for s in kvm["storage"]]
    assert lab["libvirt"]["network"] in kvm["networks"]

    # Guests: libvirt domains with state groups and the holder group; vcsim's ESX-mode VMs have the same
    # names on both ESXi servers, so they are disambiguated with @hypervisor and a warning.
    assert "vflab-web-01" in group_hosts(data, "running")
    assert "vflab-db-01" in group_hosts(data, "stopped")
    holder = group_hosts(data, holder_group(kvm_host))
    assert set(lab["libvirt"]["domains"]) <= holder
    web = hostvars(data, "vflab-web-01")["virtfleet_guest"]
    dom = libvirt_conn.lookupByName("vflab-web-01")
    assert web["uuid"] == dom.UUIDString() and web["hypervisor"] == kvm_host
    assert web["nics"][0]["network"] == lab["libvirt"]["network"]
    assert f"ha-host_VM0@{esx01}" in group_hosts(data, "guests")
    assert f"ha-host_VM0@{esx02}" in group_hosts(data, "guests")
    assert "ha-host_VM0" not in data["_meta"]["hostvars"]
    assert "not unique" in stderr
    # -v shows progress per endpoint with timing.
    assert f"{esx01}: esxi" in stderr and "s (" in stderr
    # Facts from hypervisors are marked unsafe (so never templated); the password is nowhere.
    raw = json.loads(path.with_suffix(".json").read_text())
    assert raw["_meta"]["hostvars"][esx01]["virtfleet_hypervisor"]["type"] == {"__ansible_unsafe": "esxi"}
    assert lab["password"] not in json.dumps(data) + stderr


def test_probe_finds_vsphere_libvirt_and_bmc_in_a_loopback_range(lab: dict[str, Any], lab_env: dict[str, str],
                                                                 tmp_path: Path) -> None:
    if not lab["libvirt"]["tcp_uri"]:
        pytest.skip("the lab's libvirtd is not the lab's own (no TCP listener)")
    path = write_inventory(tmp_path, {
        # 127.0.10.1-30: vCenter .10, ESXi .11 and .12, BMC .20:8000, libvirt .30:16509, nothing elsewhere.
        "endpoints": [{"probe": "127.0.10.0/27", "ports": [443, 8000, 16509]}],
        "timeout": 5,
        "allow_plaintext": True,  # the lab's BMC answers plain http, its libvirt plain TCP
    })
    data, stderr = listing(path, lab_env, "-v")
    hosts = group_hosts(data, "hypervisors")
    assert {"127.0.10.11", "127.0.10.12", "127.0.10.30", "DC0_H0"} <= hosts
    assert group_hosts(data, "vcenters") == {"127.0.10.10"}
    assert group_hosts(data, "bmcs") == {"127.0.10.20"}
    assert hostvars(data, "127.0.10.30")["virtfleet_hypervisor"]["api"] == "libvirt"
    # Addresses where nothing answers are not guessed into the inventory.
    assert not any(h.startswith("127.0.10.") and h not in ("127.0.10.10", "127.0.10.11", "127.0.10.12",
                                                           "127.0.10.20", "127.0.10.30")
                   for h in data["_meta"]["hostvars"])
    assert "probing 30 address(es)" in stderr


def test_down_endpoint_is_isolated_and_strict_fails(lab: dict[str, Any], lab_env: dict[str, str],
                                                    tmp_path: Path) -> None:
    esx01 = lab["vcsim"]["esx01"]["address"]
    config = {"endpoints": [{"uri": "vsphere://127.0.10.99"}, {"uri": f"vsphere://{esx01}"}], "timeout": 3}
    data, _out = listing(write_inventory(tmp_path, config), lab_env)
    assert group_hosts(data, "unreachable") == {"127.0.10.99"}
    assert "connection refused" in hostvars(data, "127.0.10.99")["virtfleet_error"]
    assert esx01 in group_hosts(data, "esxi")

    strict = dict(config, strict=True)
    env = dict(lab_env, ANSIBLE_INVENTORY_UNPARSED_FAILED="1")
    proc = inventory(write_inventory(tmp_path, strict), env, check=False)
    assert proc.returncode != 0
    assert "vsphere://127.0.10.99" in proc.stderr and "connection refused" in proc.stderr


def test_wrong_credentials_are_unreachable_with_a_reason_and_no_password(lab: dict[str, Any],
                                                                         ansible_env: dict[str, str],
                                                                         tmp_path: Path) -> None:
    esx01 = lab["vcsim"]["esx01"]["address"]
    wrong = "wrong-Pa55word-4-test"
    path = write_inventory(tmp_path, {
        "endpoints": [{"uri": f"vsphere://{esx01}"}],
        "credentials": [{"match": "127.0.10.*", "username": "root", "password": wrong}],
    })
    proc = inventory(path, ansible_env, "-vvv")
    data = read_listing(path)
    assert group_hosts(data, "unreachable") == {esx01}
    assert "login refused for user 'root'" in hostvars(data, esx01)["virtfleet_error"]
    assert wrong not in proc.stdout + proc.stderr
    assert lab["password"] not in proc.stdout + proc.stderr


def test_cache_hit_contacts_nothing_and_flush_cache_does(lab: dict[str, Any], lab_env: dict[str, str],
                                                         tmp_path: Path) -> None:
    """A private vcsim answers the first run; it is gone for the second, which is served from the cache."""
    ep = lab_module.VcsimEndpoint("cachetest", "127.0.10.50", "esx", ("-vms", "1"))
    lab_module.start_vcsim(ep, lab["password"], name="vcsim-cachetest")
    try:
        lab_module.wait_for("cachetest vcsim", lambda: lab_module.vcsim_answers(ep.address, ep.port))
        path = write_inventory(tmp_path, {
            "endpoints": [{"uri": f"vsphere://{ep.address}"}],
            "guests": True,
            "cache": True,
            "cache_plugin": "ansible.builtin.jsonfile",
            "cache_connection": str(tmp_path / "cache"),
        })
        first, _out = listing(path, lab_env)
        assert ep.address in group_hosts(first, "esxi")
    finally:
        lab_module.stop_pid("vcsim-cachetest")
    assert not lab_module.port_open(ep.address, ep.port)
    start = time.monotonic()
    second, stderr = listing(path, lab_env, "-v")
    assert "cache hit; nothing contacted" in stderr
    assert second == first
    assert time.monotonic() - start < 30
    cached = "".join(p.read_text() for p in (tmp_path / "cache").iterdir())
    assert lab["password"] not in cached and "password" not in cached
    flushed, _out = listing(path, lab_env, "--flush-cache")
    assert group_hosts(flushed, "unreachable") == {ep.address}


def test_guest_name_with_a_template_is_never_templated(lab: dict[str, Any], ansible_env: dict[str, str],
                                                       libvirt_conn: Any, tmp_path: Path) -> None:
    name = "vftest-{{ 6 * 7 }}"
    dom = libvirt_conn.defineXML(lab_module.domain_xml(name, lab["domain_type"], 32))
    try:
        path = write_inventory(tmp_path, {"endpoints": ["qemu:///system"], "guests": True})
        playbook = tmp_path / "show.yml"
        playbook.write_text(yaml.safe_dump([{
            "name": "show", "hosts": "stopped", "gather_facts": False, "connection": "local",
            "tasks": [{"name": "print", "ansible.builtin.debug": {"msg": "NAME=[{{ virtfleet_guest.name }}]"}}],
        }]))
        proc = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(path), str(playbook)],
                              capture_output=True, text=True, env=ansible_env, timeout=300, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "NAME=[vftest-{{ 6 * 7 }}]" in proc.stdout
        assert "vftest-42" not in proc.stdout
    finally:
        dom.undefine()


def test_hypervisor_info_module(lab: dict[str, Any], ansible_env: dict[str, str], tmp_path: Path) -> None:
    esx02 = lab["vcsim"]["esx02"]["address"]
    playbook = tmp_path / "info.yml"
    playbook.write_text(yaml.safe_dump([{
        "name": "info", "hosts": "localhost", "gather_facts": False, "connection": "local",
        "module_defaults": {"virtfleet.core.hypervisor_info": {
            "username": lab["username"], "password": lab["password"], "validate_certs": False}},
        "tasks": [
            {"name": "esx", "virtfleet.core.hypervisor_info": {"uri": f"vsphere://{esx02}", "guests": True},
             "register": "esx"},
            {"name": "kvm", "virtfleet.core.hypervisor_info": {"uri": "qemu:///system"}, "register": "kvm"},
            {"name": "wrong", "virtfleet.core.hypervisor_info": {"uri": f"vsphere://{esx02}", "password": "nope-x1"},
             "register": "wrong", "ignore_errors": True},
            {"name": "noscheme", "virtfleet.core.hypervisor_info": {"uri": "esx02.example.com"},
             "register": "noscheme", "ignore_errors": True},
            {"name": "dump", "ansible.builtin.copy": {
                "content": "{{ {'esx': esx, 'kvm': kvm, 'wrong': wrong, 'noscheme': noscheme} | to_json }}",
                "dest": str(tmp_path / "out.json"), "mode": "0600"}},
        ],
    }]))
    proc = subprocess.run([str(BIN / "ansible-playbook"), "-i", "localhost,", "--check", str(playbook)],
                          capture_output=True, text=True, env=ansible_env, timeout=300, check=False)
    # --check: the module runs (read-only); copy does not write, so run the dump for real afterwards.
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run([str(BIN / "ansible-playbook"), "-i", "localhost,", str(playbook)],
                          capture_output=True, text=True, env=ansible_env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["esx"]["changed"] is False
    assert out["esx"]["identity"]["type"] == "esxi"
    assert out["esx"]["hypervisors"][0]["name"] == esx02
    # What esx02 has now, read directly (not a fixed count that another command's guests would change).
    assert sorted(g["name"] for g in out["esx"]["guests"]) == sorted(vms_on(lab, esx02)) and out["esx"]["guests"]
    assert out["kvm"]["hypervisors"][0]["api"] == "libvirt" and out["kvm"]["guests"] == []
    assert out["wrong"]["failed"] and "login refused" in out["wrong"]["msg"]
    assert out["noscheme"]["failed"] and "uri='esx02.example.com': no scheme" in out["noscheme"]["msg"]
    assert lab["password"] not in proc.stdout + proc.stderr + json.dumps(out)


def test_libvirt_guest_counts_follow_a_domain_start(lab: dict[str, Any], ansible_env: dict[str, str],
                                                    libvirt_conn: Any, tmp_path: Path) -> None:
    """Not a hard-coded answer: start a domain and see the running count and groups change."""
    path = write_inventory(tmp_path, {"endpoints": ["qemu:///system"], "guests": True})
    before, _out = listing(path, ansible_env)
    dom = libvirt_conn.defineXML(lab_module.domain_xml("vftest-count", lab["domain_type"], 32))
    try:
        dom.create()
        after, _out = listing(path, ansible_env)
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    host = libvirt_conn.getHostname()
    b, a = (hostvars(x, host)["virtfleet_hypervisor"]["guests"] for x in (before, after))
    assert a["total"] == b["total"] + 1 and a["running"] == b["running"] + 1
    assert "vftest-count" in group_hosts(after, "running")
    assert hostvars(after, "vftest-count")["virtfleet_guest"]["power_state"] == "running"
    with pytest.raises(libvirt.libvirtError):
        libvirt_conn.lookupByName("vftest-count")
