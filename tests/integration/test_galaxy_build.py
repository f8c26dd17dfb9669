# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""The collection tarball as Galaxy gets it: what it ships, and that it works on its own.

The tarball carries no lab, benchmark, demo or repository tooling, and everything a user needs. Installed
alone (`ansible-galaxy collection install <tarball>`) into a clean virtualenv that has only ansible-core and
the tarball's requirements.txt, with the working directory outside this checkout and ANSIBLE_COLLECTIONS_PATH
naming only that install, it discovers the lab's libvirt host and guests, documents its modules and plans a
fleet with its own playbook.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path
from typing import Any, Dict, List

import ansible
import pytest
import yaml
from conftest import COLLECTION, REPO, unwrap

import lab as lab_module

# What only this checkout uses: the lab, the benchmarks, the demo and its lab inventory, the tests that need
# the repository's layout, the molecule scenarios (run against the lab), the repository's own tooling.
NOT_SHIPPED = ("tests/lab/", "tests/bench/", "tests/integration/", "tests/unit/", "tests/conftest.py",
               "tests/sanity/run.sh", "extensions/molecule/", "playbooks/demo.yml", "playbooks/inventory/",
               "Makefile", "pyproject.toml", "requirements-dev.txt", ".ci/", ".ansible-lint", ".gitignore",
               "changelogs/.plugin-cache.yaml", ".lab/", ".venv/", ".build/", ".git/")
# What a user of the tarball needs besides plugins/ and roles/ (all of which ship).
SHIPPED = ("README.md", "meta/runtime.yml", "meta/execution-environment.yml", "requirements.txt", "bindep.txt",
           "playbooks/plan.yml", "playbooks/apply.yml", "playbooks/drift.yml", "docs/awx/execution-environment.yml")
# References to the lab's state that shipped content must not make (it runs without the lab).
LAB_REFERENCES = (".lab/", "state.json")


@pytest.fixture(scope="module")
def members(collection_tarball: Path) -> Dict[str, bytes]:
    """The tarball's files and their content (directories left out)."""
    with tarfile.open(collection_tarball) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()  # type: ignore[union-attr]
                if m.isfile()}


def test_tarball_ships_no_lab_bench_or_demo_content(members: Dict[str, bytes]) -> None:
    leaked = sorted(name for name in members if name.startswith(NOT_SHIPPED))
    assert not leaked, f"dev-only content in the tarball: {leaked}"
    referring = sorted(name for name, data in members.items()
                       if any(ref.encode() in data for ref in LAB_REFERENCES))
    assert not referring, f"shipped files that read the lab's state: {referring}"


def test_tarball_ships_what_users_need(members: Dict[str, bytes]) -> None:
    assert not [name for name in SHIPPED if name not in members]
    # Every plugin and role file of the source (the copy `make collection` made), and any sanity ignore file.
    files = [*(COLLECTION / "plugins").rglob("*"), *(COLLECTION / "roles").rglob("*"),
             *(COLLECTION / "tests" / "sanity").glob("ignore-*.txt")]
    source = [p.relative_to(COLLECTION).as_posix() for p in files if p.is_file() and "__pycache__" not in p.parts]
    assert source and not [name for name in source if name not in members]
    # The files meta/execution-environment.yml names (ansible-builder reads them from the installed tarball).
    meta = yaml.safe_load(members["meta/execution-environment.yml"])
    assert all(path in members for path in meta["dependencies"].values())


def test_tarball_ships_the_license(members: Dict[str, bytes]) -> None:
    assert "LICENSE" in members, "LICENSE at the repository root ships with the collection"


@pytest.fixture(scope="module")
def installed(collection_tarball: Path, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """A clean virtualenv (no system site packages) with ansible-core and the tarball's requirements.txt, the
    tarball installed alone, and the environment that sees only that: ANSIBLE_COLLECTIONS_PATH is the install,
    no sys.path scan, no ANSIBLE_* or virtualenv setting of the caller, the venv first on PATH."""
    root = tmp_path_factory.mktemp("installed")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    with tarfile.open(collection_tarball) as tar:
        requirements = tar.extractfile("requirements.txt").read()  # type: ignore[union-attr]
    (root / "requirements.txt").write_bytes(requirements)
    # From the wheels `make deps` made (no package index: a test talks to this machine only).
    wheels = REPO / ".venv" / "wheels"
    assert wheels.is_dir(), f"{wheels} is missing: run `make deps`"
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-index",
                           "--find-links", str(wheels), f"ansible-core=={ansible.__version__}",
                           "-r", str(root / "requirements.txt")],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ANSIBLE_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
               ANSIBLE_HOME=str(root / "ansible-home"), ANSIBLE_COLLECTIONS_PATH=str(root / "collections"),
               ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="false", ANSIBLE_PYTHON_INTERPRETER=str(venv / "bin" / "python"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_INVENTORY_UNPARSED_WARNING="0", ANSIBLE_LOCALHOST_WARNING="0")
    work = root / "work"  # the working directory: outside the checkout, nothing in it but what a test writes
    work.mkdir()
    ctx = {"root": root, "bin": venv / "bin", "env": env, "work": work,
           "collection": root / "collections" / "ansible_collections" / "virtfleet" / "core"}
    run(ctx, "ansible-galaxy", "collection", "install", str(collection_tarball), "-p", str(root / "collections"))
    return ctx


