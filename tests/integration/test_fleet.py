# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""The fleet playbooks end to end on the lab: libvirt + a simulated ESXi + a simulated vCenter cluster.

plan -> apply (the reviewed plan) -> nothing left to change -> drift clean; a reviewed plan that no longer
matches changes nothing; prune only with prune: true and only this fleet's guests; --limit converges only the
limit and leaves new guests elsewhere pending; the GitOps loop in a git repository, with a change behind the
collection's back that drift names; the report opened in headless Chromium.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import yaml
from conftest import BIN, REPO, remove_libvirt_guests


@pytest.fixture()
def fleet_env(lab: Dict[str, Any], ansible_env: Dict[str, str], tmp_path: Path) -> Dict[str, Any]:
    """A hypervisors inventory of the lab's KVM host, one simulated ESXi and the vCenter; a unique fleet."""
    vc = lab["vcsim"]
    inventory = tmp_path / "lab.hypervisors.yml"
    inventory.write_text(yaml.safe_dump({
        "plugin": "virtfleet.core.hypervisors",
        "endpoints": [{"uri": lab["libvirt"]["uri"]}, {"uri": f"vsphere://{vc['esx01']['address']}"},
                      {"uri": f"vsphere://{vc['vcenter']['address']}"}],
        "validate_certs": False, "guests": True, "timeout": 5}))
    env = dict(ansible_env, VMWARE_USER=lab["username"], VMWARE_PASSWORD=lab["password"])
    tag = uuid.uuid4().hex[:6]
    return {"inventory": inventory, "env": env, "dir": tmp_path, "tag": tag, "fleet": f"vftest-fleet-{tag}",
            "prefix": f"vftest-fl{tag}", "lab": lab}


def fleet_file(ctx: Dict[str, Any], guests: List[Dict[str, Any]], **extra: Any) -> Path:
    lab = ctx["lab"]
    path = ctx["dir"] / "fleet.yml"
    path.write_text(yaml.safe_dump({
        "name": ctx["fleet"],
        "defaults": {"memory_mib": 128, "vcpus": 1, "nics": [{"network": "prod"}]},
        "hypervisors": [
            {"type": "kvm", "networks": {"prod": lab["libvirt"]["network"]}, "domain_type": lab["domain_type"],
             "cpu_ratio": 16,
             "storage": {"fast": lab["libvirt"]["pool"]}},
            {"type": "esxi", "networks": {"prod": "VM Network"}, "cpu_ratio": 16},
        ],
        "guests": guests, **extra}))
    return path


def mixed(ctx: Dict[str, Any]) -> List[Dict[str, Any]]:
    p, esx = ctx["prefix"], ctx["lab"]["vcsim"]["esx01"]["address"]
    return [
        {"name": f"{p}-kvm", "hypervisor_type": "kvm", "disks": [{"name": "root", "size_gib": 1, "pool": "fast"}]},
        {"name": f"{p}-esx", "pin": esx, "disks": [{"name": "root", "size_gib": 1}]},
        {"name": f"{p}-vc", "pin": "DC0_C0_H0"},
        {"name": f"{p}-huge", "memory_mib": 10**7},
    ]


def playbook(ctx: Dict[str, Any], which: str, fleet: Path, out: Optional[Path] = None, *extra: str,
             check: bool = True) -> subprocess.CompletedProcess[str]:
    out = out or ctx["dir"] / "out"
    args = [str(BIN / "ansible-playbook"), "-i", str(ctx["inventory"]), f"virtfleet.core.{which}",
            "-e", f"fleet_file={fleet}", "-e", f"fleet_out={out}", "-e", "fleet_validate_certs=false",
            "-e", "fleet_remove_storage=true", *extra]
    proc = subprocess.run(args, env=ctx["env"], capture_output=True, text=True, timeout=600, check=False)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return proc


def read_plan(out: Path, name: str = "plan.json") -> Dict[str, Any]:
    return json.loads((out / name).read_text())


def actions(plan: Dict[str, Any]) -> Dict[str, str]:
    return {g["name"]: g["action"] for g in plan["guests"]}


def recap_changed(stdout: str) -> int:
    return sum(int(n) for n in re.findall(r"changed=(\d+)", stdout))


