"""Integration fixtures: the lab is brought up once per run (idempotent) and described by its state file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import lab as lab_module

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def lab() -> dict[str, Any]:
    """Bring the lab up (a no-op when it already runs) and return its state: endpoints, credentials."""
    subprocess.run([sys.executable, str(REPO / "tests" / "lab" / "lab.py"), "up"], check=True,
                   stdout=subprocess.DEVNULL)
    return lab_module.load_state()


@pytest.fixture(scope="session")
def libvirt_conn(lab: dict[str, Any]) -> Any:
    import libvirt

    conn = libvirt.open(lab["libvirt"]["uri"])
    yield conn
    conn.close()


@pytest.fixture()
def ansible_env(lab: dict[str, Any]) -> dict[str, str]:
    """Environment for ansible-* commands run against the collection copy in .build."""
    env = dict(os.environ)
    env.update(
        ANSIBLE_COLLECTIONS_PATH=str(REPO / ".build"),
        ANSIBLE_PYTHON_INTERPRETER=sys.executable,
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_LOCALHOST_WARNING="0",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="0",
    )
    return env
