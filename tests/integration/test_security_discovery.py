# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""Security of discovery against the real lab: templated names through compose, hijack-proof names beside another
inventory source, plain text only when allowed, secrets never echoed, and a dead libvirt peer ends a call."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_discovery import BIN, group_hosts, hostvars, inventory, listing, read_listing, unwrap, write_inventory

import lab as lab_module

pytestmark = pytest.mark.lab


@pytest.fixture()
def domains(lab: dict[str, Any], libvirt_conn: Any) -> Iterator[Any]:
    """Define (stopped) libvirt domains with the names given; all are undefined afterwards."""
    made: list[Any] = []

    def define(*names: str) -> None:
        for name in names:
            made.append(libvirt_conn.defineXML(lab_module.domain_xml(name, lab["domain_type"], 32)))

    yield define
    for dom in made:
        dom.undefine()


def test_templated_guest_names_survive_compose_groups_and_keyed_groups(ansible_env: dict[str, str], domains: Any,
                                                                       tmp_path: Path) -> None:
    """ansible-inventory and ansible-playbook, as a user runs them: the names reach compose, groups and
    keyed_groups and a play's templating, and are never evaluated (the lookup would create MARKER)."""
    marker = tmp_path / "vfsec-pwned"
    maths, lookup = "vfsec-{{ 7919*7 }}", f"vfsec-{{{{ lookup('pipe', 'touch {marker.name}') }}}}"
    domains(maths, lookup)
    path = write_inventory(tmp_path, {
        "endpoints": ["qemu:///system"], "guests": True,
        "compose": {"vf_copy": "virtfleet_guest.name", "vf_label": "'x-' + virtfleet_guest.name"},
        "groups": {"vfsec_templated": "virtfleet_guest.name.startswith('vfsec-')"},
        "keyed_groups": [{"key": "virtfleet_guest.name", "prefix": "vfsec_n"}],
    })
    proc = subprocess.run([str(BIN / "ansible-inventory"), "-i", str(path), "--list", "--output", "out.json"],
                          capture_output=True, text=True, env=ansible_env, cwd=tmp_path, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "out.json").read_text())
    text = json.dumps(data)
    assert "55433" not in "".join(data) and "vfsec-55433" not in text
    assert group_hosts(data, "vfsec_templated") == {maths, lookup}
    playbook = tmp_path / "show.yml"
    playbook.write_text(yaml.safe_dump([{
        "name": "show", "hosts": "vfsec_templated", "gather_facts": False, "connection": "local",
        "tasks": [{"name": "print", "ansible.builtin.debug": {"msg": "COPY=[{{ vf_copy }}] LABEL=[{{ vf_label }}]"}}],
    }]))
    proc = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(path), str(playbook)], capture_output=True,
                          text=True, env=ansible_env, cwd=tmp_path, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "COPY=[vfsec-{{ 7919*7 }}] LABEL=[x-vfsec-{{ 7919*7 }}]" in proc.stdout
    assert "vfsec-55433" not in proc.stdout
    assert not marker.exists()


