# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""make bench-fleet: the fleet playbooks over a simulated fleet of 49 hypervisors and 500 guests, in one run.

The fleet: 40 standalone simulated ESXi servers (vcsim ESX, one process each, 127.0.22.1-40), a simulated
vCenter with one cluster of 8 hosts (127.0.23.10), and the lab's KVM host (qemu:///system) - 49 hypervisors.
The fleet file: 500 guests vfbench-fl-NNN (64 MiB, 1 vCPU, one NIC on the logical network `prod`, no disks;
state present, so no guest boots), 490 of type esxi, 10 of type kvm, placed by `virtfleet.core.place`.
Phases, each one whole `ansible-playbook` run (wall clock, end to end, discovery included):
  first apply, no-op plan, no-op apply, a plan with 50 changes (memory of 50 guests 64 -> 96 MiB).
Beside it, in the same run: the way users do it today, a loop of the `virtfleet.core.guest` module in check mode
over the same 500 guests, each given the hypervisor placement chose.
Then the same at 4x the hypervisors (160 ESXi servers, a 32-host cluster, the KVM host: 193), first with the same
500 guests, then with 4x the guests (2,000): first apply and the no-op plan.
Every vfbench-fl-* domain is removed at the end (the simulators hold their VMs in memory and are stopped by
PID). The table is printed and written to docs/benchmarks.md. Nothing asserts a time.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import yaml
from _report import machine, write_section
from bench_discovery import OURS, REPO, calibrate, env_for, lab, platforms

MARKER = "<!-- bench-fleet -->"
PREFIX = "vfbench-fl-"
RUN_TIMEOUT = 3600


@dataclass
class Scale:
    label: str
    esxi: int
    cluster_hosts: int
    guests: int
    kvm_guests: int

    @property
    def hypervisors(self) -> int:
        return self.esxi + self.cluster_hosts + 1


BASE = Scale("49 hypervisors, 500 guests", 40, 8, 500, 10)
LARGE = Scale("193 hypervisors, 2,000 guests", 160, 32, 2000, 40)
# 4x the hypervisors, the same 500 guests: the scaling target.
WIDE = Scale("193 hypervisors, 500 guests", 160, 32, 500, 10)


def esxi_endpoints(scale: Scale) -> list[lab.VcsimEndpoint]:
    return [lab.VcsimEndpoint(f"bench-fl-esx{i:03d}", f"127.0.22.{i}" if i < 255 else f"127.0.24.{i - 254}", "esx",
                              ("-vms", "0")) for i in range(1, scale.esxi + 1)]


def vcenter_endpoint(scale: Scale) -> lab.VcsimEndpoint:
    return lab.VcsimEndpoint("bench-fl-vcenter", "127.0.23.10", "vpx",
                             ("-hosts", "0", "-clusters", "1", "-cluster-hosts", str(scale.cluster_hosts),
                              "-vms", "0"))


def start(scale: Scale, password: str) -> list[lab.VcsimEndpoint]:
    eps = [*esxi_endpoints(scale), vcenter_endpoint(scale)]
    for ep in eps:
        lab.start_vcsim(ep, password, name=f"vcsim-{ep.name}")
    for ep in eps:
        lab.wait_for(f"vcsim {ep.name}", lambda ep=ep: lab.vcsim_answers(ep.address, ep.port), timeout=600)
    return eps


def stop(eps: list[lab.VcsimEndpoint]) -> None:
    for ep in eps:
        lab.stop_pid(f"vcsim-{ep.name}")


def write_inventory(work: Path, scale: Scale) -> Path:
    endpoints = [{"uri": lab.SYSTEM_URI}, {"uri": f"vsphere://{vcenter_endpoint(scale).address}"}]
    endpoints += [{"uri": f"vsphere://{ep.address}"} for ep in esxi_endpoints(scale)]
    path = work / f"fleet-{scale.hypervisors}.hypervisors.yml"
    path.write_text(yaml.safe_dump({"plugin": "virtfleet.core.hypervisors", "endpoints": endpoints,
                                    "validate_certs": False, "guests": True, "timeout": 30, "max_workers": 16}))
    return path


