# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""Security of endpoints, probing and the wire: no password in a URI or a message, plain text only where the user
asked for it, no credentials across a redirect, bounded SOAP answers, TLS verified against the CA the user gave."""

from __future__ import annotations

import base64
import http.server
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from ansible_collections.virtfleet.core.plugins.module_utils import _discovery
from ansible_collections.virtfleet.core.plugins.module_utils._argspec import endpoint_from_params
from ansible_collections.virtfleet.core.plugins.module_utils._endpoints import (
    Credentials,
    Endpoint,
    check_transport,
    looks_secret,
    parse_endpoint,
    tls_context,
    with_credentials,
)
from ansible_collections.virtfleet.core.plugins.module_utils._errors import ConfigError, EndpointError
from ansible_collections.virtfleet.core.plugins.module_utils._model import Identity
from ansible_collections.virtfleet.core.plugins.module_utils.backends import _vsphere_raw as raw
from ansible_collections.virtfleet.core.plugins.module_utils.backends.base import HypervisorBackend
from ansible_collections.virtfleet.core.plugins.module_utils.backends.redfish import RedfishBackend

SECRET = "Hunter2-secret"


# ------------------------------------------------------------------------------------------------ defect 9
@pytest.mark.parametrize("uri", [f"vsphere://root:{SECRET}@esx01", f"redfish://admin:{SECRET}@bmc01:8443",
                                 f"qemu+ssh://root:{SECRET}@kvm01/system", f"ftp://u:{SECRET}@x",
                                 f"vsphere://root:{SECRET}@esx01:99999"])
def test_a_password_in_a_uri_is_refused_without_showing_it(uri: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_endpoint(uri, "endpoints[2].uri")
    text = str(err.value)
    assert text.startswith("endpoints[2].uri=") and "a password in the URI is refused" in text
    assert SECRET not in text and "\n" not in text


def test_a_user_in_a_vsphere_uri_is_refused_but_libvirt_keeps_its_ssh_user() -> None:
    with pytest.raises(ConfigError, match="a user in the URI is not used here; use the username option"):
        parse_endpoint("vsphere://root@esx01")
    assert parse_endpoint("qemu+ssh://root@kvm01/system").uri == "qemu+ssh://root@kvm01/system"


@pytest.mark.parametrize("name", ["password", "vcenter_password", "credentials[0].pwd", "api_token", "secret",
                                  "ssh_key", "private_key", "client_secret", "endpoints[0].passphrase"])
def test_secret_looking_names(name: str) -> None:
    assert looks_secret(name)


@pytest.mark.parametrize("name", ["timeout", "keyed_groups", "endpoints[0].uri", "monkey", "max_workers"])
def test_plain_names(name: str) -> None:
    assert not looks_secret(name)


def test_module_parameters_are_checked_before_any_traffic(tmp_path: Path) -> None:
    base = {"uri": "vsphere://esx01", "username": "u", "password": SECRET, "validate_certs": True, "timeout": 10.0}
    for bad, message in [({"timeout": 0.0}, "timeout=0.0: must be greater than 0"),
                         ({"timeout": float("nan")}, "timeout=nan"),
                         ({"uri": f"vsphere://u:{SECRET}@esx01"}, "a password in the URI is refused"),
                         ({"uri": "qemu+ext:///system?command=/bin/sh"}, "the parameter command="),
                         ({"uri": "qemu+tls://kvm01/system?no_verify=1"}, "no_verify turns off TLS"),
                         ({"ca_path": str(tmp_path / "missing.pem")}, "not a CA certificate file")]:
        with pytest.raises(ConfigError) as err:
            endpoint_from_params(dict(base, **bad))
        assert message in str(err.value) and SECRET not in str(err.value)
    ok = endpoint_from_params(dict(base, uri="qemu+tls://kvm01/system?no_verify=1", validate_certs=False))
    assert ok.credentials.validate_certs is False
    assert endpoint_from_params(dict(base, uri="qemu+ext:///system?command=/bin/x", allow_uri_commands=True))


def test_no_verify_zero_is_not_a_contradiction() -> None:
    endpoint = with_credentials(parse_endpoint("qemu+tls://kvm01/system?no_verify=0"), Credentials())
    check_transport(endpoint)


# ------------------------------------------------------------------------------------------------ issue 12
SSH_FILES = "keyfile=/runner/env/ssh_key&known_hosts=/runner/env/known_hosts"


@pytest.mark.parametrize("uri", [
    f"qemu+libssh://root@kvm01:2222/system?{SSH_FILES}&sshauth=privkey",
    f"qemu+libssh2://root@kvm01/system?{SSH_FILES}&known_hosts_verify=normal",
    "qemu+libssh://kvm01/system",
])
def test_libssh_transports_with_a_key_and_a_known_hosts_file_are_accepted(uri: str) -> None:
    endpoint = with_credentials(parse_endpoint(uri, "endpoints[0].uri"), Credentials())
    check_transport(endpoint, "endpoints[0].uri")  # keyfile= and known_hosts= run nothing and check the host key
    assert endpoint.api == "libvirt" and endpoint.host == "kvm01" and endpoint.uri == uri


@pytest.mark.parametrize(("query", "mode"), [
    (f"{SSH_FILES}&known_hosts_verify=ignore", "ignore"),
    (f"{SSH_FILES}&known_hosts_verify=auto", "auto"),
    ("Known_Hosts_Verify=IGNORE", "ignore"),  # libvirt reads names and these values case-insensitively
    ("known%5Fhosts%5Fverify=ign%6Fre", "ignore"),  # and decodes %-escapes
    ("keyfile=/k;known_hosts_verify=ignore", "ignore"),  # and splits at ; where no & follows
    (f"{SSH_FILES}&sshauth=privkey;known_hosts_verify=auto", "auto"),
])
@pytest.mark.parametrize("transport", ["libssh", "libssh2"])
def test_known_hosts_verify_that_lets_any_host_key_through_is_refused_while_validate_certs(
        transport: str, query: str, mode: str) -> None:
    uri = f"qemu+{transport}://root@kvm01/system?{query}"
    endpoint = with_credentials(parse_endpoint(uri), Credentials())
    with pytest.raises(ConfigError) as err:
        check_transport(endpoint, "endpoints[3].uri")
    text = str(err.value)
    assert text.startswith("endpoints[3].uri=") and "\n" not in text
    assert f"known_hosts_verify={mode} " in text and "while validate_certs is true" in text
    assert ("turns off SSH host key checks" if mode == "ignore" else "not in known_hosts yet") in text
    check_transport(with_credentials(endpoint, Credentials(validate_certs=False)))  # the user's explicit choice


def test_known_hosts_verify_is_checked_before_any_traffic() -> None:
    base = {"uri": f"qemu+libssh://root@kvm01/system?{SSH_FILES}&known_hosts_verify=ignore", "timeout": 10.0,
            "validate_certs": True}
    with pytest.raises(ConfigError, match="known_hosts_verify=ignore turns off SSH host key checks"):
        endpoint_from_params(base)
    assert endpoint_from_params(dict(base, validate_certs=False)).credentials.validate_certs is False


@pytest.mark.parametrize(("uri", "message"), [
    ("qemu+ssh://kvm01/system?socket=/run/x;netcat=sh", "the parameter netcat= makes libvirt run a program"),
    ("qemu+ssh://kvm01/system?Net%63at=sh", "the parameter netcat= makes libvirt run a program"),
    ("qemu+tls://kvm01/system?pkipath=/p;no_verify=1", "no_verify turns off TLS certificate checks"),
    ("qemu+ssh://kvm01/system?no_verify=1", "no_verify turns off SSH host key checks"),
])
def test_uri_parameters_are_read_as_libvirt_reads_them(uri: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_transport(with_credentials(parse_endpoint(uri), Credentials()))


# ------------------------------------------------------------------------------------------------ defect 8
class Recorder(HypervisorBackend):
    """Identifies as whatever is asked; records the URIs a probe tried."""

    tried: ClassVar[list[str]] = []

    def identify(self) -> Identity:
        Recorder.tried.append(self.endpoint.uri)
        if self.endpoint.uri.startswith("redfish+http://"):
            return Identity(api="redfish", type="bmc")
        raise EndpointError(self.endpoint.label, "not this")

    def discover(self, guests: bool = True) -> Any:
        raise NotImplementedError


@pytest.mark.parametrize("allow", [False, True])
def test_a_probe_talks_plain_text_only_when_allowed(monkeypatch: pytest.MonkeyPatch, allow: bool) -> None:
    monkeypatch.setattr(_discovery, "_port_open", lambda *_a: True)
    Recorder.tried = []
    found, misses = _discovery.probe(["192.0.2.5"], [8000, 16509, 16514], 1.0, 4, factory=Recorder,
                                     allow_plaintext=allow)
    uris = sorted(e.uri for e in found)
    if allow:
        assert "redfish+http://192.0.2.5:8000" in Recorder.tried
        assert uris == ["qemu+tcp://192.0.2.5/system", "qemu+tls://192.0.2.5/system", "redfish+http://192.0.2.5:8000"]
    else:
        assert not any(u.startswith(("redfish+http", "qemu+tcp")) for u in Recorder.tried + uris)
        assert uris == ["qemu+tls://192.0.2.5/system"]
        reasons = {m["port"]: m["error"] for m in misses}
        assert "allow_plaintext: true" in reasons[16509]
        assert set(reasons) == {8000, 16509}


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves what the server's ROUTES say for a path: (status, headers, body); records every request."""

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers.get("Authorization")))  # type: ignore[attr-defined]
        status, headers, body = self.server.routes.get(self.path, (404, {}, b"{}"))  # type: ignore[attr-defined]
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture()
def http_servers() -> Iterator[list[Any]]:
    servers = []
    for _i in range(2):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.routes, server.seen = {}, []  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


