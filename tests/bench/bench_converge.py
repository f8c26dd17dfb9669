# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""make bench-converge: converging many guests with this collection's modules against the incumbents, in one run.

Scenarios (every figure is one whole `ansible-playbook` run, wall clock, end to end):
  libvirt-50  50 domains vfbench-NN on the lab's qemu:///system (64 MiB, 1 vCPU, one NIC on virtfleet-lab, no
              disks, state present: never started, so TCG boots are not what is measured).
  vsphere-20  20 VMs vfbench-vs-NN on the lab's vCenter (vcsim; 64 MiB, 1 vCPU, one NIC on "VM Network", one
              1 GiB thin disk).
Each tool runs three phases from the same empty state: create, no-op rerun, one-field change (memory 64 -> 96
MiB on every guest). Tools: virtfleet.core.guests (one task), virtfleet.core.guest (a loop), and the incumbent
loop (community.libvirt.virt `command: define` with a Jinja-built XML; community.vmware.vmware_guest). The
incumbents come from the `ansible` package on PyPI in .build/bench-venv (see bench_discovery.py).
Between tools, and at the end (Ctrl-C and errors included), every vfbench-* domain, its volumes, and every
vfbench-vs-* VM are removed. The table is printed and written to docs/benchmarks.md. Nothing asserts a time.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import libvirt
from _report import machine, write_section
from bench_discovery import OURS, REPO, THEIRS, ensure_bench_venv, env_for, lab, platforms
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl

LIBVIRT_GUESTS = 50
VSPHERE_GUESTS = 20
VCENTER = "127.0.10.10"
PHASES = (("create", 64), ("no-op rerun", 64), ("memory 64->96 MiB", 96))
RUN_TIMEOUT = 1200
MARKER = "<!-- bench-converge -->"

PLAY_HEAD = """- name: bench-converge
  hosts: localhost
  gather_facts: false
  tasks:
"""

# The summary task is the same in every playbook (a few ms): it counts the guests that reported a change,
# since the PLAY RECAP counts tasks (a 50-item loop with 50 changes is changed=1 there).
SUMMARY = """    - name: summary
      ansible.builtin.debug:
        msg: "VFBENCH changed_guests={{ %s | selectattr('changed') | list | length }}"
"""

LIBVIRT_GUESTS_PLAY = PLAY_HEAD + """    - name: converge
      virtfleet.core.guests:
        uri: qemu:///system
        datastore: virtfleet-lab
        domain_type: qemu
        guests: "{{ vf_guests }}"
      register: r
""" + SUMMARY % "r.guests"

LIBVIRT_GUEST_LOOP_PLAY = PLAY_HEAD + """    - name: converge
      virtfleet.core.guest:
        uri: qemu:///system
        datastore: virtfleet-lab
        domain_type: qemu
        name: "{{ item.name }}"
        vcpus: "{{ item.vcpus }}"
        memory_mib: "{{ item.memory_mib }}"
        nics: "{{ item.nics }}"
        state: present
      loop: "{{ vf_guests }}"
      loop_control:
        label: "{{ item.name }}"
      register: r
""" + SUMMARY % "r.results"

# How community.libvirt users define guests: an XML template in the playbook, `command: define`. The guests
# are never started, so redefining is all the memory change takes (no `state: shutdown/running` dance).
LIBVIRT_VIRT_PLAY = PLAY_HEAD + """    - name: converge
      community.libvirt.virt:
        uri: qemu:///system
        command: define
        xml: |
          <domain type='qemu'>
            <name>{{ item.name }}</name>
            <memory unit='MiB'>{{ item.memory_mib }}</memory>
            <vcpu>{{ item.vcpus }}</vcpu>
            <os><type arch='x86_64' machine='pc'>hvm</type></os>
            <devices>
              <interface type='network'>
                <source network='{{ item.nics[0].network }}'/>
                <model type='virtio'/>
              </interface>
            </devices>
          </domain>
      loop: "{{ vf_guests }}"
      loop_control:
        label: "{{ item.name }}"
      register: r
""" + SUMMARY % "r.results"