@pytest.fixture()
def fleet_ctx(fleet_env: Dict[str, Any], libvirt_conn: Any) -> Any:
    """The fleet environment; afterwards every guest of this fleet is removed (prune with an empty fleet) and
    any libvirt leftover of its names."""
    yield fleet_env
    empty = fleet_file(fleet_env, [], prune=True, allow_empty=True)
    playbook(fleet_env, "apply", empty, fleet_env["dir"] / "cleanup", check=False)
    domains = [d.name() for d in libvirt_conn.listAllDomains(0) if d.name().startswith(fleet_env["prefix"])]
    remove_libvirt_guests(libvirt_conn, fleet_env["lab"]["libvirt"]["pool"], domains)


def vsphere_names(ctx: Dict[str, Any], address: str) -> List[str]:
    """The VM names of this fleet on a vSphere endpoint, read with the collection's guest_info module."""
    proc = subprocess.run([str(BIN / "ansible"), "localhost", "-m", "virtfleet.core.guest_info", "-a",
                           json.dumps({"uri": f"vsphere://{address}", "validate_certs": False,
                                       "name": ctx["prefix"] + "-*"}), "-o"],
                          env=ctx["env"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return sorted(g["name"] for g in json.loads(proc.stdout.split("=>", 1)[1])["guests"])


def test_plan_apply_again_drift_on_mixed_fleet(fleet_ctx: Dict[str, Any], libvirt_conn: Any) -> None:
    ctx, p = fleet_ctx, fleet_ctx["prefix"]
    fleet = fleet_file(ctx, mixed(ctx))
    out = ctx["dir"] / "out"
    playbook(ctx, "plan", fleet, out)
    plan = read_plan(out)
    assert actions(plan) == {f"{p}-kvm": "create", f"{p}-esx": "create", f"{p}-vc": "create"}
    where = {g["name"]: g["hypervisor"] for g in plan["guests"]}
    assert where[f"{p}-esx"] == ctx["lab"]["vcsim"]["esx01"]["address"] and where[f"{p}-vc"] == "DC0_C0_H0"
    assert [u["name"] for u in plan["unplaceable"]] == [f"{p}-huge"]
    assert "fits nowhere" in plan["unplaceable"][0]["reason"]
    md = (out / "plan.md").read_text()
    assert f"| {p}-kvm |" in md and f"{p}-huge" in md and plan["digest"] in md
    # Check mode created nothing.
    assert not [d for d in libvirt_conn.listAllDomains(0) if d.name().startswith(p)]

    reviewed = ctx["dir"] / "reviewed.json"
    shutil.copy(out / "plan.json", reviewed)
    playbook(ctx, "apply", fleet, out, "-e", f"fleet_plan={reviewed}")
    libvirt_conn.lookupByName(f"{p}-kvm")
    assert vsphere_names(ctx, ctx["lab"]["vcsim"]["esx01"]["address"]) == [f"{p}-esx"]
    assert vsphere_names(ctx, ctx["lab"]["vcsim"]["vcenter"]["address"]) == [f"{p}-vc"]
    applied = read_plan(out, "apply.json")
    assert sorted(g["name"] for g in applied["guests"] if g["action"] == "create") == sorted(actions(plan))

    again = playbook(ctx, "apply", fleet, out)
    assert set(actions(read_plan(out)).values()) == {"none"}
    assert recap_changed(again.stdout) == 0
    # The fleet's one unplaceable guest is drift: the declared fleet is not what runs.
    drift = playbook(ctx, "drift", fleet, out, check=False)
    assert drift.returncode != 0 and f"{p}-huge: not placed" in drift.stdout
    fleet = fleet_file(ctx, mixed(ctx)[:3])
    playbook(ctx, "drift", fleet, out)


def test_reviewed_plan_that_no_longer_matches_changes_nothing(fleet_ctx: Dict[str, Any], libvirt_conn: Any) -> None:
    ctx, p = fleet_ctx, fleet_ctx["prefix"]
    guests = [{"name": f"{p}-a", "hypervisor_type": "kvm"}]
    out = ctx["dir"] / "out"
    playbook(ctx, "plan", fleet_file(ctx, guests), out)
    reviewed = ctx["dir"] / "reviewed.json"
    shutil.copy(out / "plan.json", reviewed)
    guests[0]["memory_mib"] = 256  # merged after review
    proc = playbook(ctx, "apply", fleet_file(ctx, guests), out, "-e", f"fleet_plan={reviewed}", check=False)
    assert proc.returncode != 0
    assert "no longer matches the reviewed plan" in proc.stdout and f"{p}-a" in proc.stdout
    assert not [d for d in libvirt_conn.listAllDomains(0) if d.name().startswith(p)]
    # A hand-edited plan is refused too.
    edited = json.loads(reviewed.read_text())
    edited["guests"][0]["hypervisor"] = "elsewhere"
    reviewed.write_text(json.dumps(edited))
    proc = playbook(ctx, "apply", fleet_file(ctx, guests[:1]), out, "-e", f"fleet_plan={reviewed}", check=False)
    assert proc.returncode != 0 and "edited after plan.yml wrote it" in proc.stdout


def test_prune_only_with_prune_and_only_this_fleet(
        fleet_ctx: Dict[str, Any], libvirt_conn: Any, names: List[str]) -> None:
    ctx, p = fleet_ctx, fleet_ctx["prefix"]
    kvm = {"hypervisor_type": "kvm"}
    out = ctx["dir"] / "out"
    playbook(ctx, "apply", fleet_file(ctx, [dict(kvm, name=f"{p}-keep"), dict(kvm, name=f"{p}-drop")]), out)
    # A guest of another owner on the same host, not in the fleet.
    other = f"{p}-other"
    names.append(other)
    proc = subprocess.run([str(BIN / "ansible"), "localhost", "-m", "virtfleet.core.guest", "-a", json.dumps({
        "uri": ctx["lab"]["libvirt"]["uri"], "name": other, "memory_mib": 64, "owner": "someone-else",
        "datastore": ctx["lab"]["libvirt"]["pool"], "domain_type": ctx["lab"]["domain_type"]})],
        env=ctx["env"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    fleet = fleet_file(ctx, [dict(kvm, name=f"{p}-keep")])
    playbook(ctx, "apply", fleet, out)
    assert f"{p}-drop" not in actions(read_plan(out))
    libvirt_conn.lookupByName(f"{p}-drop")  # no prune: still there

    fleet = fleet_file(ctx, [dict(kvm, name=f"{p}-keep")], prune=True)
    playbook(ctx, "plan", fleet, out)
    assert actions(read_plan(out)) == {f"{p}-keep": "none", f"{p}-drop": "delete"}
    playbook(ctx, "apply", fleet, out)
    left = {d.name() for d in libvirt_conn.listAllDomains(0) if d.name().startswith(p)}
    assert left == {f"{p}-keep", other}


def test_limit_converges_only_the_limit(fleet_ctx: Dict[str, Any], libvirt_conn: Any) -> None:
    ctx, p = fleet_ctx, fleet_ctx["prefix"]
    esx = ctx["lab"]["vcsim"]["esx01"]["address"]
    fleet = fleet_file(ctx, [{"name": f"{p}-k", "hypervisor_type": "kvm"}, {"name": f"{p}-e", "pin": esx}])
    out = ctx["dir"] / "out"
    kvm_host = ctx["lab"]["libvirt_hostname"]
    playbook(ctx, "apply", fleet, out, "--limit", kvm_host)
    plan = read_plan(out)
    assert actions(plan) == {f"{p}-k": "create"}
    assert [(x["name"], x["hypervisor"]) for x in plan["pending"]] == [(f"{p}-e", esx)]
    assert vsphere_names(ctx, esx) == []
    libvirt_conn.lookupByName(f"{p}-k")


def test_gitops_loop_in_a_git_repository(fleet_ctx: Dict[str, Any], libvirt_conn: Any) -> None:
    """plan on the "pull request", apply the saved plan on "merge", drift clean, a change behind the
    collection's back (libvirt, directly) that drift names."""
    ctx, p = fleet_ctx, fleet_ctx["prefix"]
    repo = ctx["dir"] / "repo"
    repo.mkdir()

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(repo), "-c", "user.name=ci", "-c", "user.email=ci@localhost", *args],
                       check=True, capture_output=True)

    git("init", "-q")
    fleet = fleet_file(ctx, [{"name": f"{p}-web", "hypervisor_type": "kvm"}])
    shutil.move(str(fleet), repo / "fleet.yml")
    git("add", "fleet.yml")
    git("commit", "-qm", "fleet: web")
    # The change under review: a second guest.
    data = yaml.safe_load((repo / "fleet.yml").read_text())
    data["guests"].append({"name": f"{p}-db", "hypervisor_type": "kvm", "memory_mib": 192})
    (repo / "fleet.yml").write_text(yaml.safe_dump(data))
    git("commit", "-qam", "fleet: add db")
    pr = ctx["dir"] / "pr"
    playbook(ctx, "plan", repo / "fleet.yml", pr)
    assert actions(read_plan(pr)) == {f"{p}-web": "create", f"{p}-db": "create"}
    merged = ctx["dir"] / "merged"
    playbook(ctx, "apply", repo / "fleet.yml", merged, "-e", f"fleet_plan={pr / 'plan.json'}")
    playbook(ctx, "drift", repo / "fleet.yml", merged)

    import libvirt

    dom = libvirt_conn.lookupByName(f"{p}-db")
    dom.setMemoryFlags(96 * 1024, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    proc = playbook(ctx, "drift", repo / "fleet.yml", merged, check=False)
    assert proc.returncode != 0
    assert re.search(rf"{p}-db on \S+: update \(memory_mib\)", proc.stdout), proc.stdout[-2000:]
    assert f"{p}-web on" not in proc.stdout


def test_report_in_headless_chromium(fleet_ctx: Dict[str, Any]) -> None:
    ctx, p = fleet_ctx, fleet_ctx["prefix"]
    out = ctx["dir"] / "out"
    playbook(ctx, "plan", fleet_file(ctx, mixed(ctx)), out)
    report = out / "report.html"
    text = report.read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text  # self-contained
    chromium = shutil.which("chromium")
    assert chromium, "chromium is installed by make deps (bindep.txt)"
    base = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
            f"--user-data-dir={ctx['dir'] / 'chromium'}"]
    dom = subprocess.run([*base, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    plan = read_plan(out)
    for hv in plan["hypervisors"]:
        assert f'data-hypervisor="{hv["name"]}"' in dom
    assert re.search(rf'data-guest="{p}-kvm".*?class="create"', dom, re.S)
    assert f"{p}-huge" in dom and "fits nowhere" in dom
    assert re.search(r'class="fill[^"]*" style="width: [0-9.]+%"', dom)
    shot = ctx["dir"] / "report.png"
    subprocess.run([*base, "--window-size=1200,1400", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000
    images = REPO / ".build" / "screenshots"
    images.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, images / "fleet-report.png")


def test_user_data_never_in_output_or_files(fleet_ctx: Dict[str, Any], libvirt_conn: Any) -> None:
    """A guest's cloud_init.user_data (often a password) is in no line of a -vvv apply, no file the run writes,
    and yet the guest is made with it (its seed digest is the one of that user_data)."""
    ctx, p = fleet_ctx, fleet_ctx["prefix"]
    secret = "vf-" + str(7919 * 613) + "-sentinel"
    # The user_data also holds the guest's own name: output is masked, the plan's names and digest are not.
    guests = [{"name": f"{p}-seeded", "hypervisor_type": "kvm",
               "cloud_init": {"user_data": {"password": secret, "hostname": f"{p}-seeded"},
                              "meta_data": "instance-id: x\n"}}]
    out = ctx["dir"] / "out"
    playbook(ctx, "plan", fleet_file(ctx, guests), out)
    reviewed = ctx["dir"] / "reviewed.json"
    shutil.copy(out / "plan.json", reviewed)
    proc = playbook(ctx, "apply", fleet_file(ctx, guests), out, "-vvv", "-e", f"fleet_plan={reviewed}")
    assert secret not in proc.stdout + proc.stderr
    for path in out.iterdir():
        assert secret not in path.read_text(), path.name
    libvirt_conn.lookupByName(f"{p}-seeded")
    again = playbook(ctx, "plan", fleet_file(ctx, guests), out)
    assert actions(read_plan(out)) == {f"{p}-seeded": "none"}, again.stdout[-1500:]


def test_unreachable_hypervisor_guests_are_never_placed_elsewhere(fleet_ctx: Dict[str, Any],
                                                                  libvirt_conn: Any) -> None:
    """An endpoint that does not answer (127.0.10.14: nothing listens there) is in the plan with the guests that may
    run on it; those are not created anywhere, the others are, and drift fails naming it."""
    ctx, p = fleet_ctx, fleet_ctx["prefix"]
    data = yaml.safe_load(ctx["inventory"].read_text())
    data["endpoints"].append({"uri": "vsphere://127.0.10.14"})
    ctx["inventory"].write_text(yaml.safe_dump(data))
    fleet = fleet_file(ctx, [{"name": f"{p}-k", "hypervisor_type": "kvm"}, {"name": f"{p}-any"}])
    out = ctx["dir"] / "out"
    playbook(ctx, "apply", fleet, out)
    plan = read_plan(out)
    assert plan["unreachable"] == [{"hypervisor": "127.0.10.14", "guests": [f"{p}-any"]}]
    assert actions(plan) == {f"{p}-k": "create"}
    assert {d.name() for d in libvirt_conn.listAllDomains(0) if d.name().startswith(p)} == {f"{p}-k"}
    drift = playbook(ctx, "drift", fleet, out, check=False)
    assert drift.returncode != 0 and "127.0.10.14: unreachable, not checked" in drift.stdout


def test_bad_fleet_input_is_named_and_changes_nothing(fleet_ctx: Dict[str, Any], libvirt_conn: Any) -> None:
    """An unknown field fails the run with one line naming the guest and field; a pin to no hypervisor, an
    anti-affinity group that cannot hold, and a network no hypervisor maps are each named in plan.json with
    its reason. The first run creates nothing; the second creates only the guest that fits."""
    ctx, p = fleet_ctx, fleet_ctx["prefix"]
    out = ctx["dir"] / "out"
    proc = playbook(ctx, "apply", fleet_file(ctx, [{"name": f"{p}-a", "colour": "red"}]), out, check=False)
    assert proc.returncode != 0
    assert not [d for d in libvirt_conn.listAllDomains(0) if d.name().startswith(p)]
    line = next(x for x in proc.stdout.splitlines() if "fleet guests[0]" in x)
    assert f"({p}-a)" in line and "colour" in line
    kvm = ctx["lab"]["libvirt_hostname"]
    guests = [{"name": f"{p}-pin", "pin": "no-such-host"},
              {"name": f"{p}-aa1", "pin": kvm, "anti_affinity": "g"},
              {"name": f"{p}-aa2", "pin": kvm, "anti_affinity": "g"},
              {"name": f"{p}-net", "nics": [{"network": "nowhere"}]}]
    playbook(ctx, "apply", fleet_file(ctx, guests), out)
    reasons = {u["name"]: u["reason"] for u in read_plan(out)["unplaceable"]}
    assert reasons[f"{p}-pin"] == "pin: no hypervisor named 'no-such-host'"
    assert "anti_affinity 'g' already there" in reasons[f"{p}-aa2"]
    assert "network 'nowhere' not mapped" in reasons[f"{p}-net"]
    assert {d.name() for d in libvirt_conn.listAllDomains(0) if d.name().startswith(p)} == {f"{p}-aa1"}


def test_plan_is_handed_to_set_stats(fleet_ctx: Dict[str, Any]) -> None:
    """What AWX and ansible-runner keep as the job's artifact data: the plan, by its digest."""
    ctx, p = fleet_ctx, fleet_ctx["prefix"]
    out = ctx["dir"] / "out"
    shown = dict(ctx, env=dict(ctx["env"], ANSIBLE_SHOW_CUSTOM_STATS="1"))
    proc = playbook(shown, "plan", fleet_file(ctx, [{"name": f"{p}-a", "hypervisor_type": "kvm"}]), out)
    stats = proc.stdout[proc.stdout.index("CUSTOM STATS"):]
    assert "virtfleet_plan" in stats and read_plan(out)["digest"] in stats
