# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""Unit tests of the lab's own helpers (no daemon needed)."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import lab


def test_domain_xml_is_well_formed_and_isolated() -> None:
    root = ET.fromstring(lab.domain_xml("vftest-x", "qemu", 48, kernel=True, console_log=Path("/tmp/c.log")))
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "vftest-x"
    assert root.findtext("memory") == "48"
    assert root.find("os/kernel") is not None
    assert root.find("devices/interface/source").get("network") == lab.NETWORK_NAME
    assert root.find("devices/serial/source").get("path") == "/tmp/c.log"


def test_read_pid_forgets_a_dead_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lab, "RUN", tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    lab.pid_file("gone").write_text(f"{proc.pid}\n")
    assert lab.read_pid("gone") is None
    assert not lab.pid_file("gone").exists()


def test_spawn_and_stop_by_pid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lab, "RUN", tmp_path / "run")
    monkeypatch.setattr(lab, "LOG", tmp_path / "log")
    monkeypatch.setattr(lab, "LAB", tmp_path)
    pid = lab.spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    assert lab.read_pid("sleeper") == pid
    assert lab.stop_pid("sleeper") is True
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert lab.stop_pid("sleeper") is False


def test_state_file_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lab, "LAB", tmp_path)
    monkeypatch.setattr(lab, "STATE_FILE", tmp_path / "state.json")
    lab.save_state({"password": "x"})
    assert (tmp_path / "state.json").stat().st_mode & 0o077 == 0
    assert lab.load_state() == {"password": "x"}