# The same with the MAC carried over from the existing definition (otherwise libvirt draws a new MAC at every
# define, so every rerun changes every guest): the incumbent at its idempotent best.
LIBVIRT_VIRT_FUZZY_PLAY = LIBVIRT_VIRT_PLAY.replace(
    "        command: define\n", "        command: define\n        mutate_flags: [ADD_UUID, ADD_MAC_ADDRESSES_FUZZY]\n")

VSPHERE_GUESTS_PLAY = PLAY_HEAD + f"""    - name: converge
      virtfleet.core.guests:
        uri: vsphere://{VCENTER}
        validate_certs: false
        cluster: DC0_C0
        datastore: LocalDS_0
        guests: "{{{{ vf_guests }}}}"
      register: r
""" + SUMMARY % "r.guests"

VSPHERE_GUEST_LOOP_PLAY = PLAY_HEAD + f"""    - name: converge
      virtfleet.core.guest:
        uri: vsphere://{VCENTER}
        validate_certs: false
        cluster: DC0_C0
        datastore: LocalDS_0
        name: "{{{{ item.name }}}}"
        vcpus: "{{{{ item.vcpus }}}}"
        memory_mib: "{{{{ item.memory_mib }}}}"
        nics: "{{{{ item.nics }}}}"
        disks: "{{{{ item.disks }}}}"
        state: present
      loop: "{{{{ vf_guests }}}}"
      loop_control:
        label: "{{{{ item.name }}}}"
      register: r
""" + SUMMARY % "r.results"

VSPHERE_VMWARE_GUEST_PLAY = PLAY_HEAD + f"""    - name: converge
      community.vmware.vmware_guest:
        hostname: {VCENTER}
        validate_certs: false
        datacenter: DC0
        cluster: DC0_C0
        folder: /DC0/vm
        name: "{{{{ item.name }}}}"
        guest_id: otherLinux64Guest
        hardware:
          num_cpus: "{{{{ item.vcpus }}}}"
          memory_mb: "{{{{ item.memory_mib }}}}"
        disk:
          - size_gb: 1
            type: thin
            datastore: LocalDS_0
        networks:
          - name: "{{{{ item.nics[0].network }}}}"
        state: present
      loop: "{{{{ vf_guests }}}}"
      loop_control:
        label: "{{{{ item.name }}}}"
      register: r
""" + SUMMARY % "r.results"


@dataclass
class Phase:
    name: str
    seconds: float
    recap_changed: int | None
    changed_guests: int | None
    error: str


@dataclass
class Row:
    scenario: str
    tool: str
    guests: int
    phases: list[Phase]


def libvirt_guests(memory_mib: int) -> list[dict[str, Any]]:
    return [{"name": f"vfbench-{i:02d}", "vcpus": 1, "memory_mib": memory_mib,
             "nics": [{"network": lab.NETWORK_NAME}], "state": "present"} for i in range(1, LIBVIRT_GUESTS + 1)]


def vsphere_guests(memory_mib: int) -> list[dict[str, Any]]:
    return [{"name": f"vfbench-vs-{i:02d}", "vcpus": 1, "memory_mib": memory_mib,
             "nics": [{"network": "VM Network"}], "disks": [{"name": "root", "size_gib": 1, "format": "thin"}],
             "state": "present"} for i in range(1, VSPHERE_GUESTS + 1)]


def first_error(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("fatal:", "failed:")) or "[ERROR]" in line:
            found = re.search(r'"msg": "([^"]*)"', line) or re.search(r"\[ERROR\]: (.*)", line)
            return (found.group(1) if found else line)[:160]
    return "failed (no message)"


