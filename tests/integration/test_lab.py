# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""The lab itself answers: libvirt runs domains, vcsim speaks vSphere, sushy speaks Redfish."""

from __future__ import annotations

import json
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import libvirt
import pytest
from pyVmomi import SoapStubAdapter, vim

import lab as lab_module

UNVERIFIED = ssl._create_unverified_context()


def service_content(address: str, port: int) -> Any:
    stub = SoapStubAdapter(host=address, port=port, sslContext=UNVERIFIED)
    return vim.ServiceInstance("ServiceInstance", stub).RetrieveContent()


def test_libvirt_defines_starts_and_destroys_a_domain(lab: dict[str, Any], libvirt_conn: Any) -> None:
    name = "vftest-lab-smoke"
    xml = lab_module.domain_xml(name, lab["domain_type"], memory_mib=32)
    dom = libvirt_conn.defineXML(xml)
    try:
        assert not dom.isActive()
        dom.create()
        assert dom.isActive()
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        root = dom.XMLDesc(0)
        assert f"type='{lab['domain_type']}'" in root
        dom.destroy()
        assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    with pytest.raises(libvirt.libvirtError):
        libvirt_conn.lookupByName(name)


def test_lab_guest_boots_and_reaches_its_init(lab: dict[str, Any], libvirt_conn: Any) -> None:
    """The tiny guest really boots under the chosen accelerator and runs our init."""
    console = lab_module.LOG / "vftest-lab-boot.console"
    console.unlink(missing_ok=True)
    dom = libvirt_conn.createXML(
        lab_module.domain_xml("vftest-lab-boot", lab["domain_type"], 128, kernel=True, console_log=console), 0
    )
    try:
        deadline = time.monotonic() + 90
        text = ""
        while time.monotonic() < deadline and "virtfleet-guest: done" not in text:
            time.sleep(0.25)
            text = console.read_text(errors="replace") if console.exists() else ""
        assert "virtfleet-guest: booted" in text
        assert "virtfleet-guest: no seed" in text  # no seed disk attached here
    finally:
        dom.destroy()


def test_lab_pool_and_network_exist(lab: dict[str, Any], libvirt_conn: Any) -> None:
    pool = libvirt_conn.storagePoolLookupByName(lab["libvirt"]["pool"])
    assert pool.isActive()
    net = libvirt_conn.networkLookupByName(lab["libvirt"]["network"])
    assert net.isActive()
    assert "<ip" not in net.XMLDesc(0)  # isolated: no address, nothing routed off the bridge


@pytest.mark.parametrize(("name", "api_type", "product"), [
    ("esx01", "HostAgent", "embeddedEsx"),
    ("esx02", "HostAgent", "embeddedEsx"),
    ("vcenter", "VirtualCenter", "vpx"),
])
def test_vcsim_endpoint_identifies_itself(lab: dict[str, Any], name: str, api_type: str, product: str) -> None:
    ep = lab["vcsim"][name]
    assert ep["address"].startswith("127.")
    about = service_content(ep["address"], ep["port"]).about
    assert about.apiType == api_type
    assert about.productLineId == product
    assert about.version.startswith("6.")


def test_vcsim_accepts_the_lab_credentials_only(lab: dict[str, Any]) -> None:
    ep = lab["vcsim"]["esx01"]
    content = service_content(ep["address"], ep["port"])
    session = content.sessionManager.Login(lab["username"], lab["password"])
    assert session.userName == lab["username"]
    content.sessionManager.Logout()
    with pytest.raises(vim.fault.InvalidLogin):
        content.sessionManager.Login(lab["username"], "not-the-password")
    with pytest.raises(vim.fault.NotAuthenticated):
        content.rootFolder.childEntity  # noqa: B018 - a property read that needs a session


def test_sushy_lists_the_lab_domains_as_systems(lab: dict[str, Any]) -> None:
    url = lab["redfish"]["url"]
    assert "//127." in url
    with urllib.request.urlopen(f"{url}/redfish/v1/Systems", timeout=10) as resp:
        body = json.load(resp)
    assert body["Members@odata.count"] >= len(lab["libvirt"]["domains"])
    ids = {m["@odata.id"].rsplit("/", 1)[-1] for m in body["Members"]}
    assert len(ids) == body["Members@odata.count"]


def test_lab_up_is_idempotent(lab: dict[str, Any]) -> None:
    pids = {p.stem: p.read_text() for p in lab_module.RUN.glob("*.pid")}
    again = lab_module.up()
    assert {p.stem: p.read_text() for p in lab_module.RUN.glob("*.pid")} == pids
    assert again["password"] == lab["password"]


def test_lab_sshd_takes_the_lab_key_only_on_its_own_address(lab: dict[str, Any]) -> None:
    ssh = lab["libvirt"]["ssh"]
    assert ssh["uri"] == f"qemu+libssh://{ssh['user']}@{ssh['host']}:{ssh['port']}/system"
    assert ssh["host"].startswith("127.")
    for path in (ssh["private_key"], ssh["known_hosts"]):
        assert Path(path).stat().st_mode & 0o077 == 0
    assert Path(ssh["known_hosts"]).read_text().startswith(f"[{ssh['host']}]:{ssh['port']} ssh-ed25519 ")
    assert "PRIVATE KEY" not in lab_module.STATE_FILE.read_text()  # paths only
    # What sshd itself makes of its configuration.
    config = lab_module.ssh_files().config
    effective = subprocess.run(["/usr/sbin/sshd", "-T", "-f", str(config)], capture_output=True, text=True,
                               check=True).stdout.splitlines()
    for line in (f"listenaddress {ssh['host']}:{ssh['port']}", "passwordauthentication no",
                 "kbdinteractiveauthentication no", "permitrootlogin without-password", "usepam no",
                 "allowtcpforwarding no", "allowagentforwarding no", "x11forwarding no", "permittunnel no",
                 "strictmodes no"):
        assert line in effective
    assert sum(1 for line in effective if line.startswith("listenaddress ")) == 1
    client = ["ssh", "-F", "/dev/null", "-p", str(ssh["port"]), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
              "-o", f"UserKnownHostsFile={ssh['known_hosts']}", "-o", "StrictHostKeyChecking=yes"]
    ok = subprocess.run([*client, "-i", ssh["private_key"], f"{ssh['user']}@{ssh['host']}", "true"],
                        capture_output=True, text=True, timeout=30, check=False)
    assert ok.returncode == 0, ok.stderr
    no_key = subprocess.run([*client, "-o", "PubkeyAuthentication=no", f"{ssh['user']}@{ssh['host']}", "true"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert no_key.returncode == 255 and "Permission denied (publickey)" in no_key.stderr