def test_redfish_sends_no_credentials_across_a_redirect_to_another_origin(http_servers: list[Any]) -> None:
    bmc, elsewhere = http_servers
    bport, eport = bmc.server_address[1], elsewhere.server_address[1]
    root = b'{"RedfishVersion": "1.6.0", "Systems": {}}'
    bmc.routes.update({
        "/redfish/v1": (301, {"Location": "/redfish/v1/"}, b""),  # same origin: followed
        "/redfish/v1/": (200, {}, root),
        "/redfish/v1/Systems": (302, {"Location": f"http://127.0.0.1:{eport}/steal"}, b""),
    })
    elsewhere.routes["/steal"] = (200, {}, b'{"Members": []}')
    endpoint = with_credentials(parse_endpoint(f"redfish+http://127.0.0.1:{bport}"),
                                Credentials("admin", SECRET, True))
    backend = RedfishBackend(endpoint, 3)
    assert backend.identify().version == "1.6.0"
    with pytest.raises(EndpointError, match="redirected to another origin") as err:
        backend.discover()
    assert SECRET not in str(err.value)
    assert elsewhere.seen == []
    token = base64.b64encode(f"admin:{SECRET}".encode()).decode()
    assert ("/redfish/v1/Systems", f"Basic {token}") in bmc.seen
    assert ("/redfish/v1", None) in bmc.seen  # the service root is read without credentials


