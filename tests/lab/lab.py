# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""The local hypervisor lab: libvirt (KVM or TCG, also over SSH), vcsim ESXi/vCenter endpoints, sushy Redfish BMCs.

Usage: lab.py up | down | status [--json]

Every process the lab starts has a PID file under .lab/run and is stopped by that PID, never by name.
Every endpoint listens on a loopback address (127.0.10.0/24); the lab's libvirt network has no IP address
and no forwarding, so nothing a lab guest sends leaves its bridge.
State for tests and the demo (endpoints, credentials, the accelerator chosen) is written to
.lab/state.json, readable by root only because it holds the lab's generated password.
"""

from __future__ import annotations

import argparse
import dataclasses
import grp
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import libvirt

# libvirt prints every error to stderr by default; the lab reports what matters itself.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

REPO = Path(__file__).resolve().parents[2]
# By its real path: .lab may be a link to another checkout's lab, and the paths written into state.json and into
# the lab's own config files (sshd's) must stay valid when this checkout goes away.
LAB = (REPO / ".lab").resolve()
RUN = LAB / "run"
LOG = LAB / "log"
STATE_FILE = LAB / "state.json"
VCSIM_SRC = Path(__file__).resolve().parent / "vcsim"
VCSIM_BIN = LAB / "bin" / "vcsim-lab"
GUEST_DIR = LAB / "guest"
POOL_DIR = LAB / "pool"

SYSTEM_URI = "qemu:///system"
LIBVIRT_TCP_ADDR = "127.0.10.30"
LIBVIRT_TCP_URI = f"qemu+tcp://{LIBVIRT_TCP_ADDR}/system"
POOL_NAME = "virtfleet-lab"
NETWORK_NAME = "virtfleet-lab"
BRIDGE_NAME = "vflab0"
# Names of domains the lab (and the tests) own; lab-down destroys those that run.
DOMAIN_PREFIXES = ("vflab-", "vftest-", "vfbench-", "vfdemo-")
DISCOVERY_DOMAINS = ("vflab-web-01", "vflab-web-02", "vflab-db-01")
LAB_USER = "root"


@dataclasses.dataclass(frozen=True)
class VcsimEndpoint:
    """One vcsim process: an ESXi server or a vCenter."""

    name: str
    address: str
    mode: str
    args: tuple[str, ...] = ()
    port: int = 443


VCSIM_ENDPOINTS = (
    VcsimEndpoint("vcenter", "127.0.10.10", "vpx",
                  ("-hosts", "1", "-clusters", "1", "-cluster-hosts", "2", "-vms", "2")),
    VcsimEndpoint("esx01", "127.0.10.11", "esx", ("-vms", "2")),
    VcsimEndpoint("esx02", "127.0.10.12", "esx", ("-vms", "3")),
)
SUSHY_ADDR = "127.0.10.20"
SUSHY_PORT = 8000
# libvirt over SSH: the lab's own sshd (not the system's) in front of the lab's libvirtd.
SSH_ADDR = "127.0.10.40"
SSH_PORT = 2222
SSH_DIR = LAB / "ssh"
SSHD_BIN = "/usr/sbin/sshd"  # sshd re-executes itself for every connection: it must be started by absolute path
SSHD_PRIVSEP_DIR = Path("/run/sshd")
# libssh (not qemu+ssh, which runs OpenSSH's client with ~/.ssh/known_hosts) takes the key and the known_hosts
# file in the URI, and refuses a host key that is not in that file.
SSH_TRANSPORT = "libssh"
SSH_URI = f"qemu+{SSH_TRANSPORT}://{LAB_USER}@{SSH_ADDR}:{SSH_PORT}/system"


_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"lab: [{time.monotonic() - _T0:5.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- processes
def pid_file(name: str) -> Path:
    return RUN / f"{name}.pid"


def read_pid(name: str) -> int | None:
    """The PID recorded for NAME if that process is still alive, else None (and the stale file is removed)."""
    path = pid_file(name)
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
        return None
    # A zombie child of ours is not alive for our purposes.
    try:
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
            path.unlink(missing_ok=True)
            return None
    except OSError:
        return None
    return pid


def spawn(name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
    """Start a long-running process in its own session, record its PID, return it."""
    RUN.mkdir(parents=True, exist_ok=True)
    LOG.mkdir(parents=True, exist_ok=True)
    with open(LOG / f"{name}.log", "ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=env, cwd=LAB,
        )
    pid_file(name).write_text(f"{proc.pid}\n")
    return proc.pid


def stop_pid(name: str, timeout: float = 15.0) -> bool:
    """Stop the process recorded in NAME's PID file: SIGTERM, then SIGKILL after TIMEOUT. True if one ran."""
    pid = read_pid(name)
    if pid is None:
        pid_file(name).unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child
        except ChildProcessError:
            pass
        if read_pid(name) is None:
            break
        time.sleep(0.1)
    else:
        log(f"{name} (pid {pid}) ignored SIGTERM; sending SIGKILL")
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    try:
        os.waitpid(pid, 0)  # reap our own child now that it has exited, so no zombie is left behind
    except ChildProcessError:
        pass  # not our child: its parent (init) reaps it
    pid_file(name).unlink(missing_ok=True)
    return True