def test_guests_never_take_over_localhost_groups_or_another_sources_host(
        ansible_env: dict[str, str], libvirt_conn: Any, domains: Any, tmp_path: Path) -> None:
    kvm_host = libvirt_conn.getHostname()
    domains("localhost", "running", "vfsec-static")
    static = tmp_path / "static.yml"
    static.write_text(yaml.safe_dump({"all": {"hosts": {"vfsec-static": {"ansible_host": "192.0.2.99"}}}}))
    path = write_inventory(tmp_path, {"endpoints": ["qemu:///system"], "guests": True})
    out = tmp_path / "both.json"
    proc = subprocess.run([str(BIN / "ansible-inventory"), "-i", str(static), "-i", str(path), "--list",
                           "--output", str(out)], capture_output=True, text=True, env=ansible_env, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    data, output = unwrap(json.loads(out.read_text())), proc.stdout + proc.stderr
    assert hostvars(data, "vfsec-static") == {"ansible_host": "192.0.2.99"}
    for name in ("localhost", "running", "vfsec-static"):
        guest = hostvars(data, f"{name}@{kvm_host}")["virtfleet_guest"]
        assert guest["name"] == name
    assert "localhost" not in data["_meta"]["hostvars"]
    assert "running" not in data["_meta"]["hostvars"]
    assert kvm_host not in group_hosts(data, "running") and kvm_host in group_hosts(data, "hypervisors")
    assert f"running@{kvm_host}" in group_hosts(data, "stopped")
    assert "Invalid characters were found in group names" not in output
    assert "is taken or not unique" in output


def test_a_probe_sends_nothing_in_plain_text_unless_allowed(lab: dict[str, Any], ansible_env: dict[str, str],
                                                            tmp_path: Path) -> None:
    if not lab["libvirt"]["tcp_uri"]:
        pytest.skip("the lab's libvirtd is not the lab's own (no TCP listener)")
    env = dict(ansible_env, VMWARE_USER=lab["username"], VMWARE_PASSWORD=lab["password"])
    path = write_inventory(tmp_path, {"endpoints": [{"probe": "127.0.10.0/27", "ports": [443, 8000, 16509]}],
                                      "timeout": 5})
    data, output = listing(path, env, "-v")
    assert {"127.0.10.11", "127.0.10.12"} <= group_hosts(data, "hypervisors")
    assert group_hosts(data, "bmcs") == set()  # the lab's BMC answers plain http only
    assert "127.0.10.30" not in data["_meta"]["hostvars"]  # libvirt over plain TCP
    assert "127.0.10.30:16509" in output and "allow_plaintext: true" in output
    assert "redfish+http://" not in output and "qemu+tcp://" not in output
    assert lab["password"] not in output


def test_secrets_in_the_configuration_are_never_echoed(lab: dict[str, Any], ansible_env: dict[str, str],
                                                       tmp_path: Path) -> None:
    secret = "vfsec-Pa55-word"
    esx01 = lab["vcsim"]["esx01"]["address"]
    env = dict(ansible_env, ANSIBLE_INVENTORY_UNPARSED_FAILED="1")
    for config in ({"endpoints": [f"vsphere://{esx01}"], "vcenter_password": secret},
                   {"endpoints": [f"vsphere://root:{secret}@{esx01}"]}):
        path = write_inventory(tmp_path, config)
        proc = inventory(path, env, "-vvv", check=False)
        assert proc.returncode != 0
        assert secret not in proc.stdout + proc.stderr
    path = tmp_path / "info.yml"
    path.write_text(yaml.safe_dump([{
        "name": "info", "hosts": "localhost", "gather_facts": False, "connection": "local",
        "tasks": [{"name": "uri with a password", "virtfleet.core.hypervisor_info": {
            "uri": f"vsphere://root:{secret}@{esx01}", "validate_certs": False}}],
    }]))
    proc = subprocess.run([str(BIN / "ansible-playbook"), "-i", "localhost,", "-vvv", str(path)],
                          capture_output=True, text=True, env=ansible_env, timeout=300, check=False)
    assert proc.returncode != 0
    assert "a password in the URI is refused" in proc.stdout
    assert secret not in proc.stdout + proc.stderr


class FreezingProxy:
    """A TCP proxy to the lab's libvirtd that can stop forwarding: a peer that is alive but answers nothing."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.frozen = target, threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _addr = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                while self.frozen.is_set():
                    time.sleep(0.05)
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()


def test_a_libvirt_peer_that_stops_answering_ends_the_call(lab: dict[str, Any]) -> None:
    if not lab["libvirt"]["tcp_uri"]:
        pytest.skip("the lab's libvirtd is not the lab's own (no TCP listener)")
    from ansible_collections.virtfleet.core.plugins.module_utils._endpoints import parse_endpoint
    from ansible_collections.virtfleet.core.plugins.module_utils._errors import EndpointError
    from ansible_collections.virtfleet.core.plugins.module_utils.backends.libvirt import LibvirtBackend

    proxy = FreezingProxy(("127.0.10.30", 16509))
    backend = LibvirtBackend(parse_endpoint(f"qemu+tcp://127.0.0.1:{proxy.port}/system"), 2.0)
    outcome: list[Any] = []
    try:
        assert backend.identify().api == "libvirt"
        proxy.frozen.set()

        def call() -> None:
            try:
                outcome.append(backend.discover(guests=True))
            except EndpointError as exc:
                outcome.append(exc)

        start = time.monotonic()
        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(30)
        assert not worker.is_alive(), "the call still hangs 30 s after the peer stopped answering"
        assert isinstance(outcome[0], EndpointError) and "keepalive" in str(outcome[0])
        assert time.monotonic() - start < 15
    finally:
        proxy.frozen.clear()
        backend.close()
        proxy.close()


def test_probe_results_hold_no_credentials(lab: dict[str, Any], ansible_env: dict[str, str], tmp_path: Path) -> None:
    env = dict(ansible_env, VMWARE_USER=lab["username"], VMWARE_PASSWORD=lab["password"])
    path = write_inventory(tmp_path, {"endpoints": [{"probe": "127.0.10.8/29", "ports": [443]}], "timeout": 5,
                                      "cache": True, "cache_plugin": "ansible.builtin.jsonfile",
                                      "cache_connection": str(tmp_path / "cache")})
    inventory(path, env)
    data = read_listing(path)
    assert "127.0.10.11" in group_hosts(data, "esxi")
    cached = "".join(p.read_text() for p in (tmp_path / "cache").iterdir())
    assert lab["password"] not in cached + json.dumps(data)
