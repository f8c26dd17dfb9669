# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The libvirt connection: reachability check, authentication, keepalive, and every call counted with a libvirt
error turned into one EndpointError line. The only place libvirt-python is imported; the other modules of this
package take ``libvirt`` from here."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, List, Optional
from urllib.parse import urlsplit

from ..._endpoints import Endpoint
from ..._errors import EndpointError, MissingLibraryError, one_line

try:
    import libvirt

    HAS_LIBVIRT = True
except ImportError:  # pragma: no cover - depends on the environment
    libvirt = None
    HAS_LIBVIRT = False

TRANSPORT_PORTS = {"tcp": 16509, "tls": 16514, "ssh": 22, "libssh": 22, "libssh2": 22}

# libvirt's default event loop, which keepalive needs: registered once per process, before the first remote
# connection opens, and run by one daemon thread.
_EVENT_LOOP_LOCK = threading.Lock()
_event_thread: Optional[threading.Thread] = None


def _quiet(_ctx: Any, _err: Any) -> None:
    """libvirt prints every error to stderr by default; we raise them as exceptions instead."""


def _run_events() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except libvirt.libvirtError:
            time.sleep(0.1)


def start_event_loop() -> None:
    """Register libvirt's default event implementation and start the thread that runs it, once per process."""
    global _event_thread  # one event loop per process, by libvirt's design
    with _EVENT_LOOP_LOCK:
        if _event_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()
        thread = threading.Thread(target=_run_events, name="virtfleet-libvirt-events", daemon=True)
        thread.start()
        _event_thread = thread


def reachable(endpoint: Endpoint, timeout: float) -> None:
    """Fail fast with a clear reason when a remote libvirt cannot be reached within TIMEOUT."""
    parts = urlsplit(endpoint.uri)
    transport = parts.scheme.split("+", 1)[1] if "+" in parts.scheme else ""
    if not parts.hostname or transport not in TRANSPORT_PORTS:
        return
    port = parts.port or TRANSPORT_PORTS[transport]
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            pass
    except socket.timeout:
        raise EndpointError(endpoint.label, f"timed out after {timeout:g}s connecting to port {port}") from None
    except OSError as exc:
        raise EndpointError(endpoint.label, f"cannot connect to port {port}: {exc.strerror or exc}") from None


def _open(endpoint: Endpoint) -> Any:
    creds = endpoint.credentials
    if not (creds.username or creds.password):
        return libvirt.open(endpoint.uri)

    def answer(cred_list: List[List[Any]], _data: Any) -> int:
        for cred in cred_list:
            if cred[0] == libvirt.VIR_CRED_AUTHNAME:
                cred[4] = creds.username
            elif cred[0] == libvirt.VIR_CRED_PASSPHRASE:
                cred[4] = creds.password
        return 0

    return libvirt.openAuth(endpoint.uri, [[libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_PASSPHRASE], answer, None], 0)


class Session:
    """One libvirt connection, opened on first use, and the count of round trips made on it (``calls``)."""

    def __init__(self, endpoint: Endpoint, timeout: float) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.calls = 0
        self._conn: Any = None

    def connect(self) -> Any:
        if self._conn is not None:
            return self._conn
        if not HAS_LIBVIRT:
            raise MissingLibraryError("libvirt-python", "libvirt endpoints")
        libvirt.registerErrorHandler(_quiet, None)
        reachable(self.endpoint, self.timeout)
        remote = bool(self.endpoint.host)
        if remote:
            # libvirt has no per-call timeout; its keepalive closes a connection whose peer stopped answering,
            # which ends a blocked call.
            start_event_loop()
        try:
            conn = _open(self.endpoint)
        except libvirt.libvirtError as exc:
            raise self.error("libvirt", exc) from None
        self.calls += 1
        if remote:
            # A ping after INTERVAL idle seconds, the connection closed after COUNT unanswered: about TIMEOUT.
            interval = max(1, int(-(-self.timeout // 3)))
            try:
                conn.setKeepAlive(interval, 2)
            except libvirt.libvirtError:  # a driver without keepalive (e.g. over a local socket): nothing to do
                pass
        self._conn = conn
        return conn

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001, S110 - closing a dead connection must not hide the real error
                pass
            self._conn = None

    def error(self, what: str, exc: Any) -> EndpointError:
        """A libvirt error as one line naming the endpoint and WHAT was being done."""
        return EndpointError(self.endpoint.label, f"{what}: {one_line(exc.get_error_message())}")

    def fail(self, message: str) -> EndpointError:
        return EndpointError(self.endpoint.label, message)

    def call(self, what: str, func: Any, *args: Any) -> Any:
        """One libvirt call; a libvirt error becomes EndpointError naming WHAT."""
        self.calls += 1
        try:
            return func(*args)
        except libvirt.libvirtError as exc:
            raise self.error(what, exc) from None

    def lookup(self, func: Any, key: Optional[str]) -> Optional[Any]:
        """FUNC(KEY), or None when libvirt has no such object (or cannot say)."""
        self.calls += 1
        try:
            return func(key)
        except libvirt.libvirtError:
            return None