def wait_for(what: str, check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
            last = exc
        time.sleep(0.2)
    raise SystemExit(f"lab: {what} did not come up within {timeout:.0f}s ({last}); see {LOG}")


def port_open(addr: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((addr, port)) == 0


# ---------------------------------------------------------------------------------------------- state
def load_state() -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads(STATE_FILE.read_text())
        return state
    except (OSError, ValueError):
        return {}


def save_state(state: dict[str, Any]) -> None:
    LAB.mkdir(parents=True, exist_ok=True)
    tmp = STATE_FILE.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(state, fh, indent=2, sort_keys=True)
    tmp.replace(STATE_FILE)


# ---------------------------------------------------------------------------------------------- libvirt
def libvirt_answers() -> bool:
    try:
        conn = libvirt.open(SYSTEM_URI)
    except libvirt.libvirtError:
        return False
    conn.close()
    return True


def ensure_kvm_device() -> None:
    """Give /dev/kvm the owner Debian's udev rule gives it (root:kvm 0660) where no udev did.

    libvirt runs QEMU as libvirt-qemu (group kvm). With /dev/kvm present but closed to that user,
    libvirt 9.0 throws its QEMU capabilities cache away on every domain start and re-probes QEMU
    about ten times: 35-50 s per start instead of 0.5 s.
    """
    kvm = Path("/dev/kvm")
    if not kvm.exists():
        return
    st = kvm.stat()
    try:
        gid = grp.getgrnam("kvm").gr_gid
    except KeyError:
        return
    if st.st_gid != gid or st.st_mode & 0o060 != 0o060:
        os.chown(kvm, 0, gid)
        kvm.chmod(0o660)
        log("/dev/kvm set to root:kvm 0660, as Debian's udev rule would")


def ensure_libvirtd() -> bool:
    """Use a libvirtd that already answers; otherwise start virtlogd and libvirtd. True if the lab owns it."""
    ensure_kvm_device()
    if read_pid("libvirtd") is not None or libvirt_answers():
        return read_pid("libvirtd") is not None
    RUN.mkdir(parents=True, exist_ok=True)
    if read_pid("virtlogd") is None:
        subprocess.run(["virtlogd", "-d", "-p", str(pid_file("virtlogd"))], check=True)
    conf = LAB / "libvirtd.conf"
    # TCP on a loopback address only, so that discovery has a remote-style libvirt URI to find.
    # auth_tcp none is acceptable here because nothing but this machine can reach 127.0.10.30.
    conf.write_text(
        "listen_tls = 0\nlisten_tcp = 1\n"
        f'listen_addr = "{LIBVIRT_TCP_ADDR}"\ntcp_port = "16509"\nauth_tcp = "none"\n'
    )
    subprocess.run(["libvirtd", "-d", "-l", "-f", str(conf), "-p", str(pid_file("libvirtd"))], check=True)
    wait_for("libvirtd", libvirt_answers)
    return True


def ensure_pool(conn: libvirt.virConnect) -> None:
    POOL_DIR.mkdir(parents=True, exist_ok=True)
    try:
        pool = conn.storagePoolLookupByName(POOL_NAME)
    except libvirt.libvirtError:
        xml = (f"<pool type='dir'><name>{POOL_NAME}</name>"
               f"<target><path>{POOL_DIR}</path></target></pool>")
        pool = conn.storagePoolDefineXML(xml, 0)
    if not pool.isActive():
        pool.create(0)
    pool.setAutostart(1)


def ensure_network(conn: libvirt.virConnect) -> None:
    try:
        net = conn.networkLookupByName(NETWORK_NAME)
    except libvirt.libvirtError:
        # No <ip> and no <forward>: an isolated bridge with no address, no DHCP, no route anywhere.
        xml = f"<network><name>{NETWORK_NAME}</name><bridge name='{BRIDGE_NAME}' stp='off'/></network>"
        net = conn.networkDefineXML(xml)
    if not net.isActive():
        net.create()
    net.setAutostart(1)


def domain_xml(name: str, domain_type: str, memory_mib: int = 64, kernel: bool = False,
               console_log: Path | None = None, extra_disks: str = "") -> str:
    """A minimal domain: direct kernel boot of the lab guest when KERNEL, else BIOS with nothing to boot."""
    boot = ""
    if kernel:
        boot = (f"<kernel>{GUEST_DIR / 'vmlinuz'}</kernel><initrd>{GUEST_DIR / 'initrd.gz'}</initrd>"
                "<cmdline>console=ttyS0 quiet panic=-1</cmdline>")
    serial = "<serial type='pty'/>"
    if console_log is not None:
        serial = (f"<serial type='file'><source path='{console_log}'/></serial>"
                  f"<console type='file'><source path='{console_log}'/></console>")
    return (
        f"<domain type='{domain_type}'><name>{name}</name><memory unit='MiB'>{memory_mib}</memory>"
        "<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type>"
        f"{boot}</os><on_reboot>destroy</on_reboot><devices>{extra_disks}"
        f"<interface type='network'><source network='{NETWORK_NAME}'/><model type='virtio'/></interface>"
        f"{serial}</devices></domain>"
    )


# ---------------------------------------------------------------------------------------------- tiny guest
GUEST_MODULES = (
    "drivers/virtio/virtio_ring.ko", "drivers/virtio/virtio.ko", "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko", "drivers/virtio/virtio_pci.ko", "drivers/block/virtio_blk.ko",
    "drivers/cdrom/cdrom.ko", "fs/isofs/isofs.ko",
)

GUEST_INIT = r"""#!/bin/busybox sh
# virtfleet lab guest: report boot, then the NoCloud seed's hostname, on the serial console.
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
echo "virtfleet-guest: booted"
for m in MODULES; do insmod /modules/$m 2>/dev/null; done
mdev -s
found=""
for dev in /dev/vd? /dev/sr?; do
  [ -b "$dev" ] || continue
  if mount -t iso9660 -o ro "$dev" /seed 2>/dev/null; then
    if [ -f /seed/meta-data ]; then found="$dev"; break; fi
    umount /seed
  fi
done
if [ -n "$found" ]; then
  host=$(sed -n 's/^local-hostname:[[:space:]]*//p' /seed/meta-data | tr -d '\r"')
  echo "virtfleet-guest: seed=$found hostname=$host"
else
  echo "virtfleet-guest: no seed"
fi
echo "virtfleet-guest: done"
while true; do sleep 3600; done
"""


def kernel_package() -> str:
    out = subprocess.run(["apt-cache", "depends", "linux-image-cloud-amd64"], check=True,
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends: linux-image-"):
            return line.split(": ", 1)[1]
    raise SystemExit("lab: cannot resolve linux-image-cloud-amd64 (run apt-get update)")


def build_guest() -> None:
    """Kernel from Debian's cloud kernel package, initramfs of busybox-static and eight modules."""
    if (GUEST_DIR / "initrd.gz").exists() and (GUEST_DIR / "vmlinuz").exists():
        return
    cache = LAB / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    pkg = kernel_package()
    debs = list(cache.glob(f"{pkg}_*.deb"))
    if not debs:
        log(f"downloading {pkg} (kernel for the lab guest)")
        subprocess.run(["apt-get", "download", pkg], cwd=cache, check=True, capture_output=True)
        debs = list(cache.glob(f"{pkg}_*.deb"))
    extract = cache / "kernel"
    shutil.rmtree(extract, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(extract)], check=True)
    release = pkg.removeprefix("linux-image-")
    root = cache / "initramfs"
    shutil.rmtree(root, ignore_errors=True)
    for sub in ("bin", "proc", "sys", "dev", "seed", "modules"):
        (root / sub).mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    names = []
    for mod in GUEST_MODULES:
        src = extract / "lib" / "modules" / release / "kernel" / mod
        shutil.copy2(src, root / "modules" / src.name)
        names.append(src.name)
    init = root / "init"
    init.write_text(GUEST_INIT.replace("MODULES", " ".join(names)))
    init.chmod(0o755)
    GUEST_DIR.mkdir(parents=True, exist_ok=True)
    files = subprocess.run(["find", "."], cwd=root, check=True, capture_output=True).stdout
    cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files,
                          check=True, capture_output=True).stdout
    import gzip
    (GUEST_DIR / "initrd.gz").write_bytes(gzip.compress(cpio))
    shutil.copy2(extract / "boot" / f"vmlinuz-{release}", GUEST_DIR / "vmlinuz")
    log(f"built lab guest from {pkg} and busybox-static")


def boots(conn: libvirt.virConnect, domain_type: str, timeout: float) -> bool:
    """Boot the lab guest under DOMAIN_TYPE and read its console: did the kernel reach our init?"""
    name = f"vflab-probe-{domain_type}"
    console = LOG / f"{name}.console"
    console.unlink(missing_ok=True)
    try:
        dom = conn.createXML(domain_xml(name, domain_type, 128, kernel=True, console_log=console), 0)
    except libvirt.libvirtError as exc:
        log(f"{domain_type} domain did not start: {exc}")
        return False
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if console.exists() and "virtfleet-guest: booted" in console.read_text(errors="replace"):
                return True
            time.sleep(0.25)
        return False
    finally:
        try:
            dom.destroy()
        except libvirt.libvirtError:
            pass


def choose_domain_type(conn: libvirt.virConnect, state: dict[str, Any]) -> str:
    if state.get("domain_type") in ("kvm", "qemu"):
        return str(state["domain_type"])
    LOG.mkdir(parents=True, exist_ok=True)
    if os.path.exists("/dev/kvm") and boots(conn, "kvm", 10):
        chosen = "kvm"
    elif boots(conn, "qemu", 60):
        chosen = "qemu"
    else:
        raise SystemExit(f"lab: the lab guest booted neither under KVM nor TCG; see {LOG}/vflab-probe-*.console")
    log(f"guests run with domain type '{chosen}' (decided by booting the lab guest)")
    return chosen


def ensure_discovery_domains(conn: libvirt.virConnect, domain_type: str) -> None:
    """A few defined domains for discovery; the first one runs (BIOS with nothing to boot: idle, tiny)."""
    for i, name in enumerate(DISCOVERY_DOMAINS):
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError:
            dom = conn.defineXML(domain_xml(name, domain_type, memory_mib=32 + 32 * i))
        if i == 0 and not dom.isActive():
            dom.create()


# ---------------------------------------------------------------------------------------------- vcsim
def build_vcsim() -> None:
    src_mtime = max(p.stat().st_mtime for p in VCSIM_SRC.glob("*.go"))
    if VCSIM_BIN.exists() and VCSIM_BIN.stat().st_mtime >= src_mtime:
        return
    VCSIM_BIN.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, GOPATH="/usr/share/gocode", GO111MODULE="off", GOCACHE=str(LAB / "gocache"))
    log("building vcsim-lab from Debian's govmomi 0.24 sources (offline)")
    subprocess.run(["go", "build", "-o", str(VCSIM_BIN), "."], cwd=VCSIM_SRC, env=env, check=True)