def run_playbook(ours: bool, playbook: Path, extra_vars: Path, password: str, collections: Path) -> Phase:
    """One whole ansible-playbook run: wall seconds, PLAY RECAP changed=, guests reporting a change, error."""
    exe = (OURS if ours else THEIRS) / "ansible-playbook"
    python = (OURS if ours else THEIRS) / "python"
    args = [str(exe), "-i", "localhost,", "-c", "local", "-e", f"ansible_python_interpreter={python}",
            "-e", f"@{extra_vars}", str(playbook)]
    env = env_for(ours, password)
    if ours:
        env["ANSIBLE_COLLECTIONS_PATH"] = str(collections)
    start = time.monotonic()
    try:
        proc = subprocess.run(args, capture_output=True, text=True, env=env,
                              timeout=RUN_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return Phase("", time.monotonic() - start, None, None, f"gave up after {RUN_TIMEOUT} s")
    seconds = time.monotonic() - start
    output = proc.stdout + proc.stderr
    recap = re.search(r"^localhost\s+:.*?changed=(\d+).*?failed=(\d+)", output, flags=re.M)
    summary = re.search(r"VFBENCH changed_guests=(\d+)", output)
    recap_changed = int(recap.group(1)) if recap else None
    if summary:
        changed_guests: int | None = int(summary.group(1))
    else:  # the converge task failed: count the loop items the default callback printed as changed
        items = len(re.findall(r"^changed: \[localhost\] => \(item=", output, flags=re.M))
        changed_guests = items or None
    error = "" if proc.returncode == 0 else first_error(output)
    if error:
        failed_items = len(re.findall(r"^failed: \[localhost\] \(item=", output, flags=re.M))
        if failed_items:
            error = f"{failed_items} items failed: {error}"
    return Phase("", seconds, recap_changed, changed_guests, error)


# ---------------------------------------------------------------------------------------------- cleanup
def clean_libvirt() -> int:
    """Undefine every vfbench-* domain (stopping it first) and delete vfbench-* volumes of the lab pool."""
    removed = 0
    conn = libvirt.open(lab.SYSTEM_URI)
    try:
        for dom in conn.listAllDomains():
            if not dom.name().startswith("vfbench-"):
                continue
            if dom.isActive():
                dom.destroy()
            flags = (libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                     | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
            dom.undefineFlags(flags)
            removed += 1
        pool = conn.storagePoolLookupByName(lab.POOL_NAME)
        pool.refresh(0)
        for vol in pool.listAllVolumes():
            if vol.name().startswith("vfbench-"):
                vol.delete(0)
    finally:
        conn.close()
    return removed


def clean_vsphere(password: str) -> int:
    """Destroy every vfbench-vs-* VM on the lab vCenter (powering it off first)."""
    si = SmartConnect(host=VCENTER, user=lab.LAB_USER, pwd=password, sslContext=ssl._create_unverified_context())
    removed = 0
    try:
        content = si.RetrieveContent()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        try:
            for vm in list(view.view):
                if not vm.name.startswith("vfbench-vs-"):
                    continue
                if vm.runtime.powerState == "poweredOn":
                    WaitForTask(vm.PowerOffVM_Task())
                WaitForTask(vm.Destroy_Task())
                removed += 1
        finally:
            view.Destroy()
    finally:
        Disconnect(si)
    return removed


def clean_all(password: str) -> None:
    for what, clean in (("libvirt", clean_libvirt), ("vSphere", lambda: clean_vsphere(password))):
        try:
            removed = clean()
            if removed:
                print(f"bench: cleanup: removed {removed} {what} guests", flush=True)
        except (libvirt.libvirtError, vmodl.MethodFault, OSError) as exc:  # go on with the other side
            print(f"bench: cleanup of {what} failed: {exc}", flush=True)


# ---------------------------------------------------------------------------------------------- main
def on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def ensure_lxml() -> None:
    """community.libvirt.virt needs lxml, which the `ansible` package does not pull in."""
    probe = subprocess.run([str(THEIRS / "python"), "-c", "import lxml"], capture_output=True, check=False)
    if probe.returncode != 0:
        print("bench: installing lxml into .build/bench-venv (community.libvirt.virt needs it)", flush=True)
        subprocess.run([str(THEIRS / "pip"), "install", "-q", "lxml"], check=True)


def main() -> int:
    signal.signal(signal.SIGTERM, on_sigterm)
    state = lab.up()
    password = state["password"]
    ensure_bench_venv()
    ensure_lxml()
    built = REPO / ".build" / "ansible_collections" / "virtfleet" / "core"
    if not (built / "galaxy.yml").exists():
        print("bench: run `make collection` first (or `make bench-converge`)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="vf-bench-converge-"))
    # A snapshot of the built collection: a `make collection` elsewhere during the run must not pull it away.
    collections = work / "collections"
    shutil.copytree(built, collections / "ansible_collections" / "virtfleet" / "core",
                    ignore=shutil.ignore_patterns(".git"))
    rows: list[Row] = []

    def measure(scenario: str, tool: str, play: str, ours: bool, guests: Any, count: int, clean: Any) -> None:
        playbook = work / f"{scenario}.{tool}.yml"
        playbook.write_text(play)
        clean()
        row = Row(scenario, tool, count, [])
        rows.append(row)
        for name, memory in PHASES:
            extra = work / f"{scenario}.{memory}.json"
            extra.write_text(json.dumps({"vf_guests": guests(memory)}))
            print(f"bench: {scenario}: {tool}: {name} ...", flush=True)
            phase = run_playbook(ours, playbook, extra, password, collections)
            phase.name = name
            row.phases.append(phase)
            print(f"bench: {scenario}: {tool}: {name}: {phase.seconds:.2f}s, recap changed={phase.recap_changed}, "
                  f"guests changed={phase.changed_guests} {phase.error}", flush=True)
        print(f"bench: {scenario}: {tool}: cleanup removed {clean()} guests", flush=True)

    try:
        clean_all(password)
        scenario = f"libvirt-{LIBVIRT_GUESTS}"
        for tool, play, ours in (("virtfleet.core.guests", LIBVIRT_GUESTS_PLAY, True),
                                 ("virtfleet.core.guest (loop)", LIBVIRT_GUEST_LOOP_PLAY, True),
                                 ("community.libvirt.virt (loop)", LIBVIRT_VIRT_PLAY, False),
                                 ("community.libvirt.virt (loop, MAC kept)", LIBVIRT_VIRT_FUZZY_PLAY, False)):
            measure(scenario, tool, play, ours, libvirt_guests, LIBVIRT_GUESTS, clean_libvirt)
        scenario = f"vsphere-{VSPHERE_GUESTS}"
        for tool, play, ours in (("virtfleet.core.guests", VSPHERE_GUESTS_PLAY, True),
                                 ("virtfleet.core.guest (loop)", VSPHERE_GUEST_LOOP_PLAY, True),
                                 ("community.vmware.vmware_guest (loop)", VSPHERE_VMWARE_GUEST_PLAY, False)):
            measure(scenario, tool, play, ours, vsphere_guests, VSPHERE_GUESTS, lambda: clean_vsphere(password))
    finally:
        clean_all(password)
        shutil.rmtree(work, ignore_errors=True)
    report(rows)
    return 0


# ---------------------------------------------------------------------------------------------- report
def cell(phase: Phase, count: int) -> str:
    changed = "?" if phase.changed_guests is None else str(phase.changed_guests)
    recap = "?" if phase.recap_changed is None else str(phase.recap_changed)
    text = f"{phase.seconds:.2f} s, {changed}/{count} changed (recap changed={recap})"
    if phase.error:
        text += f", **failed**: {phase.error.replace('|', '/')[:110]}"
    return text


def notes(rows: list[Row]) -> list[str]:
    """Explanations of what this run showed: false changes, failures known to come from the lab."""
    found = []
    for row in rows:
        if row.tool == "community.libvirt.virt (loop)" and len(row.phases) > 1 and row.phases[1].changed_guests:
            found.append(f"community.libvirt.virt reports {row.phases[1].changed_guests} changes on the no-op "
                         "rerun: the template has no `<mac>` and its default `mutate_flags` (`ADD_UUID`) do not "
                         "carry the MAC over, so every define gives every guest a new MAC address. The `MAC kept` "
                         "row adds `mutate_flags: [ADD_UUID, ADD_MAC_ADDRESSES_FUZZY]`.")
        if row.tool.startswith("community.vmware") and any("Remote end closed connection" in phase.error
                                                           for phase in row.phases):
            found.append("community.vmware.vmware_guest fails on this lab: once the VM exists it reads properties "
                         "through pyVmomi's `Fetch` accessor (`vm.snapshot`, unset); the lab's vcsim (Debian's "
                         "govmomi) panics on `Fetch` of an unset property and drops the connection. The VMs are "
                         "created in the create phase, but each item fails, so its times are not comparable.")
    return found


def target_line(rows: list[Row]) -> str:
    def rerun(tool: str) -> Phase | None:
        for row in rows:
            if row.scenario == f"libvirt-{LIBVIRT_GUESTS}" and row.tool == tool and len(row.phases) > 1:
                return row.phases[1]
        return None

    ours = rerun("virtfleet.core.guests")
    theirs = rerun("community.libvirt.virt (loop)")
    if ours is None or ours.error:
        return "Target (libvirt-50 no-op rerun with `guests`): not measured (the run failed)."
    fast = ours.seconds < 3.0
    quiet = ours.recap_changed == 0 and ours.changed_guests == 0
    parts = [f"{ours.seconds:.2f} s (target < 3 s: {'met' if fast else 'NOT met'})",
             f"recap changed={ours.recap_changed} (target 0: {'met' if quiet else 'NOT met'})"]
    if theirs is not None and not theirs.error:
        ratio = theirs.seconds / ours.seconds
        parts.append(f"community.libvirt loop {theirs.seconds:.2f} s = {ratio:.1f}x "
                     f"(target >= 10x: {'met' if ratio >= 10 else 'NOT met'})")
    else:
        parts.append("community.libvirt loop: no figure (its run failed)")
    kept = rerun("community.libvirt.virt (loop, MAC kept)")
    if kept is not None and not kept.error:
        parts.append(f"its `MAC kept` variant {kept.seconds:.2f} s = {kept.seconds / ours.seconds:.1f}x")
    return "Target (libvirt-50 no-op rerun with `guests`, whole run): " + "; ".join(parts) + "."


def report(rows: list[Row]) -> None:
    lines = ["| scenario | tool | " + " | ".join(name for name, _m in PHASES) + " | rerun vs `guests` |",
             "| --- | --- | --- | --- | --- | ---: |"]
    base = {row.scenario: row.phases[1] for row in rows
            if row.tool == "virtfleet.core.guests" and len(row.phases) > 1 and not row.phases[1].error}
    for row in rows:
        ref = base.get(row.scenario)
        if len(row.phases) > 1 and ref is not None and not row.phases[1].error:
            ratio = f"{row.phases[1].seconds / ref.seconds:.1f}x"
        else:
            ratio = "n/a"
        cells = " | ".join(cell(phase, row.guests) for phase in row.phases)
        lines.append(f"| {row.scenario} | {row.tool} | {cells} | {ratio} |")
    target = "\n\n".join([target_line(rows), *notes(rows)])
    table = "\n".join(lines)
    print(table)
    print(target)
    write_section(MARKER, (
        "## Converging guests (`make bench-converge`)\n\n"
        f"{machine(platforms())}, "
        "libvirt with `domain_type: qemu` (TCG; KVM is not usable on this machine), vCenter = the lab's vcsim, "
        "every tool in one run on the same simulators, each from the same empty state. Each cell is one whole "
        "`ansible-playbook` run (wall clock, end to end): seconds, guests that reported a change, and the PLAY "
        "RECAP `changed=` (which counts tasks, so a loop shows 1 however many items changed).\n\n"
        f"libvirt-{LIBVIRT_GUESTS}: domains `vfbench-NN`, 64 MiB, 1 vCPU, one NIC on `virtfleet-lab`, no disks, "
        "`state: present` (never started: guest boots under TCG are not what is measured; with `running` every "
        "create would also pay a TCG boot per guest). "
        f"vsphere-{VSPHERE_GUESTS}: VMs `vfbench-vs-NN`, 64 MiB, 1 vCPU, one NIC on `VM Network`, one 1 GiB thin "
        "disk, cluster DC0_C0, datastore LocalDS_0. Phases: create, no-op rerun, memory 64 -> 96 MiB on every "
        "guest. The incumbents are the `ansible` package from PyPI (community.libvirt.virt `command: define` with "
        "an XML template, community.vmware.vmware_guest), in `.build/bench-venv`.\n\n"
        "Reproduce: `make bench-converge` (as root, with the lab; it removes every `vfbench-*` domain and volume and "
        "every `vfbench-vs-*` VM before, between and after the tools).\n\n"
        + table + "\n\n" + target
    ))


if __name__ == "__main__":
    sys.exit(main())
