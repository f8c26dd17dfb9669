# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""vSphere discovery over SOAP without pyVmomi: the few read-only calls discovery makes, and their answers.

Discovery needs six calls (RetrieveServiceContent, Login, CreateContainerView, RetrievePropertiesEx and its
continuation, Logout). Through pyVmomi they cost ~10 to 12 ms of this process's CPU per ESXi server, most of
it in its pure-Python SAX deserialiser, plus 0.05 to 0.13 s to import it; here they cost ~6 ms, a TLS
handshake included (64 ESXi servers, profiled). A 1,680-VM vCenter answers ~300,000 elements for the VM
properties, which pyVmomi took ~3 s to parse. So the requests are written here (fixed shapes, every value
escaped) and the answers parsed by ElementTree's C parser, read for exactly the fields discovery reports.
Guest convergence, which builds specs and runs tasks, stays on pyVmomi (see vsphere.py).
"""

from __future__ import annotations

import http.client
import http.cookies
import io
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple
from xml.sax.saxutils import escape

VIM = "{urn:vim25}"
XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"
NIC_TYPES = ("VirtualVmxnet3", "VirtualVmxnet2", "VirtualVmxnet", "VirtualE1000e", "VirtualE1000", "VirtualPCNet32",
             "VirtualSriovEthernetCard", "VirtualVmxnet3Vrdma")
# The API version asked for: what pyVmomi's plain SoapStubAdapter asks for, and what every server this
# collection supports (vSphere 6.5+) answers; discovery reads nothing newer.
SOAP_ACTION = "urn:vim25/5.5"
_ENVELOPE = ('<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope '
             'xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
             'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>'
             '<{method} xmlns="urn:vim25"><_this type="{kind}">{moid}</_this>{args}</{method}>'
             '</soapenv:Body></soapenv:Envelope>')
_SOAPENV = "{http://schemas.xmlsoap.org/soap/envelope/}"
SESSION_COOKIE = "vmware_soap_session"
# Bounds of one call: the answer's size, and the whole call (connect, request, answer) in multiples of the
# per-operation timeout. A 1,000-VM page is ~20 MB; RetrieveServiceContent (identification, and the first
# thing a probed address is asked) is ~5 KB.
MAX_ANSWER_BYTES = 256 << 20
MAX_IDENTIFY_BYTES = 1 << 20
CALL_DEADLINE_FACTOR = 6.0


class DeadlineExceeded(Exception):
    """A call whose whole answer did not arrive within its deadline (a slow or stalled endpoint)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.msg = message


class AnswerTooLarge(Exception):
    """An answer over the size limit of its call; not read further."""


class _BoundedReader(io.RawIOBase):
    """The socket's reads (through its own SocketIO, which keeps the socket open while it is read), each
    waiting at most until the connection's deadline."""

    def __init__(self, raw: Any, sock: socket.socket, conn: BoundedConnection) -> None:
        super().__init__()
        self._raw, self._sock, self._conn = raw, sock, conn

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self._conn.arm(self._sock)
        try:
            return int(self._raw.readinto(buffer))
        except socket.timeout:
            self._conn.remaining()  # the deadline, if that is what ended the wait
            raise

    def close(self) -> None:
        self._raw.close()
        super().close()


class _BoundedSocket:
    """A connected socket as http.client uses it (sendall, makefile, close), held to the call's deadline."""

    def __init__(self, sock: socket.socket, conn: BoundedConnection) -> None:
        self._sock, self._conn = sock, conn

    def makefile(self, mode: str = "rb", *_args: Any, **_kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_BoundedReader(self._sock.makefile("rb", buffering=0), self._sock, self._conn))

    def sendall(self, data: Any) -> None:
        self._conn.arm(self._sock)
        self._sock.sendall(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class BoundedConnection:
    """Mixin for http.client connections: every wait (connect, TLS handshake, each read and write) ends by
    the deadline of the current call, set with start(BUDGET) before each request. A drip-feeding endpoint
    cannot hold a call longer than its budget, however it splits its answer."""

    timeout: Any
    sock: Any
    deadline: float = float("inf")
    budget: float = 0.0
    op_timeout: float = 10.0

    def start(self, budget: float) -> None:
        self.budget, self.deadline = budget, time.monotonic() + budget

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"no complete answer within {self.budget:g}s (the per-call deadline)")
        return left

    def arm(self, sock: socket.socket) -> None:
        sock.settimeout(min(self.op_timeout, self.remaining()))

    def connect(self) -> None:
        self.timeout = min(self.op_timeout, self.remaining())
        super().connect()  # type: ignore[misc]
        self.sock = _BoundedSocket(self.sock, self)


