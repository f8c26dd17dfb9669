# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""libvirt over SSH against the lab's sshd, handed over the way an AWX "libvirt over SSH" credential does it: the
URI with its user, and the private key and the known_hosts line as files of the job (libssh transport)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_discovery import group_hosts, holder_group, hostvars, inventory, listing, read_listing, write_inventory

pytestmark = pytest.mark.lab

HOST_KEY_FAILED = "SSH HOST KEY VERIFICATION FAILED"


@pytest.fixture()
def injected(lab: dict[str, Any], tmp_path: Path) -> dict[str, Path]:
    """The lab user's private key and the lab sshd's known_hosts line, copied into the job's directory (0600)."""
    ssh = lab["libvirt"]["ssh"]
    job = tmp_path / "env"
    job.mkdir(mode=0o700)
    files = {}
    for name, source in (("ssh_key_data", ssh["private_key"]), ("known_hosts", ssh["known_hosts"])):
        files[name] = job / name
        shutil.copyfile(source, files[name])
        files[name].chmod(0o600)
    return files


def ssh_uri(lab: dict[str, Any], key: Path, known_hosts: Path, extra: str = "") -> str:
    return f"{lab['libvirt']['ssh']['uri']}?keyfile={key}&known_hosts={known_hosts}&sshauth=privkey{extra}"


def key_material(lab: dict[str, Any], *host_keys: str) -> list[str]:
    """What must never be shown: the lab user's private key (each line of it), and the host keys (base64) given."""
    private = Path(lab["libvirt"]["ssh"]["private_key"]).read_text().splitlines()
    return [line for line in private if len(line) > 20 and "PRIVATE KEY" not in line] + ["PRIVATE KEY", *host_keys]


def host_key_in(known_hosts: Path) -> str:
    """The base64 key of a one-line known_hosts file ([host]:port type key)."""
    return known_hosts.read_text().split()[2]


def other_host_key(tmp_path: Path, lab: dict[str, Any]) -> Path:
    """A known_hosts file that names the lab sshd's address with another key."""
    key = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True,
                   stdin=subprocess.DEVNULL)
    kind, blob = key.with_name(key.name + ".pub").read_text().split()[:2]
    ssh = lab["libvirt"]["ssh"]
    wrong = tmp_path / "env" / "known_hosts_wrong"
    wrong.write_text(f"[{ssh['host']}]:{ssh['port']} {kind} {blob}\n")
    wrong.chmod(0o600)
    return wrong


@pytest.mark.parametrize("with_vmware_credential", [False, True])
def test_discovery_over_ssh_with_a_key_file_and_a_known_hosts_file(
        lab: dict[str, Any], ansible_env: dict[str, str], injected: dict[str, Path], tmp_path: Path,
        with_vmware_credential: bool) -> None:
    """validate_certs: true (the plugin's default, which the vcsim tests turn off); a VMware credential in the same
    job changes nothing here."""
    env = dict(ansible_env, VMWARE_USER=lab["username"], VMWARE_PASSWORD=lab["password"]) \
        if with_vmware_credential else ansible_env
    uri = ssh_uri(lab, injected["ssh_key_data"], injected["known_hosts"])
    path = write_inventory(tmp_path, {"endpoints": [{"uri": uri}], "guests": True, "validate_certs": True,
                                      "strict": True})
    data, output = listing(path, env, "-v")
    kvm = lab["libvirt"]["ssh"]["host"]  # a remote libvirt is named by the address written in its URI
    assert group_hosts(data, "hypervisors") == {kvm} and group_hosts(data, "unreachable") == set()
    facts = hostvars(data, kvm)["virtfleet_hypervisor"]
    assert facts["api"] == "libvirt" and facts["type"] in ("kvm", "qemu")
    assert set(lab["libvirt"]["domains"]) <= group_hosts(data, holder_group(kvm))
    assert "vflab-web-01" in group_hosts(data, "running")
    shown = output + path.with_suffix(".json").read_text()
    assert not [m for m in key_material(lab) if m in shown]
    assert lab["password"] not in shown
    assert injected["known_hosts"].read_text() == Path(lab["libvirt"]["ssh"]["known_hosts"]).read_text()


