# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""Molecule's default scenario fails in create, in one line naming the endpoint, when part of the lab is down.

The Redfish emulator is stopped by its PID file and started again by the lab's own `up`, so the lab is left
as it was found. The scenarios themselves run in `make molecule`.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

from conftest import BIN, REPO

import lab as lab_module


def test_create_fails_in_one_line_when_the_lab_is_down(lab: dict[str, Any], ansible_env: dict[str, str],
                                                       tmp_path: Path) -> None:
    assert lab_module.stop_pid("sushy"), "the lab's sushy-emulator was not running"
    try:
        env = dict(ansible_env, PATH=f"{BIN}:{os.environ['PATH']}", MOLECULE_EPHEMERAL_DIRECTORY=str(tmp_path),
                   VIRTFLEET_LAB_START="false")
        proc = subprocess.run([str(BIN / "molecule"), "create", "-s", "default"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300, check=False)
    finally:
        subprocess.run([str(BIN / "python"), str(REPO / "tests" / "lab" / "lab.py"), "up"], check=True,
                       stdout=subprocess.DEVNULL)
    out = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)
    assert proc.returncode != 0, out[-3000:]
    failed = [line for line in out.splitlines() if '"msg": "lab: down:' in line]
    assert len(failed) == 1, out[-3000:]
    assert f"bmc at {lab['redfish']['url']}/redfish/v1" in failed[0] and "make lab-up" in failed[0]
    assert "vcenter" not in failed[0] and "libvirt" not in failed[0]
    assert lab["password"] not in out
    # create failed, so no later step ran, and molecule did not mark the lab as its own.
    assert not (tmp_path / "lab-started-by-molecule").exists()