def vcsim_answers(addr: str, port: int) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the lab's simulator has a throwaway self-signed certificate
    with urllib.request.urlopen(f"https://{addr}:{port}/about", context=ctx, timeout=2) as resp:
        return bool(resp.status == 200)


def start_vcsim(ep: VcsimEndpoint, password: str, extra: tuple[str, ...] = (), name: str | None = None) -> None:
    name = name or f"vcsim-{ep.name}"
    if read_pid(name) is not None:
        return
    if port_open(ep.address, ep.port):
        raise SystemExit(f"lab: {ep.address}:{ep.port} is taken by a process the lab did not start")
    argv = [str(VCSIM_BIN), "-listen", f"{ep.address}:{ep.port}", "-mode", ep.mode,
            "-username", LAB_USER, "-password", password, *ep.args, *extra]
    spawn(name, argv)


# ---------------------------------------------------------------------------------------------- sushy
def sushy_answers() -> bool:
    with urllib.request.urlopen(f"http://{SUSHY_ADDR}:{SUSHY_PORT}/redfish/v1/Systems", timeout=2) as resp:
        return bool(resp.status == 200)


def start_sushy() -> None:
    if read_pid("sushy") is not None:
        return
    conf = LAB / "sushy.conf"
    conf.write_text(f"SUSHY_EMULATOR_LIBVIRT_URI = '{SYSTEM_URI}'\nSUSHY_EMULATOR_LISTEN_IP = '{SUSHY_ADDR}'\n"
                    f"SUSHY_EMULATOR_LISTEN_PORT = {SUSHY_PORT}\n")
    exe = Path(sys.executable).with_name("sushy-emulator")
    spawn("sushy", [str(exe), "--config", str(conf), "--interface", SUSHY_ADDR, "--port", str(SUSHY_PORT),
                    "--libvirt-uri", SYSTEM_URI])