def write_fleet(work: Path, scale: Scale, state: dict[str, Any], changed: int = 0,
                guests: list[dict[str, Any]] | None = None) -> Path:
    if guests is None:
        guests = []
        for i in range(scale.guests):
            guest: dict[str, Any] = {"name": f"{PREFIX}{i:04d}",
                                     "hypervisor_type": "kvm" if i < scale.kvm_guests else "esxi"}
            if i >= scale.kvm_guests and i < scale.kvm_guests + changed:
                guest["memory_mib"] = 96
            guests.append(guest)
    path = work / f"fleet-{scale.hypervisors}-{changed}.yml"
    path.write_text(yaml.safe_dump({
        "name": "vfbench-fleet", "prune": True, "allow_empty": True,
        "defaults": {"memory_mib": 64, "vcpus": 1, "nics": [{"network": "prod"}]},
        "hypervisors": [
            {"type": "esxi", "networks": {"prod": "VM Network"}, "cpu_ratio": 16},
            {"type": "kvm", "networks": {"prod": state["libvirt"]["network"]}, "cpu_ratio": 16,
             "domain_type": state["domain_type"], "storage": {}},
        ],
        "guests": guests}))
    return path


@dataclass
class Run:
    seconds: float
    changed: int | None
    summary: dict[str, Any]
    error: str = ""


def playbook(which: str, inventory: Path, fleet: Path, out: Path, password: str, *extra: str) -> Run:
    args = [str(OURS / "ansible-playbook"), "-i", str(inventory), str(REPO / "playbooks" / f"{which}.yml"),
            "-e", f"fleet_file={fleet}", "-e", f"fleet_out={out}", "-e", "fleet_validate_certs=false",
            "-e", "fleet_timeout=60", *extra]
    env = env_for(True, password)
    env["ANSIBLE_COLLECTIONS_PATH"] = str(REPO / ".build")
    start_time = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT, check=False)
    seconds = time.monotonic() - start_time
    changed = sum(int(n) for n in re.findall(r"changed=(\d+)", proc.stdout)) if "PLAY RECAP" in proc.stdout else None
    summary: dict[str, Any] = {}
    source = out / "plan.json"  # what the run planned (an apply writes it too, before it applies)
    if source.exists():
        summary = json.loads(source.read_text())["summary"]
    error = ""
    if proc.returncode != 0:
        found = re.search(r'"msg": "([^"]{0,300})', proc.stdout)
        error = found.group(1) if found else (proc.stdout + proc.stderr)[-300:]
    return Run(seconds, changed, summary, error)


LOOP_PLAY = """- name: bench-fleet, the guest module in a loop, check mode
  hosts: localhost
  gather_facts: false
  tasks:
    - name: converge
      virtfleet.core.guest: "{{ item }}"
      check_mode: true
      loop: "{{ vf_items }}"
      loop_control:
        label: "{{ item.name }}"
      register: r
    - name: summary
      ansible.builtin.debug:
        msg: "VFBENCH changed_guests={{ r.results | selectattr('changed') | list | length }}"
"""


def loop_items(plan_path: Path) -> list[dict[str, Any]]:
    """What the loop is given: every placed guest with its hypervisor's uri and placement options."""
    placement = json.loads(plan_path.read_text())
    return [dict(guest, uri=t["uri"], validate_certs=False, **{k: v for k, v in t["placement"].items() if v})
            for t in placement["targets"] for guest in t["guests"]]


def run_loop(work: Path, items: list[dict[str, Any]], password: str) -> Run:
    play = work / "loop.yml"
    play.write_text(LOOP_PLAY)
    extra = work / "loop-vars.json"
    extra.write_text(json.dumps({"vf_items": items}))
    python = OURS / "python"
    args = [str(OURS / "ansible-playbook"), "-i", "localhost,", "-c", "local", "-e",
            f"ansible_python_interpreter={python}", "-e", f"@{extra}", str(play)]
    env = env_for(True, password)
    env["ANSIBLE_COLLECTIONS_PATH"] = str(REPO / ".build")
    start_time = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT, check=False)
    seconds = time.monotonic() - start_time
    found = re.search(r"VFBENCH changed_guests=(\d+)", proc.stdout)
    return Run(seconds, int(found.group(1)) if found else None, {},
               "" if proc.returncode == 0 else (proc.stdout + proc.stderr)[-300:])


def clean_libvirt() -> None:
    conn = libvirt.open(lab.SYSTEM_URI)
    try:
        for dom in conn.listAllDomains():
            if dom.name().startswith(PREFIX):
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    finally:
        conn.close()