# ------------------------------------------------------------------------------------------------ defect 11
class _Body:
    def __init__(self, size: int) -> None:
        self.left, self.status = size, 200
        import email.message

        self.headers = email.message.Message()

    def read(self, n: int = -1) -> bytes:
        take = min(n, self.left)
        self.left -= take
        return b"<x>" + b" " * (take - 3) if take else b""


class _Conn:
    def __init__(self, response: Any) -> None:
        self.response, self.closed = response, False

    def start(self, budget: float) -> None:
        self.budget = budget

    def request(self, *_args: Any) -> None:
        pass

    def getresponse(self) -> Any:
        return self.response

    def close(self) -> None:
        self.closed = True


def test_a_soap_answer_has_a_size_limit() -> None:
    response = _Body(raw.MAX_IDENTIFY_BYTES * 3)
    soap = raw.Session("127.0.0.1", 443, ssl.create_default_context(), 5, lambda: None)
    conn = _Conn(response)
    soap._idle.append(conn)  # type: ignore[arg-type]
    with pytest.raises(raw.SoapFault, match="answer larger than 1 MiB"):
        soap.service_content()
    assert conn.closed and response.left >= raw.MAX_IDENTIFY_BYTES  # stopped reading, did not drain it
    assert conn.budget == raw.CALL_DEADLINE_FACTOR * 5


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out",
                    str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.fixture()
