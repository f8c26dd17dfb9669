# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""Secrets given to the guest modules never come back: not in results, invocation, diffs or -vvv output.

Runs real ansible-playbook against the lab's libvirtd in check mode (nothing is created) with a sentinel in
cloud_init.user_data and in the role's password, and scans everything Ansible printed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SENTINEL = "vf-sentinel-Zq8xK2"
BIN = Path(sys.executable).parent


def playbook(tmp_path: Path, lab: dict[str, Any], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    guest = {"name": "vftest-secret-01", "vcpus": 1, "memory_mib": 64, "disks": [{"name": "root", "size_gib": 1}],
             "nics": [{"network": lab["libvirt"]["network"]}],
             "cloud_init": {"user_data": f"#cloud-config\npassword: {SENTINEL}\nchpasswd: {{expire: false}}\n",
                            "meta_data": {"instance-id": "vftest-secret-01"}}}
    play = [{
        "hosts": "localhost", "gather_facts": False,
        "connection": "local", "vars": {"ansible_python_interpreter": sys.executable},
        "tasks": [
            {"name": "guest module", "virtfleet.core.guest": {
                "uri": lab["libvirt"]["uri"], "datastore": lab["libvirt"]["pool"],
                "domain_type": lab["domain_type"], **guest}, "register": "r1"},
            {"name": "guests module", "virtfleet.core.guests": {
                "uri": lab["libvirt"]["uri"], "datastore": lab["libvirt"]["pool"],
                "domain_type": lab["domain_type"], "guests": [guest]}, "register": "r2"},
            {"name": "guests role", "ansible.builtin.include_role": {"name": "virtfleet.core.guests"},
             "vars": {"guests_uri": lab["libvirt"]["uri"], "guests_datastore": lab["libvirt"]["pool"],
                      "guests_domain_type": lab["domain_type"], "guests_list": [guest],
                      "guests_password": SENTINEL + "-pw"}},
            # What a later task, a callback or AWX's job events would see of the results, invocation included.
            {"name": "registered results", "check_mode": False, "ansible.builtin.copy": {
                "content": "{{ [r1, r2, guests_result] | to_json }}", "dest": str(tmp_path / "results.json"),
                "mode": "0600"}},
        ]}]
    path = tmp_path / "play.yml"
    path.write_text(json.dumps(play))
    return subprocess.run([str(BIN / "ansible-playbook"), "-i", "localhost,", "--check", "--diff", "-vvvv",
                           str(path)], env=env, capture_output=True, text=True, check=False)


@pytest.mark.lab
def test_cloud_init_user_data_and_passwords_never_appear_in_output(tmp_path: Path, lab: dict[str, Any],
                                                                   ansible_env: dict[str, str]) -> None:
    # ansible-core before 2.21 always returns the module's arguments as ``invocation``; 2.21 on request.
    proc = playbook(tmp_path, lab, {**ansible_env, "ANSIBLE_INJECT_INVOCATION": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert out.count("changed: [localhost]") >= 2, "the check-mode run must have reported the planned create"
    registered = (tmp_path / "results.json").read_text()
    assert '"module_args"' in registered and '"cloud_init"' in out, "no results to scan: this would prove nothing"
    assert SENTINEL not in out
    assert SENTINEL not in registered
