# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""make bench-discovery: this collection's inventory against the incumbents, side by side, in one run.

Scenarios (each built here, on loopback, and torn down afterwards):
  vcenter-1680  a vcsim vCenter, 40 standalone hosts x 40 VMs + 2 clusters x 10 hosts (40 VMs per cluster),
                2 ms added to every call; `ansible-inventory --list` end to end with guests.
  esxi-64       64 vcsim ESXi servers on 64 loopback addresses (2 VMs each), against 1 of them.
  libvirt-500   500 defined domains on the lab's libvirt.
The incumbents (community.vmware.vmware_vm_inventory, vmware.vmware.vms, community.libvirt.libvirt) come
from the `ansible` package on PyPI, installed into .build/bench-venv, so they never mix with our venv.
The table is printed and written to docs/benchmarks.md. Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "lab"))
from _report import machine, write_section  # noqa: E402

import lab  # noqa: E402

OURS = Path(sys.executable).parent
BENCH_VENV = REPO / ".build" / "bench-venv"
THEIRS = BENCH_VENV / "bin"
VCENTER = lab.VcsimEndpoint("bench-vcenter", "127.0.20.10", "vpx",
                            ("-hosts", "40", "-clusters", "2", "-cluster-hosts", "10", "-vms", "40", "-delay", "2"))
# The same vCenter with a quarter of the VMs (40 standalone hosts x 10 VMs + 2 clusters x 10 VMs): how cost
# grows with the number of VMs.
VCENTER_QUARTER = lab.VcsimEndpoint("bench-vcenter-q", "127.0.20.11", "vpx",
                                    ("-hosts", "40", "-clusters", "2", "-cluster-hosts", "10", "-vms", "10",
                                     "-delay", "2"))
ESXI = [lab.VcsimEndpoint(f"bench-esx{i:02d}", f"127.0.21.{i}", "esx", ("-vms", "2")) for i in range(1, 65)]
DOMAINS = 500


def python_of(bin_dir: Path) -> str:
    """'Python X.Y, ansible-core A.B.C' of a venv, or '' when it has none."""
    probe = subprocess.run([str(bin_dir / "python"), "-c",
                            "import sys; from ansible.release import __version__ as v; "
                            "print('Python %d.%d, ansible-core %s' % (sys.version_info[:2] + (v,)))"],
                           capture_output=True, text=True, check=False)
    return probe.stdout.strip() if probe.returncode == 0 else ""


def platforms() -> str:
    """Both venvs' Python and ansible-core, for the line above a table."""
    return f"this collection on {python_of(OURS)}, the incumbents on {python_of(THEIRS)}"


def ensure_bench_venv() -> None:
    """The incumbents' venv, on the same Python as ours (made again when ours moved to another Python)."""
    python = f"Python {sys.version_info[0]}.{sys.version_info[1]}"
    if (THEIRS / "ansible-inventory").exists() and python_of(THEIRS).startswith(python + ","):
        return
    print("bench: installing the incumbents (the `ansible` package from PyPI) into .build/bench-venv", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(BENCH_VENV)], check=True)
    subprocess.run([str(THEIRS / "pip"), "install", "-q", "ansible", "pyvmomi", "libvirt-python", "requests"],
                   check=True)


def env_for(ours: bool, password: str) -> dict[str, str]:
    env = dict(os.environ, ANSIBLE_INVENTORY_UNPARSED_FAILED="1", VMWARE_USER=lab.LAB_USER,
               VMWARE_PASSWORD=password, ANSIBLE_NOCOLOR="1")
    if ours:
        env["ANSIBLE_COLLECTIONS_PATH"] = str(REPO / ".build")
    else:
        env.pop("ANSIBLE_COLLECTIONS_PATH", None)
    return env


@dataclasses.dataclass
class Run:
    seconds: float  # wall time of ansible-inventory --list, end to end
    calls: int | None = None  # remote calls (ours only, from -v)
    hosts: int = 0
    error: str = ""
    discovery: float | None = None  # of which contacting the endpoints (ours only, from -v)