def run(ctx: Dict[str, Any], tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A tool of the clean virtualenv, in the working directory outside the checkout; it must succeed."""
    proc = subprocess.run([str(ctx["bin"] / tool), *args], cwd=ctx["work"], env=ctx["env"], capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_clean_install_sees_only_the_tarball(installed: Dict[str, Any]) -> None:
    assert REPO not in installed["work"].parents and not str(installed["root"]).startswith(str(REPO))
    listed = json.loads(run(installed, "ansible-galaxy", "collection", "list", "virtfleet.core",
                            "--format", "json").stdout)
    assert list(listed) == [str(installed["collection"].parents[1])]
    doc = run(installed, "ansible-doc", "virtfleet.core.guest").stdout
    assert str(installed["collection"] / "plugins" / "modules" / "guest.py") in doc
    assert str(REPO) not in doc


def write_inventory(ctx: Dict[str, Any], lab: Dict[str, Any]) -> Path:
    path = ctx["work"] / "lab.hypervisors.yml"
    path.write_text(yaml.safe_dump({"plugin": "virtfleet.core.hypervisors", "endpoints": [lab["libvirt"]["uri"]],
                                    "guests": True, "timeout": 10}))
    return path


def test_clean_install_discovers_the_lab(installed: Dict[str, Any], lab: Dict[str, Any], libvirt_conn: Any) -> None:
    out = installed["work"] / "inventory.json"
    run(installed, "ansible-inventory", "-i", str(write_inventory(installed, lab)), "--list", "--output", str(out))
    data = unwrap(json.loads(out.read_text()))
    kvm_host = libvirt_conn.getHostname()
    assert kvm_host in data["hypervisors"]["hosts"]
    hostvars = data["_meta"]["hostvars"]
    assert hostvars[kvm_host]["virtfleet_hypervisor"]["api"] == "libvirt"
    guests = {hostvars[h]["virtfleet_guest"]["name"] for h in data["guests"]["hosts"]
              if hostvars[h]["virtfleet_guest"]["hypervisor"] == kvm_host}
    assert set(lab_module.DISCOVERY_DOMAINS) <= guests


def fleet(lab: Dict[str, Any], path: Path, guests: List[Dict[str, Any]]) -> Path:
    """A KVM-only fleet file for the lab (the fleet role's file, docs/fleet.md)."""
    path.write_text(yaml.safe_dump({
        "name": f"vftest-ee-{uuid.uuid4().hex[:6]}",
        "defaults": {"memory_mib": 128, "vcpus": 1, "nics": [{"network": "prod"}]},
        "hypervisors": [{"type": "kvm", "networks": {"prod": lab["libvirt"]["network"]},
                         "domain_type": lab["domain_type"], "cpu_ratio": 64,
                         "storage": {"fast": lab["libvirt"]["pool"]}}],
        "guests": guests}))
    return path


def test_clean_install_plans_a_fleet_with_its_playbook(installed: Dict[str, Any], lab: Dict[str, Any],
                                                       libvirt_conn: Any) -> None:
    run(installed, "ansible-playbook", "--syntax-check", "virtfleet.core.plan")
    name = f"vftest-ee-{uuid.uuid4().hex[:6]}"
    fleet_file = fleet(lab, installed["work"] / "fleet.yml", [{"name": name, "hypervisor_type": "kvm"}])
    out = installed["work"] / "fleet-out"
    run(installed, "ansible-playbook", "-i", str(write_inventory(installed, lab)), "virtfleet.core.plan",
        "-e", f"fleet_file={fleet_file}", "-e", f"fleet_out={out}")
    plan = json.loads((out / "plan.json").read_text())
    assert {g["name"]: g["action"] for g in plan["guests"]} == {name: "create"}, plan["unplaceable"]
    assert name not in [d.name() for d in libvirt_conn.listAllDomains(0)], "a plan changes nothing"