def placement_dump(work: Path, inventory: Path, fleet: Path, password: str) -> Path:
    """The placement (targets) as the role computes it, for the loop: one ansible run of the place filter."""
    out = work / "placement.json"
    play = work / "placement.yml"
    play.write_text(f"""- name: placement
  hosts: hypervisors
  gather_facts: false
  connection: local
  tasks:
    - name: place
      run_once: true
      delegate_to: localhost
      ansible.builtin.copy:
        dest: {out}
        mode: "0644"
        content: >-
          {{{{ lookup('ansible.builtin.file', '{fleet}') | from_yaml
             | virtfleet.core.place(groups['hypervisors'] | map('extract', hostvars) | list,
                                    groups['guests'] | default([]) | map('extract', hostvars) | list)
             | to_json }}}}
""")
    env = env_for(True, password)
    env["ANSIBLE_COLLECTIONS_PATH"] = str(REPO / ".build")
    subprocess.run([str(OURS / "ansible-playbook"), "-i", str(inventory), str(play)], env=env, check=True,
                   capture_output=True, timeout=RUN_TIMEOUT)
    return out


def main() -> int:
    speed_before = calibrate()
    state = lab.up()
    password = state["password"]
    work = Path(tempfile.mkdtemp(prefix="vf-bench-fleet-"))
    rows: list[tuple[str, str, Run]] = []

    def record(scale: Scale, phase: str, run: Run) -> None:
        rows.append((scale.label, phase, run))
        print(f"bench: {scale.label}: {phase}: {run.seconds:.2f}s changed={run.changed} {run.summary} {run.error}",
              flush=True)

    def median(runs: list[Run]) -> Run:
        return sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]

    clean_libvirt()
    for scale in (BASE, WIDE, LARGE):
        eps: list[lab.VcsimEndpoint] = []
        try:
            eps = start(scale, password)
            inventory = write_inventory(work, scale)
            fleet = write_fleet(work, scale, state)
            out = work / f"out-{scale.hypervisors}"
            record(scale, "first apply", playbook("apply", inventory, fleet, out, password))
            plans = [playbook("plan", inventory, fleet, out, password) for _run in range(3)]
            record(scale, "no-op plan", median(plans))
            if scale is BASE:
                record(scale, "no-op apply",
                       median([playbook("apply", inventory, fleet, out, password) for _run in range(3)]))
                changed = write_fleet(work, scale, state, changed=50)
                record(scale, "plan, 50 changes", playbook("plan", inventory, changed, out, password))
                items = loop_items(placement_dump(work, inventory, fleet, password))
                record(scale, f"guest module loop, check mode ({len(items)} guests)",
                       run_loop(work, items, password))
        finally:
            stop(eps)
            clean_libvirt()
    speed_after = calibrate()
    report(rows, speed_before, speed_after)
    return 0


HEAD = ("Each cell is one whole `ansible-playbook` run, wall clock, discovery included; no-op rows are the median "
        "of three runs. Simulators: vcsim ESX servers (one process each) and a vcsim vCenter with one cluster, no "
        "added latency; the KVM host is the lab's libvirtd (guests defined, never started).")


def report(rows: list[tuple[str, str, Run]], before: float, after: float) -> None:
    lines = [machine(platforms().split(", the incumbents")[0]) + ". " + HEAD, "",
             "| fleet | phase | seconds | recap changed= | plan/apply summary |", "| --- | --- | --- | --- | --- |"]
    for fleet, phase, run in rows:
        summary = ", ".join(f"{k} {v}" for k, v in run.summary.items() if v and k != "errors") or "-"
        failed = f" (failed: {run.error})" if run.error else ""
        changed = run.changed if run.changed is not None else "n/a"
        lines.append(f"| {fleet} | {phase} | {run.seconds:.2f}{failed} | {changed} | {summary} |")
    by = {(f, p): r for f, p, r in rows}
    plan = by.get((BASE.label, "no-op plan"))
    apply_ = by.get((BASE.label, "no-op apply"))
    loop = next((r for (f, p), r in by.items() if p.startswith("guest module loop")), None)
    large = by.get((LARGE.label, "no-op plan"))
    wide = by.get((WIDE.label, "no-op plan"))
    lines.append("")
    if plan and apply_ and loop and large and wide:
        lines.append(f"Targets: no-op plan {plan.seconds:.2f} s (target under 10 s); no-op apply "
                     f"{apply_.seconds:.2f} s (under 10 s); the guest-module loop took "
                     f"{loop.seconds / plan.seconds:.1f}x the no-op plan's time (at least 10x); 4x the hypervisors "
                     f"took {wide.seconds / plan.seconds:.2f}x the time (at most 2.5x), 4x the hypervisors and "
                     f"the guests {large.seconds / plan.seconds:.2f}x.")
    lines.append(f"A fixed CPU loop took {before:.2f} s before the run and {after:.2f} s after it.")
    print("\n".join(lines))
    write_section(MARKER, "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