# ---------------------------------------------------------------------------------------------- sshd
@dataclasses.dataclass(frozen=True)
class SshFiles:
    """The lab sshd's files."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "sshd_config"

    @property
    def host_key(self) -> Path:
        return self.root / "host_ed25519_key"

    @property
    def client_key(self) -> Path:
        return self.root / "id_ed25519"

    @property
    def authorized_keys(self) -> Path:
        return self.root / "authorized_keys"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"


def ssh_files() -> SshFiles:
    return SshFiles(SSH_DIR)


def public_key(key: Path) -> str:
    """'ssh-ed25519 AAAA...' of a key pair made by ssh-keygen (its comment left out)."""
    kind, blob = key.with_name(key.name + ".pub").read_text().split()[:2]
    return f"{kind} {blob}"


def sshd_config(files: SshFiles) -> str:
    """Public-key logins of the lab user on one loopback address, and nothing else: no password, no PAM, no
    forwarding of any kind, no TTY; the key is also marked `restrict` in authorized_keys."""
    return "\n".join([
        "# The virtfleet lab's sshd (tests/lab/lab.py writes this file): libvirt over SSH to the lab's libvirtd.",
        f"ListenAddress {SSH_ADDR}:{SSH_PORT}",
        f"HostKey {files.host_key}",
        f"PidFile {pid_file('sshd')}",  # the file spawn() writes, with the same PID (sshd -D does not fork)
        f"AuthorizedKeysFile {files.authorized_keys}",
        f"AllowUsers {LAB_USER}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "HostbasedAuthentication no",
        "UsePAM no",
        # Off: sshd would refuse the lab's key wherever a directory above the checkout is writable by others (a
        # clone under /tmp). The lab writes authorized_keys itself, root's and 0600, with the lab's one key.
        "StrictModes no",
        "AllowTcpForwarding no",
        "AllowStreamLocalForwarding no",
        "AllowAgentForwarding no",
        "X11Forwarding no",
        "PermitTunnel no",
        "GatewayPorts no",
        "PermitTTY no",
        "PermitUserEnvironment no",
        "PrintMotd no",
        "LogLevel VERBOSE",
        "",
    ])


def ensure_ssh_files() -> SshFiles:
    """Host key and the lab user's key pair (made once), authorized_keys, known_hosts and sshd_config."""
    SSH_DIR.mkdir(parents=True, exist_ok=True)
    SSH_DIR.chmod(0o700)
    files = ssh_files()
    for key, comment in ((files.host_key, "virtfleet-lab-sshd"), (files.client_key, "virtfleet-lab-client")):
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)],
                           check=True, stdin=subprocess.DEVNULL)
            log(f"generated {key.name} in {SSH_DIR}")
    for path, text in ((files.authorized_keys, f"restrict {public_key(files.client_key)} virtfleet-lab-client\n"),
                       (files.known_hosts, f"[{SSH_ADDR}]:{SSH_PORT} {public_key(files.host_key)}\n"),
                       (files.config, sshd_config(files))):
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        path.chmod(0o600)
    return files