def test_hypervisor_info_over_ssh(lab: dict[str, Any], run_module: Any, injected: dict[str, Path]) -> None:
    result = run_module("hypervisor_info", {"uri": ssh_uri(lab, injected["ssh_key_data"], injected["known_hosts"]),
                                            "guests": True})
    assert result["_status"] == "SUCCESS", result
    assert result["hypervisors"][0]["api"] == "libvirt"
    assert set(lab["libvirt"]["domains"]) <= {g["name"] for g in result["guests"]}


def test_a_wrong_host_key_fails_with_one_line_naming_the_endpoint(
        lab: dict[str, Any], ansible_env: dict[str, str], injected: dict[str, Path], tmp_path: Path) -> None:
    wrong = other_host_key(tmp_path, lab)
    before = wrong.read_text()
    uri = ssh_uri(lab, injected["ssh_key_data"], wrong)
    host = lab["libvirt"]["ssh"]["host"]
    never = key_material(lab, host_key_in(wrong), host_key_in(injected["known_hosts"]))

    # Not strict: the endpoint is unreachable with the reason; nothing of it is in the inventory.
    config = {"endpoints": [{"uri": uri}], "guests": True, "validate_certs": True}
    data, output = listing(write_inventory(tmp_path, config), ansible_env)
    assert group_hosts(data, "unreachable") == {host}
    reason = hostvars(data, host)["virtfleet_error"]
    assert HOST_KEY_FAILED in reason and "\n" not in reason
    assert group_hosts(data, "hypervisors") == set() and not group_hosts(data, holder_group(host))

    # Strict: the run fails, with one line that names the endpoint and the reason, and no traceback.
    path = write_inventory(tmp_path, dict(config, strict=True))
    proc = inventory(path, dict(ansible_env, ANSIBLE_INVENTORY_UNPARSED_FAILED="1"), check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if HOST_KEY_FAILED in line]
    message = min(lines, key=len)  # Ansible shows the plugin's message twice, once after "Failed to parse ..."
    assert all(line.endswith(message) for line in lines), proc.stderr
    assert message.startswith(f"virtfleet.core.hypervisors: endpoint {uri} failed: libvirt: authentication failed: "
                              f"!!! {HOST_KEY_FAILED} !!!: Identity of host '{host}:")
    assert "Traceback" not in proc.stderr + proc.stdout
    shown = output + json.dumps(data) + proc.stderr + proc.stdout
    assert not [m for m in never if m in shown]
    assert wrong.read_text() == before  # normal mode never writes the file


def test_known_hosts_verify_ignore_is_refused_before_connecting(
        lab: dict[str, Any], ansible_env: dict[str, str], injected: dict[str, Path], tmp_path: Path) -> None:
    """A listener stands in for an SSH server: the refusal comes before anything connects to it."""
    wrong = other_host_key(tmp_path, lab)
    before = wrong.read_text()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        port = listener.getsockname()[1]
        for mode in ("ignore", "auto"):
            uri = (f"qemu+libssh://root@127.0.0.1:{port}/system?keyfile={injected['ssh_key_data']}"
                   f"&known_hosts={wrong}&known_hosts_verify={mode}")
            path = write_inventory(tmp_path, {"endpoints": [{"uri": uri}], "validate_certs": True})
            proc = inventory(path, dict(ansible_env, ANSIBLE_INVENTORY_UNPARSED_FAILED="1"), check=False)
            assert proc.returncode != 0
            assert f"endpoints[0].uri='qemu+libssh://root@127.0.0.1:{port}/system?" in proc.stderr
            assert f"known_hosts_verify={mode} " in proc.stderr and "while validate_certs is true" in proc.stderr
            assert "Traceback" not in proc.stderr + proc.stdout
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert wrong.read_text() == before  # auto would have added the key it was shown

    # With validate_certs: false (the user's explicit choice) the same setting does reach the lab sshd, and
    # ignore then lets the wrong key through: what the refusal above stands guard against.
    uri = ssh_uri(lab, injected["ssh_key_data"], wrong, "&known_hosts_verify=ignore")
    path = write_inventory(tmp_path, {"endpoints": [{"uri": uri}], "validate_certs": False})
    inventory(path, ansible_env)
    assert group_hosts(read_listing(path), "hypervisors") == {lab["libvirt"]["ssh"]["host"]}