def run_inventory(ours: bool, sources: list[Path], password: str) -> Run:
    exe = (OURS if ours else THEIRS) / "ansible-inventory"
    args = [str(exe)]
    for source in sources:
        args += ["-i", str(source)]
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        args += ["--list", "--output", out.name] + (["-v"] if ours else [])
        start = time.monotonic()
        try:
            proc = subprocess.run(args, capture_output=True, text=True, env=env_for(ours, password), timeout=420,
                                  check=False)
        except subprocess.TimeoutExpired:
            return Run(time.monotonic() - start, error="gave up after 420 s")
        seconds = time.monotonic() - start
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if "Failed to parse" in ln or "ERROR" in ln]
            return Run(seconds, error=(lines or ["failed"])[0][:200])
        data = json.loads(Path(out.name).read_text() or "{}")
    run = Run(seconds, hosts=len(data.get("_meta", {}).get("hostvars", {})))
    if ours:
        output = proc.stdout + proc.stderr
        run.calls = sum(int(n) for n in re.findall(r"\((\d+) calls\)", output))
        found = re.findall(r"discovery done in ([\d.]+)s", output)
        run.discovery = sum(float(f) for f in found) if found else None
    return run


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def vsphere_sources(work: Path, name: str, ep: lab.VcsimEndpoint, password: str) -> dict[str, list[Path]]:
    host = ep.address
    ours = write(work / f"{name}.hypervisors.yml",
                 f"plugin: virtfleet.core.hypervisors\nendpoints: [vsphere://{host}]\nguests: true\n"
                 "validate_certs: false\n")
    cv = write(work / f"{name}.vmware.yml",
               f"plugin: community.vmware.vmware_vm_inventory\nhostname: {host}\nvalidate_certs: false\n"
               "with_tags: false\n")
    vv = write(work / f"{name}.vms.yml",
               f"plugin: vmware.vmware.vms\nhostname: {host}\nvalidate_certs: false\n")
    return {"virtfleet.core.hypervisors": [ours], "community.vmware.vmware_vm_inventory": [cv],
            "vmware.vmware.vms": [vv]}


def start_and_wait(eps: list[lab.VcsimEndpoint], password: str, timeout: float = 600) -> None:
    for ep in eps:
        lab.start_vcsim(ep, password, name=f"vcsim-{ep.name}")
    for ep in eps:
        lab.wait_for(f"vcsim {ep.name}", lambda ep=ep: lab.vcsim_answers(ep.address, ep.port), timeout=timeout)


def stop(eps: list[lab.VcsimEndpoint]) -> None:
    for ep in eps:
        lab.stop_pid(f"vcsim-{ep.name}")


def calibrate() -> float:
    """Seconds of a fixed CPU-bound loop (median of 3): how fast this machine was at that moment."""
    times = []
    for _run in range(3):
        start = time.monotonic()
        sum(range(20_000_000))
        times.append(time.monotonic() - start)
    return sorted(times)[1]


def main() -> int:
    before = calibrate()
    state = lab.up()
    password = state["password"]
    ensure_bench_venv()
    rows: list[tuple[str, str, Run]] = []
    work = Path(tempfile.mkdtemp(prefix="vf-bench-"))

    def measure(scenario: str, tool: str, sources: list[Path], ours: bool) -> None:
        """Median of five runs for whatever takes under 15 s (one run of this machine varies by ~20%);
        one run of the slow incumbents."""
        print(f"bench: {scenario}: {tool} ...", flush=True)
        runs = [run_inventory(ours, sources, password)]
        while len(runs) < 5 and runs[0].seconds < 15 and not runs[0].error:
            runs.append(run_inventory(ours, sources, password))
        median = sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]
        rows.append((scenario, tool, median))
        each = ", ".join(f"{r.seconds:.2f}" for r in runs)
        print(f"bench: {scenario}: {tool}: {median.seconds:.2f}s (runs: {each}), {median.hosts} hosts {median.error}",
              flush=True)

    # --- the same vCenter with 420 VMs: how cost grows with VMs
    try:
        start_and_wait([VCENTER_QUARTER], password)
        sources = vsphere_sources(work, "vcenter-q", VCENTER_QUARTER, password)
        for tool in ("virtfleet.core.hypervisors", "community.vmware.vmware_vm_inventory"):
            measure("vcenter-420 (2 ms/call)", tool, sources[tool], tool.startswith("virtfleet"))
    finally:
        stop([VCENTER_QUARTER])

    # --- vCenter, 1,680 VMs, 2 ms per call
    try:
        start_and_wait([VCENTER], password)
        for tool, sources in vsphere_sources(work, "vcenter", VCENTER, password).items():
            measure("vcenter-1680 (2 ms/call)", tool, sources, tool.startswith("virtfleet"))
        # The same inventory served from the plugin's cache (nothing contacted): what Ansible itself takes
        # to build and print 1,741 hosts with these hostvars, the floor under the first row.
        cached = write(work / "vcenter-cached.hypervisors.yml",
                       f"plugin: virtfleet.core.hypervisors\nendpoints: [vsphere://{VCENTER.address}]\nguests: true\n"
                       f"validate_certs: false\ncache: true\ncache_plugin: ansible.builtin.jsonfile\n"
                       f"cache_connection: {work / 'cache'}\n")
        run_inventory(True, [cached], password)
        measure("vcenter-1680 (2 ms/call)", "virtfleet.core.hypervisors, cache hit", [cached], True)
    finally:
        stop([VCENTER])

    # --- 64 ESXi servers vs one
    try:
        start_and_wait(ESXI, password)
        one = write(work / "one.hypervisors.yml", "plugin: virtfleet.core.hypervisors\n"
                    f"endpoints: [vsphere://{ESXI[0].address}]\nguests: true\nvalidate_certs: false\n")
        all64 = write(work / "all.hypervisors.yml", "plugin: virtfleet.core.hypervisors\nendpoints:\n"
                      + "".join(f"  - vsphere://{ep.address}\n" for ep in ESXI)
                      + "guests: true\nvalidate_certs: false\nmax_workers: 64\n")
        measure("esxi-1", "virtfleet.core.hypervisors", [one], True)
        measure("esxi-64", "virtfleet.core.hypervisors", [all64], True)
        cv_dir = work / "cv64"
        cv_dir.mkdir()
        for ep in ESXI:
            write(cv_dir / f"{ep.name}.vmware.yml", "plugin: community.vmware.vmware_vm_inventory\n"
                  f"hostname: {ep.address}\nvalidate_certs: false\nwith_tags: false\n")
        measure("esxi-64", "community.vmware.vmware_vm_inventory", [cv_dir], False)
    finally:
        stop(ESXI)

    # --- libvirt, 500 domains
    import libvirt

    conn = libvirt.open(lab.SYSTEM_URI)
    names = [f"vfbench-{i:03d}" for i in range(DOMAINS)]
    try:
        for name in names:
            try:
                conn.lookupByName(name)
            except libvirt.libvirtError:
                conn.defineXML(lab.domain_xml(name, state["domain_type"], 32))
        ours = write(work / "kvm.hypervisors.yml",
                     "plugin: virtfleet.core.hypervisors\nendpoints: [qemu:///system]\nguests: true\n")
        theirs = write(work / "kvm.libvirt.yml", "plugin: community.libvirt.libvirt\nuri: qemu:///system\n")
        measure(f"libvirt-{DOMAINS}", "virtfleet.core.hypervisors", [ours], True)
        measure(f"libvirt-{DOMAINS}", "community.libvirt.libvirt", [theirs], False)
    finally:
        for name in names:
            try:
                conn.lookupByName(name).undefine()
            except libvirt.libvirtError:
                pass
        conn.close()

    report(rows, (before, calibrate()))
    return 0


