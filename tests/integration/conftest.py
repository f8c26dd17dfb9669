# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
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


@pytest.fixture()
def libvirt_conn(lab: dict[str, Any]) -> Any:
    """A connection per test: the fault-injection tests kill and restart libvirtd, which ends older ones."""
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


BIN = Path(sys.executable).parent


def remove_libvirt_guests(conn: Any, pool_name: str, names: list[str]) -> None:
    """Remove the domains NAMES and their volumes (NAME+...): what a test made, whatever state it left. A pass
    that libvirt refuses (a pool refresh or a volume while it still writes one) is tried again for a while, and
    what is still there in the end fails the test, naming it, instead of leaking into the next one."""
    import time

    import libvirt

    pool = conn.storagePoolLookupByName(pool_name)

    def ours() -> tuple[list[Any], list[Any]]:
        pool.refresh(0)
        domains = [d for d in conn.listAllDomains(0) if d.name() in names]
        volumes = [v for v in pool.listAllVolumes(0) if any(v.name().startswith(n + "+") for n in names)]
        return domains, volumes

    deadline = time.monotonic() + 30
    domains: list[Any] = []
    volumes: list[Any] = []
    while True:
        problem = ""
        try:
            domains, volumes = ours()
            for dom in domains:
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            for vol in volumes:
                vol.delete(0)
            domains, volumes = ours()
        except libvirt.libvirtError as exc:
            problem = f" ({exc})"
        else:
            if not domains and not volumes:
                return
        if time.monotonic() > deadline:
            left = [d.name() for d in domains] + [v.name() for v in volumes]
            raise AssertionError(f"test guests left in the lab: {left}{problem}")
        time.sleep(0.5)


@pytest.fixture()
def names(libvirt_conn: Any, lab: dict[str, Any]) -> Any:
    """Guest names a test uses; whatever is left of them afterwards is removed with their volumes."""
    used: list[str] = []
    yield used
    remove_libvirt_guests(libvirt_conn, lab["libvirt"]["pool"], used)


@pytest.fixture()
def run_module(ansible_env: dict[str, str]) -> Any:
    """Run one module of the collection on localhost (`ansible localhost -m ...`) and return its result dict.

    ARGS go in as JSON, so nothing is split or templated by the shell.
    """
    import json

    def run(module: str, args: dict[str, Any], check: bool = False, diff: bool = False,
            env: dict[str, str] | None = None) -> dict[str, Any]:
        cmd = [str(BIN / "ansible"), "localhost", "-m", f"virtfleet.core.{module}", "-a", json.dumps(args)]
        if check:
            cmd.append("--check")
        if diff:
            cmd.append("--diff")
        proc = subprocess.run(cmd, env=env or ansible_env, capture_output=True, text=True, check=False)
        head, sep, body = proc.stdout.partition(" => ")
        if not sep:
            raise AssertionError(f"no result from {module}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        start = body.index("{")
        result: dict[str, Any] = json.loads(body[start:])
        result["_status"] = head.rsplit("|", 1)[-1].strip()  # SUCCESS / CHANGED / FAILED!
        result["_diff_text"] = proc.stdout.split("localhost |", 1)[0] if diff else ""
        return result

    return run


COLLECTION = REPO / ".build" / "ansible_collections" / "virtfleet" / "core"


def build_collection(source: Path, dest: Path) -> Path:
    """`ansible-galaxy collection build` of the collection tree SOURCE into DEST; the tarball's path."""
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([str(BIN / "ansible-galaxy"), "collection", "build", "--force", "--output-path", str(dest)],
                          cwd=source, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (tarball,) = dest.glob("*.tar.gz")
    return tarball


@pytest.fixture(scope="session")
def collection_tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The collection tarball as Galaxy gets it, built from the copy `make collection` made."""
    return build_collection(COLLECTION, tmp_path_factory.mktemp("dist"))


def unwrap(value: Any) -> Any:
    """ansible-inventory writes strings marked unsafe as {"__ansible_unsafe": "..."}; read them back plainly."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    return value
