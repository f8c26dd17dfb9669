# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""The roles take validate_certs from VMWARE_VALIDATE_CERTS (as AWX's credentials inject it) and check it
strictly: a word that is no boolean fails the role's argument check naming the variable, before any task runs;
it never turns certificate checks off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("role, variable", [("guests", "guests_validate_certs"), ("fleet", "fleet_validate_certs")])
@pytest.mark.parametrize("value", ["nope", "TRUE X"])
def test_a_word_that_is_no_boolean_fails_the_role(tmp_path: Path, role: str, variable: str, value: str) -> None:
    play = tmp_path / "play.yml"
    marker = tmp_path / "reached"
    play.write_text(yaml.safe_dump([{
        "name": "the role", "hosts": "localhost", "gather_facts": False, "connection": "local",
        "tasks": [{"ansible.builtin.include_role": {"name": f"virtfleet.core.{role}"},
                   "vars": {"fleet_file": str(tmp_path / "none.yml"), "guests_uri": "test:///default"}},
                  {"ansible.builtin.file": {"path": str(marker), "state": "touch"}}]}]))
    env = dict(os.environ, VMWARE_VALIDATE_CERTS=value, ANSIBLE_COLLECTIONS_PATH=str(REPO / ".build"),
               ANSIBLE_PYTHON_INTERPRETER=sys.executable, ANSIBLE_NOCOLOR="1", ANSIBLE_LOCALHOST_WARNING="0",
               ANSIBLE_INVENTORY_UNPARSED_WARNING="0")
    proc = subprocess.run([str(BIN / "ansible-playbook"), "-i", "localhost,", str(play)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert variable in proc.stdout and "bool" in proc.stdout, proc.stdout[-2000:]
    assert not marker.exists()