def report(rows: list[tuple[str, str, Run]], calibration: tuple[float, float]) -> None:
    ours = {s: r for s, tool, r in rows if tool == "virtfleet.core.hypervisors" and not r.error}
    lines = ["| scenario | tool | seconds | of which discovery | remote calls | hosts listed | vs virtfleet |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for scenario, tool, run in rows:
        base = ours.get(scenario)
        if tool == "virtfleet.core.hypervisors":
            ratio = "1.0x"
        elif tool.startswith("virtfleet"):
            ratio = f"{run.seconds / base.seconds:.2f} of it" if base else "n/a"
        elif run.error or not base:
            ratio = "n/a"
        else:
            ratio = f"{run.seconds / base.seconds:.1f}x the time"
        shown = f"failed: {run.error}" if run.error else f"{run.seconds:.2f}"
        discovery = f"{run.discovery:.2f}" if run.discovery is not None else "n/a"
        calls = run.calls if run.calls is not None else "n/a"
        lines.append(f"| {scenario} | {tool} | {shown} | {discovery} | {calls} | {run.hosts} | {ratio} |")
    lines.append("")
    if "esxi-1" in ours and "esxi-64" in ours:
        ratio = ours["esxi-64"].seconds / ours["esxi-1"].seconds
        lines.append(f"64 ESXi servers took {ratio:.2f}x the time of one (target: under 3x).")
    small, large = ours.get("vcenter-420 (2 ms/call)"), ours.get("vcenter-1680 (2 ms/call)")
    theirs = {s: r for s, tool, r in rows if tool == "community.vmware.vmware_vm_inventory" and not r.error}
    if small and large:
        text = (f"4x the VMs (420 -> 1,680 on the same 60 hosts) took {large.seconds / small.seconds:.1f}x the time "
                "end to end")
        if small.discovery and large.discovery:
            text += f", {large.discovery / small.discovery:.1f}x in discovery"
        t_small, t_large = theirs.get("vcenter-420 (2 ms/call)"), theirs.get("vcenter-1680 (2 ms/call)")
        if t_small and t_large:
            text += f"; community.vmware {t_large.seconds / t_small.seconds:.1f}x"
        lines.append(text + ".")
    lines.append(f"A fixed CPU loop took {calibration[0]:.2f} s before the run and {calibration[1]:.2f} s after it "
                 "(this machine's speed drifts; compare rows of one run, not across runs).")
    table = "\n".join(lines)
    print(table)
    write_section("<!-- bench-discovery -->",
                  f"## Discovery (`make bench-discovery`)\n\n{machine(platforms())}, all tools in one run on the same "
                  "simulators. Wall time of `ansible-inventory --list`, end to end; of that, the time this "
                  "collection spent contacting the endpoints (its `-v` output); remote calls are this "
                  "collection's own count of SOAP/RPC round trips. Seconds are the median of five runs for anything "
                  "under 15 s (single runs on this machine vary by ~20%), one run otherwise. The cache-hit row "
                  "serves the same inventory from the plugin's cache without contacting anything: the part of "
                  "the first row that is Ansible building and printing 1,741 hosts.\n\n" + table)


if __name__ == "__main__":
    sys.exit(main())
