# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""Jobs as AWX runs them: ansible-runner's Python API, credentials injected from docs/awx/credential_types.

An SCM-like project (an inventory source with `plugin: virtfleet.core.hypervisors`, a fleet file, a playbook
importing virtfleet.core.apply) in a private data directory; the vSphere, libvirt-over-SSH and Redfish
credential types rendered the way AWX renders them (tests/integration/awx.py), with sentinel secrets where
the lab takes any. The inventory update, the apply job and its rerun go through ansible-runner; its events,
stats and artifact data are checked, and every file it wrote is scanned for the injected secrets. Then the apply
runs as AWX job slicing runs it: N jobs at once, each with its slice of the hypervisors as --limit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import ansible_runner
import pytest
import yaml
from awx import Injected, inject
from conftest import BIN, remove_libvirt_guests, unwrap

SLICES = 3


def credentials(lab: Dict[str, Any], pdd: Path, key: str) -> Tuple[Dict[str, str], List[str]]:
    """The three credentials of the job, injected into PDD: their environment and the secrets to look for."""
    ssh = lab["libvirt"]["ssh"]
    injected: List[Injected] = [
        inject("vsphere", {"host": lab["vcsim"]["vcenter"]["address"], "username": lab["username"],
                           "password": lab["password"], "validate_certs": False}, pdd),
        inject("libvirt_ssh", {"uri": f"qemu+libssh://{ssh['host']}:{ssh['port']}/system",
                               "username": ssh["user"], "ssh_key_data": key,
                               "known_hosts": Path(ssh["known_hosts"]).read_text()}, pdd),
        # sushy-emulator takes any login: the password is a sentinel, so that its absence can be checked.
        inject("redfish", {"uri": lab["redfish"]["url"].replace("http://", "redfish+http://"),
                           "username": "vfbmc", "password": f"vfsentinel-{uuid.uuid4().hex}"}, pdd),
    ]
    env: Dict[str, str] = {}
    for one in injected:
        assert not set(env) & set(one.env), "two credentials inject the same variable"
        env.update(one.env)
    secrets = [s for one in injected for s in one.secrets]
    # A private key is found by any of its lines too (a log that wrapped it).
    secrets += [line for line in key.splitlines() if len(line) > 20 and "PRIVATE KEY" not in line]
    return env, secrets


def project(lab: Dict[str, Any], pdd: Path, fleet: str, prefix: str) -> Path:
    """The SCM project of the job templates: inventory source, fleet file, playbook."""
    proj = pdd / "project"
    proj.mkdir(parents=True)
    (proj / "lab.hypervisors.yml").write_text(yaml.safe_dump({
        "plugin": "virtfleet.core.hypervisors",
        "endpoints": ["{{ lookup('ansible.builtin.env', 'VIRTFLEET_LIBVIRT_URI') }}",
                      "vsphere://{{ lookup('ansible.builtin.env', 'VMWARE_HOST') }}",
                      f"vsphere://{lab['vcsim']['esx01']['address']}",
                      "{{ lookup('ansible.builtin.env', 'VIRTFLEET_REDFISH_URI') }}"],
        "credentials": [{"match": lab["redfish"]["url"].split("//")[1].split(":")[0],
                         "username": "{{ lookup('ansible.builtin.env', 'VIRTFLEET_REDFISH_USER') }}",
                         "password": "{{ lookup('ansible.builtin.file', "
                                     "lookup('ansible.builtin.env', 'VIRTFLEET_REDFISH_PASSWORD_FILE')) }}"}],
        "guests": True, "timeout": 30}))
    for which in ("plan", "apply"):
        play = {"name": f"Fleet {which}", "ansible.builtin.import_playbook": f"virtfleet.core.{which}"}
        (proj / f"{which}.yml").write_text(yaml.safe_dump([play]))
    net = lab["libvirt"]["network"]
    (proj / "fleet.yml").write_text(yaml.safe_dump({
        "name": fleet,
        "defaults": {"memory_mib": 64, "vcpus": 1, "nics": [{"network": "prod"}]},
        "hypervisors": [{"type": "kvm", "networks": {"prod": net}, "domain_type": lab["domain_type"],
                         "cpu_ratio": 16},
                        {"type": "esxi", "networks": {"prod": "VM Network"}, "cpu_ratio": 16}],
        "guests": [{"name": f"{prefix}-kvm-{i}", "hypervisor_type": "kvm"} for i in range(2)]
        + [{"name": f"{prefix}-esx-{i}", "hypervisor_type": "esxi", "anti_affinity": "esx"} for i in range(4)],
    }))
    return proj