def ssh_answers() -> bool:
    """Whether an SSH server greets on the lab's SSH address."""
    with socket.create_connection((SSH_ADDR, SSH_PORT), timeout=2) as sock:
        return sock.recv(64).startswith(b"SSH-2.0-")


def start_sshd() -> SshFiles:
    files = ensure_ssh_files()
    if read_pid("sshd") is not None:
        return files
    if port_open(SSH_ADDR, SSH_PORT):
        raise SystemExit(f"lab: {SSH_ADDR}:{SSH_PORT} is taken by a process the lab did not start")
    # sshd's privilege separation directory; systemd's tmpfiles makes it where systemd runs.
    SSHD_PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    check = subprocess.run([SSHD_BIN, "-t", "-f", str(files.config)], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise SystemExit(f"lab: sshd refuses {files.config}: {check.stderr.strip()}")
    # -D: in the foreground (the PID recorded is sshd's), -e: its log to stderr, that is .lab/log/sshd.log.
    spawn("sshd", [SSHD_BIN, "-D", "-e", "-f", str(files.config)])
    return files


def ssh_state(files: SshFiles) -> dict[str, Any]:
    """How to reach the lab's libvirtd over SSH; paths only (state.json holds no key material)."""
    return {"uri": SSH_URI, "transport": SSH_TRANSPORT, "user": LAB_USER, "host": SSH_ADDR, "port": SSH_PORT,
            "private_key": str(files.client_key), "known_hosts": str(files.known_hosts)}


# ---------------------------------------------------------------------------------------------- commands
def up() -> dict[str, Any]:
    if os.geteuid() != 0:
        raise SystemExit("lab: must run as root (libvirt system mode, ports 443)")
    state = load_state()
    state.setdefault("password", secrets.token_urlsafe(18))
    build_vcsim()
    build_guest()
    state["libvirtd_owned"] = ensure_libvirtd()
    log("libvirtd answers")
    conn = libvirt.open(SYSTEM_URI)
    try:
        ensure_pool(conn)
        ensure_network(conn)
        state["domain_type"] = choose_domain_type(conn, state)
        ensure_discovery_domains(conn, state["domain_type"])
        state["libvirt_hostname"] = conn.getHostname()
    finally:
        conn.close()
    for ep in VCSIM_ENDPOINTS:
        start_vcsim(ep, state["password"])
    start_sushy()
    ssh = start_sshd()
    log("waiting for vcsim, sushy-emulator and sshd")
    for ep in VCSIM_ENDPOINTS:
        wait_for(f"vcsim {ep.name} on {ep.address}", lambda ep=ep: vcsim_answers(ep.address, ep.port))
    wait_for("sushy-emulator", sushy_answers)
    wait_for(f"sshd on {SSH_ADDR}:{SSH_PORT}", ssh_answers)
    state.update(
        username=LAB_USER,
        libvirt={"uri": SYSTEM_URI, "tcp_uri": LIBVIRT_TCP_URI if state["libvirtd_owned"] else None,
                 "ssh": ssh_state(ssh),
                 "pool": POOL_NAME, "network": NETWORK_NAME, "domains": list(DISCOVERY_DOMAINS)},
        vcsim={ep.name: {"address": ep.address, "port": ep.port, "mode": ep.mode} for ep in VCSIM_ENDPOINTS},
        redfish={"url": f"http://{SUSHY_ADDR}:{SUSHY_PORT}"},
        guest={"kernel": str(GUEST_DIR / "vmlinuz"), "initrd": str(GUEST_DIR / "initrd.gz")},
    )
    save_state(state)
    log("up")
    return state


def down() -> None:
    if libvirt_answers():
        conn = libvirt.open(SYSTEM_URI)
        try:
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                if dom.name().startswith(DOMAIN_PREFIXES):
                    dom.destroy()
        finally:
            conn.close()
    for name in sorted(p.stem for p in RUN.glob("*.pid")) if RUN.exists() else []:
        if name in ("libvirtd", "virtlogd"):
            continue
        if stop_pid(name):
            log(f"stopped {name}")
    for name in ("libvirtd", "virtlogd"):
        if stop_pid(name):
            log(f"stopped {name}")
    log("down")


def status(as_json: bool) -> int:
    state = load_state()
    rows: list[tuple[str, str, str, bool]] = []
    rows.append(("libvirt", SYSTEM_URI, f"libvirtd ({'lab' if read_pid('libvirtd') else 'system'})",
                 libvirt_answers()))
    if read_pid("libvirtd"):
        rows.append(("libvirt-tcp", LIBVIRT_TCP_URI, "libvirtd TCP listener", port_open(LIBVIRT_TCP_ADDR, 16509)))
    for ep in VCSIM_ENDPOINTS:
        ok = False
        try:
            ok = vcsim_answers(ep.address, ep.port)
        except OSError:
            pass
        kind = "vCenter (vcsim VPX)" if ep.mode == "vpx" else "ESXi (vcsim ESX)"
        rows.append((ep.name, f"vsphere://{ep.address}", kind, ok))
    ok = False
    try:
        ok = sushy_answers()
    except OSError:
        pass
    rows.append(("bmc", f"http://{SUSHY_ADDR}:{SUSHY_PORT}/redfish/v1", "Redfish (sushy-emulator)", ok))
    ok = False
    try:
        ok = ssh_answers()
    except OSError:
        pass
    rows.append(("libvirt-ssh", SSH_URI, "libvirtd over SSH (the lab's sshd)", ok))
    if as_json:
        print(json.dumps([{"name": n, "endpoint": e, "what": w, "up": u} for n, e, w, u in rows], indent=2))
    else:
        print(f"{'NAME':<12} {'UP':<5} {'ENDPOINT':<44} WHAT")
        for n, e, w, u in rows:
            print(f"{n:<12} {'yes' if u else 'NO':<5} {e:<44} {w}")
        if state.get("domain_type"):
            print(f"guest domain type: {state['domain_type']}")
    return 0 if all(r[3] for r in rows) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.command == "up":
        up()
        return status(args.json)
    if args.command == "down":
        down()
        return 0
    return status(args.json)


if __name__ == "__main__":
    sys.exit(main())