def drip_server(tls_cert: tuple[Path, Path]) -> Iterator[int]:
    """A TLS server that answers headers at once, then one byte of body every 0.2 s, for ever."""
    cert, key = tls_cert
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                plain, _addr = listener.accept()
            except OSError:
                return
            threading.Thread(target=drip, args=(plain,), daemon=True).start()

    def drip(plain: socket.socket) -> None:
        try:
            with context.wrap_socket(plain, server_side=True) as conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: 1000000\r\n\r\n<")
                while not stop.is_set():
                    time.sleep(0.2)
                    conn.sendall(b" ")
        except OSError:
            pass

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()


def test_a_drip_feeding_endpoint_cannot_hold_a_soap_call_past_its_deadline(drip_server: int,
                                                                           tls_cert: tuple[Path, Path]) -> None:
    # Each byte comes well within the 1 s per-operation timeout; only the overall deadline can end the call.
    soap = raw.Session("127.0.0.1", drip_server, tls_context(True, str(tls_cert[0])), 1.0, lambda: None,
                       call_deadline=1.5)
    start = time.monotonic()
    with pytest.raises(raw.DeadlineExceeded, match=r"no complete answer within 1\.5s"):
        soap.call("RetrievePropertiesEx", ("PropertyCollector", "propertyCollector"))
    assert time.monotonic() - start < 4


def test_tls_is_verified_against_the_ca_path_given(drip_server: int, tls_cert: tuple[Path, Path]) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):  # the system store does not know this CA
        raw.Session("127.0.0.1", drip_server, tls_context(True), 1.0, lambda: None).service_content()
    assert tls_context(True, str(tls_cert[0])) is tls_context(True, str(tls_cert[0]))
    assert tls_context(True, str(tls_cert[0])).cert_store_stats()["x509_ca"] == 1
    assert tls_context(False).verify_mode == ssl.CERT_NONE


def test_vsphere_and_redfish_use_the_endpoints_ca_path(tls_cert: tuple[Path, Path]) -> None:
    from ansible_collections.virtfleet.core.plugins.module_utils.backends.vsphere import VsphereBackend

    creds = Credentials("u", "p", True, str(tls_cert[0]))
    vsphere = VsphereBackend(with_credentials(parse_endpoint("vsphere://esx01"), creds), 5)
    assert vsphere._ssl_context() is tls_context(True, str(tls_cert[0]))
    redfish = RedfishBackend(with_credentials(parse_endpoint("redfish://bmc01"), creds), 5)
    assert redfish._connection("https")._context is tls_context(True, str(tls_cert[0]))


def test_an_endpoint_object_never_shows_its_password() -> None:
    endpoint = with_credentials(Endpoint(api="vsphere", uri="vsphere://x", host="x"), Credentials("u", SECRET))
    assert SECRET not in repr(endpoint) and SECRET not in repr(endpoint.credentials)