class BoundedHTTPSConnection(BoundedConnection, http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(host, port, context=context, timeout=timeout)
        self.op_timeout = timeout


class BoundedHTTPConnection(BoundedConnection, http.client.HTTPConnection):
    def __init__(self, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.op_timeout = timeout


def read_bounded(response: Any, limit: int, feed: Callable[[bytes], None]) -> int:
    """Read RESPONSE in chunks into FEED, at most LIMIT bytes (else AnswerTooLarge); the bytes read."""
    size = 0
    while True:
        chunk = response.read(1 << 16)
        if not chunk:
            return size
        size += len(chunk)
        if size > limit:
            raise AnswerTooLarge(f"answer larger than {limit >> 20 or 1} MiB; not read further")
        feed(chunk)


class SoapFault(Exception):
    """A fault the endpoint answered: its vSphere type (InvalidLogin, NotAuthenticated, ...) and message."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message or kind)
        self.kind = kind
        self.msg = message


class ServiceContent:
    """What discovery reads of RetrieveServiceContent: the product (about) and the managers it calls."""

    def __init__(self, returnval: ET.Element) -> None:
        about = returnval.find(f"{VIM}about")
        self.about: Dict[str, Optional[str]] = {
            child.tag[len(VIM):]: child.text for child in (about if about is not None else [])}
        self.root_folder = child_text(returnval, f"{VIM}rootFolder") or ""
        self.property_collector = child_text(returnval, f"{VIM}propertyCollector") or ""
        self.view_manager = child_text(returnval, f"{VIM}viewManager") or ""
        self.session_manager = child_text(returnval, f"{VIM}sessionManager") or ""


def object_spec(kind: str, moid: str, traverse_view: bool = False) -> str:
    """An ObjectSpec for one managed object, or for the members of a ContainerView."""
    if traverse_view:
        return (f'<objectSet><obj type="ContainerView">{escape(moid)}</obj><skip>true</skip>'
                '<selectSet xsi:type="TraversalSpec"><name>view</name><type>ContainerView</type><path>view</path>'
                '<skip>false</skip></selectSet></objectSet>')
    return f'<objectSet><obj type="{kind}">{escape(moid)}</obj><skip>false</skip></objectSet>'


def filter_spec(props: Sequence[Tuple[str, Sequence[str]]], objects: Sequence[str],
                report_missing: bool = False) -> str:
    """A PropertyFilterSpec: for each type its property paths, over OBJECTS (object_spec strings)."""
    prop_specs = "".join(f"<propSet><type>{kind}</type><all>false</all>"
                         + "".join(f"<pathSet>{escape(path)}</pathSet>" for path in paths) + "</propSet>"
                         for kind, paths in props)
    missing = "<reportMissingObjectsInResults>true</reportMissingObjectsInResults>" if report_missing else ""
    return f"<specSet>{prop_specs}{''.join(objects)}{missing}</specSet>"


class Session:
    """One endpoint's SOAP session: its cookie and a pool of keep-alive connections, one per concurrent call.

    ON_CALL is called once per round trip (the backend counts them). Thread-safe: the VM read of a large
    endpoint runs in concurrent parts, each on its own connection. Each call is bounded: its answer by
    MAX_ANSWER_BYTES, its whole duration by CALL_DEADLINE (default CALL_DEADLINE_FACTOR x TIMEOUT).
    """

    def __init__(self, host: str, port: int, context: ssl.SSLContext, timeout: float,
                 on_call: Callable[[], None], call_deadline: Optional[float] = None) -> None:
        self.host, self.port, self.context, self.timeout = host, port, context, timeout
        self.call_deadline = call_deadline or CALL_DEADLINE_FACTOR * timeout
        self.on_call = on_call
        self.cookie: Optional[str] = None
        self._idle: List[BoundedHTTPSConnection] = []
        self._lock = threading.Lock()

    def _connection(self) -> BoundedHTTPSConnection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return BoundedHTTPSConnection(self.host, self.port, self.context, self.timeout)

    def call(self, method: str, this: Tuple[str, str], args: str = "",
             max_bytes: int = MAX_ANSWER_BYTES) -> ET.Element:
        """METHOD on managed object THIS = (type, moref id), with ARGS (XML, already escaped); its <returnval>
        (an empty one for a void method). A fault, or an answer over MAX_BYTES, raises SoapFault; a call
        over its deadline raises DeadlineExceeded; network and TLS errors raise as they are."""
        body = _ENVELOPE.format(method=method, kind=this[0], moid=escape(this[1]), args=args).encode()
        headers = {"Content-Type": "text/xml; charset=UTF-8", "SOAPAction": SOAP_ACTION}
        if self.cookie:
            headers["Cookie"] = self.cookie
        conn = self._connection()
        conn.start(self.call_deadline)
        try:
            conn.request("POST", "/sdk", body, headers)
            response = conn.getresponse()
            # Parsed while it arrives, so that parsing overlaps the endpoint still writing the answer.
            parser = ET.XMLParser()  # noqa: S314 - ElementTree does not resolve external entities
            read_bounded(response, max_bytes, parser.feed)
            root = parser.close()
        except ET.ParseError:
            conn.close()
            raise SoapFault("", f"HTTP {response.status}, not a vSphere SOAP answer") from None
        except AnswerTooLarge as exc:
            conn.close()
            raise SoapFault("", str(exc)) from None
        except Exception:
            conn.close()
            raise
        self.on_call()
        with self._lock:
            self._idle.append(conn)
        for header in response.headers.get_all("Set-Cookie") or []:
            jar: http.cookies.SimpleCookie = http.cookies.SimpleCookie()
            try:
                jar.load(header)
            except http.cookies.CookieError:
                continue
            if SESSION_COOKIE in jar:  # other cookies (a load balancer's) are not the session
                self.cookie = f"{SESSION_COOKIE}={jar[SESSION_COOKIE].coded_value}"
        # Envelope > Body > the method's response (its <returnval>) or a Fault: direct paths, no tree walk.
        fault = root.find(f"{_SOAPENV}Body/{_SOAPENV}Fault")
        if fault is not None or response.status != 200:
            raise _fault(fault, response.status)
        returnval = root.find(f"{_SOAPENV}Body/*/{VIM}returnval")
        return returnval if returnval is not None else ET.Element(f"{VIM}returnval")

    def service_content(self) -> ServiceContent:
        return ServiceContent(self.call("RetrieveServiceContent", ("ServiceInstance", "ServiceInstance"),
                                        max_bytes=MAX_IDENTIFY_BYTES))

    def login(self, content: ServiceContent, username: str, password: str) -> None:
        self.call("Login", ("SessionManager", content.session_manager),
                  f"<userName>{escape(username)}</userName><password>{escape(password)}</password>")

    def logout(self, content: ServiceContent) -> None:
        self.call("Logout", ("SessionManager", content.session_manager))

    def container_view(self, content: ServiceContent, types: Sequence[str]) -> str:
        """A ContainerView over everything of TYPES under the root folder; its moref id."""
        args = (f'<container type="Folder">{escape(content.root_folder)}</container>'
                + "".join(f"<type>{kind}</type>" for kind in types) + "<recursive>true</recursive>")
        return self.call("CreateContainerView", ("ViewManager", content.view_manager), args).text or ""

    def retrieve(self, content: ServiceContent, spec: str,
                 page_size: int) -> Iterator[Tuple[str, str, Dict[str, ET.Element]]]:
        """RetrievePropertiesEx + ContinueRetrievePropertiesEx of SPEC (filter_spec): (type, moref id,
        {property path: <val>}) per object, page after page."""
        collector = ("PropertyCollector", content.property_collector)
        result = self.call("RetrievePropertiesEx", collector,
                           f"{spec}<options><maxObjects>{int(page_size)}</maxObjects></options>")
        while True:
            for obj in result.iterfind(f"{VIM}objects"):
                ref = obj.find(f"{VIM}obj")
                props = {}
                for prop in obj.iterfind(f"{VIM}propSet"):
                    name, val = prop.find(f"{VIM}name"), prop.find(f"{VIM}val")
                    if name is not None and name.text and val is not None:
                        props[name.text] = val
                if ref is not None:
                    yield ref.get("type", ""), ref.text or "", props
            token = result.findtext(f"{VIM}token")
            if not token:
                return
            result = self.call("ContinueRetrievePropertiesEx", collector, f"<token>{escape(token)}</token>")

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _fault(fault: Optional[ET.Element], status: int) -> Exception:
    """The SoapFault of a fault answer: the type from <detail> (xsi:type), the message from <faultstring>."""
    if fault is None:
        return SoapFault("", f"HTTP {status}, not a vSphere SOAP answer")
    kind = ""
    detail = fault.find("detail")
    if detail is not None and len(detail):
        kind = xsi_type(detail[0]) or detail[0].tag.rsplit("}", 1)[-1].replace("Fault", "")
    return SoapFault(kind or (fault.findtext("faultcode") or "Fault"), fault.findtext("faultstring") or "")


def refs(val: Optional[ET.Element], kind: Optional[str] = None) -> List[str]:
    """The moref ids of an ArrayOfManagedObjectReference (only those of type KIND, if given)."""
    if val is None:
        return []
    return [child.text for child in val if child.text and (kind is None or child.get("type") == kind)]


def children(val: Optional[ET.Element]) -> Dict[str, Optional[str]]:
    """A flat data object (AboutInfo, HostHardwareSummary, ...) as {field: text}; the first of a repeated one."""
    out: Dict[str, Optional[str]] = {}
    for child in val if val is not None else []:
        out.setdefault(child.tag[len(VIM):], child.text)
    return out


def text(val: Optional[ET.Element]) -> Optional[str]:
    return val.text if val is not None else None


def integer(val: Optional[ET.Element]) -> Optional[int]:
    return number(text(val))


def number(value: Optional[str]) -> Optional[int]:
    """An xsd:int/long text (a field of children()) as an int; None when absent or empty."""
    return int(value) if value else None


def boolean(val: Optional[ET.Element]) -> bool:
    return val is not None and (val.text or "").strip() == "true"


def child_text(element: ET.Element, path: str) -> Optional[str]:
    found = element.find(path)
    return found.text if found is not None else None


def xsi_type(element: ET.Element) -> str:
    return element.get(XSI_TYPE, "").rsplit(":", 1)[-1]


def devices(val: Optional[ET.Element]) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """(disks, nics) of a config.hardware.device answer: plain dicts with the fields discovery reports."""
    if val is None:
        return [], []
    controllers: Dict[str, str] = {}
    raw_disks, nics = [], []
    for dev in val:
        kind = xsi_type(dev)
        key = child_text(dev, f"{VIM}key") or ""
        if kind.endswith("Controller"):
            controllers[key] = kind
        elif kind == "VirtualDisk":
            raw_disks.append(dev)
        elif kind in NIC_TYPES:
            backing = dev.find(f"{VIM}backing")
            network_name = network_ref = portgroup = None
            if backing is not None:
                network_name = child_text(backing, f"{VIM}deviceName")
                network_ref = child_text(backing, f"{VIM}network")
                portgroup = child_text(backing, f"{VIM}port/{VIM}portgroupKey")
            nics.append({"mac": (child_text(dev, f"{VIM}macAddress") or "").lower() or None,
                         "network_name": network_name, "network_ref": network_ref, "portgroup": portgroup,
                         "model": kind.replace("Virtual", "").lower()})
    disks = []
    for dev in raw_disks:
        size_bytes = child_text(dev, f"{VIM}capacityInBytes")
        size_kb = child_text(dev, f"{VIM}capacityInKB")
        disks.append({"label": child_text(dev, f"{VIM}deviceInfo/{VIM}label") or child_text(dev, f"{VIM}key"),
                      "bytes": int(size_bytes) if size_bytes else int(size_kb or 0) * 1024,
                      "file": child_text(dev, f"{VIM}backing/{VIM}fileName"),
                      "controller": controllers.get(child_text(dev, f"{VIM}controllerKey") or "")})
    return disks, nics


def options(val: Optional[ET.Element]) -> Dict[str, str]:
    """An ArrayOfOptionValue (extraConfig) as a dict; the last value of a key wins."""
    out: Dict[str, str] = {}
    if val is not None:
        for option in val:
            key = child_text(option, f"{VIM}key")
            if key is not None:
                out[key] = child_text(option, f"{VIM}value") or ""
    return out


def addresses(val: Optional[ET.Element]) -> List[str]:
    """The IP addresses of a guest.net answer."""
    if val is None:
        return []
    return [a.text for a in val.iterfind(f"*/{VIM}ipAddress") if a.text]