@pytest.fixture()
def job(lab: Dict[str, Any], ansible_env: Dict[str, str], tmp_path: Path, libvirt_conn: Any,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    # ansible-runner finds ansible-playbook and ansible-inventory on PATH, as in an execution environment.
    monkeypatch.setenv("PATH", f"{BIN}:{os.environ['PATH']}")
    tag = uuid.uuid4().hex[:6]
    ctx = {"lab": lab, "base_env": {k: v for k, v in ansible_env.items() if k.startswith("ANSIBLE_")},
           "dir": tmp_path, "fleet": f"vftest-awx-{tag}", "prefix": f"vftest-awx{tag}",
           "key": Path(lab["libvirt"]["ssh"]["private_key"]).read_text()}
    yield ctx
    # Every guest of the fleet, wherever it is: an empty fleet of the same name with prune.
    pdd = tmp_path / "cleanup"
    proj = project(lab, pdd, ctx["fleet"], ctx["prefix"])
    (proj / "fleet.yml").write_text(yaml.safe_dump({"name": ctx["fleet"], "prune": True, "allow_empty": True,
                                                    "guests": []}))
    pruned = run_job(ctx, pdd, proj, {"fleet_remove_storage": True})[0]
    assert pruned.status == "successful", pruned.stdout.read()[-3000:]
    domains = [d.name() for d in libvirt_conn.listAllDomains(0) if d.name().startswith(ctx["prefix"])]
    remove_libvirt_guests(libvirt_conn, lab["libvirt"]["pool"], domains)


def run_job(ctx: Dict[str, Any], pdd: Path, proj: Path, extravars: Dict[str, Any], limit: str = "",
            key: str = "", playbook: str = "apply.yml", inventory: Optional[Path] = None) -> Tuple[Any, List[str]]:
    """One AWX-style job: credentials injected into PDD, then ansible-runner on the project's PLAYBOOK, with
    INVENTORY (a stored one), else the project's inventory source parsed in the job."""
    env, secrets = credentials(ctx["lab"], pdd, key or ctx["key"])
    result = ansible_runner.run(
        private_data_dir=str(pdd), project_dir=str(proj), playbook=playbook,
        inventory=str(inventory or proj / "lab.hypervisors.yml"), envvars={**ctx["base_env"], **env},
        extravars={"fleet_file": str(proj / "fleet.yml"), "fleet_out": str(pdd / "out"), **extravars},
        limit=limit or None, quiet=True, ident=uuid.uuid4().hex)
    return result, secrets


def scan(pdd: Path, secrets: List[str], injected_files: List[Path]) -> int:
    """Every file under PDD but the credential files AWX itself writes (ansible-runner's stdout, job events,
    status, rc, its record of the command and environment, env/envvars and env/extravars; the plan and report
    the job wrote): none may hold a secret. Returns how many files were read."""
    count = 0
    for path in sorted(p for p in pdd.rglob("*") if p.is_file()):
        if path in injected_files or path.parent.name == "credentials":
            continue
        text = path.read_text(errors="replace")
        found = [s for s in secrets if s in text]
        assert not found, f"{path.relative_to(pdd)} holds an injected secret"
        count += 1
    return count


def inventory_update(ctx: Dict[str, Any], name: str) -> Tuple[Path, Dict[str, Any], str, List[str]]:
    """An AWX inventory update: ansible-inventory through ansible-runner in a private data directory of its own,
    with the credentials injected there; AWX stores the result and deletes that directory. Later jobs get the
    stored inventory as a script printing it (what AWX hands a job). Returns the script, the inventory, what
    ansible-inventory printed on stderr, and the secrets injected."""
    pdd = ctx["dir"] / name
    proj = project(ctx["lab"], pdd, ctx["fleet"], ctx["prefix"])
    env, secrets = credentials(ctx["lab"], pdd, ctx["key"])
    out, err = ansible_runner.get_inventory("list", [str(proj / "lab.hypervisors.yml")], response_format="json",
                                            envvars={**ctx["base_env"], **env}, quiet=True)
    stored = unwrap(out)
    shutil.rmtree(pdd / "env" / "credentials")  # the update job is over: its credential files are gone
    script = ctx["dir"] / f"{name}-stored" / "hosts"
    script.parent.mkdir()
    script.write_text(f"#!/bin/sh\ncat <<'INVENTORY'\n{json.dumps(stored)}\nINVENTORY\n")
    script.chmod(0o700)
    return script, stored, err, secrets


def stats_of(result: Any) -> Dict[str, Any]:
    return next(e["event_data"] for e in result.events if e["event"] == "playbook_on_stats")


def test_inventory_update_and_apply_through_ansible_runner(job: Dict[str, Any]) -> None:
    lab, pdd = job["lab"], job["dir"] / "job"
    proj = project(lab, pdd, job["fleet"], job["prefix"])

    # The inventory update, as AWX runs it; the jobs then get the stored inventory, whose libvirt URI names
    # the update job's key files, gone by then: the job's own credential stands in for them.
    stored, groups, err, secrets = inventory_update(job, "update1")
    out = groups
    kvm = lab["libvirt"]["ssh"]["host"]  # a remote libvirt host is named by its endpoint
    assert kvm in groups["kvm"]["hosts"] + groups.get("qemu", {}).get("hosts", []), err
    assert {"DC0_C0_H0", lab["vcsim"]["esx01"]["address"]} <= set(groups["esxi"]["hosts"]), err
    assert groups["bmcs"]["hosts"] and not groups.get("unreachable", {}).get("hosts")
    uri = groups["_meta"]["hostvars"][kvm]["virtfleet_hypervisor"]["endpoint"]
    assert uri.startswith("qemu+libssh://root@") and "known_hosts_verify=normal" in uri, uri
    assert not any(s in json.dumps(out) + err for s in secrets)

    result, secrets = run_job(job, pdd, proj, {}, inventory=stored)
    assert (result.status, result.rc) == ("successful", 0), result.stdout.read()[-3000:]
    events = list(result.events)
    stats = stats_of(result)
    # The role runs once, on the controller, at the play's first hypervisor: that host alone has results.
    assert len(stats["ok"]) == 1 and set(stats["ok"]) <= set(groups["hypervisors"]["hosts"]), stats
    assert sum(stats["changed"].values()) >= 1 and set(stats["changed"]) == set(stats["ok"])
    assert not stats["failures"] and not stats["dark"]
    plan = json.loads((pdd / "out" / "plan.json").read_text())
    assert sorted(g["action"] for g in plan["guests"]) == ["create"] * 6
    where = {g["name"]: g["hypervisor"] for g in plan["guests"]}
    assert {where[f"{job['prefix']}-kvm-{i}"] for i in range(2)} == {kvm}
    assert len({where[f"{job['prefix']}-esx-{i}"] for i in range(4)}) == 4  # anti-affinity over 4 ESXi
    ok_events = [e for e in events if e["event"] == "runner_on_ok"]
    assert ok_events and all(e["event_data"]["host"] in stats["ok"] for e in ok_events)
    assert stats["artifact_data"]["virtfleet_plan"]["digest"] == plan["digest"]
    files = scan(pdd, secrets, [])

    # The rerun (a schedule, its inventory updated on launch): nothing changes on any host.
    stored = inventory_update(job, "update2")[0]
    again, secrets = run_job(job, pdd, proj, {}, inventory=stored)
    assert again.status == "successful"
    rerun = stats_of(again)
    assert sum(rerun["changed"].values()) == 0 and not rerun["failures"] and rerun["ok"]
    files += scan(pdd, secrets, [])
    print(f"awx job: {len(events)} + {len(list(again.events))} events checked, {files} files scanned, "
          "secrets found: 0")


def test_job_slicing_converges_the_union_once(job: Dict[str, Any]) -> None:
    """AWX job slicing: N jobs at the same time, slice i holding every N-th hypervisor (i, i+N, ...)."""
    lab = job["lab"]
    hypervisors = sorted(inventory_update(job, "inventory")[1]["hypervisors"]["hosts"])
    slices = [hypervisors[i::SLICES] for i in range(SLICES)]

    # Each slice a job process of its own, as AWX's execution nodes run them: `ansible-runner run` on a private
    # data directory holding the job's env/envvars and env/extravars (the files AWX writes; no secret is in them:
    # the credentials' secrets are files of their own).
    procs = []
    for i in range(SLICES):
        pdd = job["dir"] / f"slice{i}"
        sproj = project(lab, pdd, job["fleet"], job["prefix"])
        env, secrets = credentials(lab, pdd, job["key"])
        (pdd / "env" / "envvars").write_text(yaml.safe_dump({**job["base_env"], **env}))
        (pdd / "env" / "extravars").write_text(yaml.safe_dump({"fleet_file": str(sproj / "fleet.yml"),
                                                               "fleet_out": str(pdd / "out")}))
        procs.append((pdd, secrets, subprocess.Popen(
            [str(BIN / "ansible-runner"), "run", str(pdd), "--project-dir", str(sproj), "-p", "apply.yml",
             "--inventory", str(sproj / "lab.hypervisors.yml"), "--limit", ",".join(slices[i]), "--ident", "slice",
             "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
    done = []
    for pdd, secrets, proc in procs:
        err = proc.communicate(timeout=900)[1]
        status = (pdd / "artifacts" / "slice" / "status").read_text()
        assert (proc.returncode, status) == (0, "successful"), err[-2000:] + \
            (pdd / "artifacts" / "slice" / "stdout").read_text()[-3000:]
        scan(pdd, secrets, [])
        done.append(json.loads((pdd / "out" / "plan.json").read_text()))
    created = [g["name"] for plan in done for g in plan["guests"] if g["action"] == "create"]
    assert sorted(created) == sorted(set(created)), "a guest was created by two slices"
    # The whole fleet, once: a plan of the whole fleet finds nothing to do, and each guest on one hypervisor.
    check = job["dir"] / "after"
    cproj = project(lab, check, job["fleet"], job["prefix"])
    env = credentials(lab, check, job["key"])[0]
    subprocess.run([str(BIN / "ansible-playbook"), "-i", str(cproj / "lab.hypervisors.yml"), "virtfleet.core.plan",
                    "-e", f"fleet_file={cproj / 'fleet.yml'}", "-e", f"fleet_out={check / 'out'}"],
                   env={**job["base_env"], **env, "PATH": str(BIN) + ":/usr/bin:/bin"}, check=True,
                   capture_output=True, text=True, timeout=600)
    plan = json.loads((check / "out" / "plan.json").read_text())
    assert {g["action"] for g in plan["guests"]} == {"none"} and len(plan["guests"]) == 6
    assert sorted(created) == sorted(g["name"] for g in plan["guests"])


def test_wrong_key_fails_the_job_in_one_line_without_secrets(job: Dict[str, Any]) -> None:
    """A libvirt-over-SSH credential with another private key: the job fails, saying why, and no event holds
    the key or any other injected secret."""
    lab = job["lab"]
    pdd = job["dir"] / "wrong"
    proj = project(lab, pdd, job["fleet"], job["prefix"])
    (proj / "lab.hypervisors.yml").write_text(yaml.safe_dump({
        "plugin": "virtfleet.core.hypervisors", "timeout": 5,
        "endpoints": ["{{ lookup('ansible.builtin.env', 'VIRTFLEET_LIBVIRT_URI') }}"]}))
    keygen = job["dir"] / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keygen)], check=True)
    result, secrets = run_job(job, pdd, proj, {}, key=keygen.read_text())
    assert result.status == "failed"
    failed = [e for e in result.events if e["event"] == "runner_on_failed"]
    assert len(failed) == 1
    msg = failed[0]["event_data"]["res"]["msg"]
    assert msg.startswith("no hypervisor was discovered (unreachable: ") and "\n" not in msg, msg
    assert "127.0.10.40" in msg or "libssh" in msg, msg
    assert scan(pdd, secrets, []) > 0


def test_workflow_plan_approval_apply_of_the_saved_plan(job: Dict[str, Any], libvirt_conn: Any) -> None:
    """An AWX workflow: a plan job, an approval node, an apply job. AWX hands the plan job's artifact data
    (set_stats: virtfleet_plan) to the apply job as extra vars; the apply changes nothing unless it is the
    plan that was approved."""
    lab = job["lab"]
    planned = run_job(job, job["dir"] / "plan", project(lab, job["dir"] / "plan", job["fleet"], job["prefix"]),
                      {}, playbook="plan.yml")[0]
    assert planned.status == "successful", planned.stdout.read()[-3000:]
    artifact = stats_of(planned)["artifact_data"]
    assert sorted(g["action"] for g in artifact["virtfleet_plan"]["guests"]) == ["create"] * 6
    assert not [d for d in libvirt_conn.listAllDomains(0) if d.name().startswith(job["prefix"])]

    # Not the approved plan: one guest's placement edited. Refused, nothing made.
    edited = json.loads(json.dumps(artifact))
    edited["virtfleet_plan"]["guests"][0]["hypervisor"] = "somewhere-else"
    pdd = job["dir"] / "edited"
    refused = run_job(job, pdd, project(lab, pdd, job["fleet"], job["prefix"]), edited)[0]
    assert refused.status == "failed"
    msg = next(e for e in refused.events if e["event"] == "runner_on_failed")["event_data"]["res"]["msg"]
    assert msg.startswith("fleet_plan_data: "), msg
    assert not [d for d in libvirt_conn.listAllDomains(0) if d.name().startswith(job["prefix"])]

    # The approved plan: applied as planned.
    pdd = job["dir"] / "apply"
    applied = run_job(job, pdd, project(lab, pdd, job["fleet"], job["prefix"]), artifact)[0]
    assert applied.status == "successful", applied.stdout.read()[-3000:]
    assert sum(stats_of(applied)["changed"].values()) >= 1
    made = sorted(d.name() for d in libvirt_conn.listAllDomains(0) if d.name().startswith(job["prefix"]))
    assert made == sorted(g["name"] for g in artifact["virtfleet_plan"]["guests"] if "-kvm-" in g["name"])


@pytest.mark.parametrize("name, inputs, secret_files", [
    ("vsphere", {"host": "vc.example.com", "username": "u", "password": "pw-sentinel", "ca": "PEM"},
     {"VIRTFLEET_PASSWORD_FILE": "pw-sentinel", "VIRTFLEET_CA_PATH": "PEM"}),
    ("redfish", {"uri": "redfish://bmc.example.com", "username": "u", "password": "pw-sentinel"},
     {"VIRTFLEET_REDFISH_PASSWORD_FILE": "pw-sentinel"}),
    ("libvirt_ssh", {"uri": "qemu+libssh://kvm.example.com:2222/system", "username": "root",
                     "ssh_key_data": "KEY-sentinel\n", "known_hosts": "KH\n"}, {}),
])
def test_each_credential_type_renders_as_awx_does(tmp_path: Path, name: str, inputs: Dict[str, Any],
                                                  secret_files: Dict[str, str]) -> None:
    """Rendered with test values: every secret goes to a 0600 file of the private data directory and none into
    the environment; the variables name the files; a required input left out is refused."""
    injected = inject(name, inputs, tmp_path)
    assert injected.secrets and not any(s in json.dumps(injected.env) for s in injected.secrets)
    for variable, content in secret_files.items():
        path = Path(injected.env[variable])
        assert path in injected.files and path.read_text() == content and path.stat().st_mode & 0o077 == 0
    if name == "libvirt_ssh":
        uri = injected.env["LIBVIRT_DEFAULT_URI"]
        assert uri == injected.env["VIRTFLEET_LIBVIRT_URI"]
        assert uri.startswith("qemu+libssh://root@kvm.example.com:2222/system?keyfile=")
        assert "known_hosts_verify=normal" in uri and "sshauth=privkey" in uri
        assert {p.read_text() for p in injected.files} == {"KEY-sentinel\n", "KH\n"}
    if name == "vsphere":
        assert injected.env["VMWARE_VALIDATE_CERTS"] == "True"  # the field's default: verify
        without_ca = inject(name, {k: v for k, v in inputs.items() if k != "ca"}, tmp_path / "noca")
        assert without_ca.env["VIRTFLEET_CA_PATH"] == ""  # empty: the collection then uses the system store
    with pytest.raises(ValueError, match="input username is required"):
        inject(name, {k: v for k, v in inputs.items() if k != "username"}, tmp_path / "missing")
