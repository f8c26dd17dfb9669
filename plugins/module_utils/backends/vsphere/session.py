# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""pyVmomi's session to one vSphere endpoint (guest convergence): the lazy import, login and logout, one remote
call as one line on failure, and task waits. Also what discovery's own SOAP session shares with it: the TLS
context, the credentials check and how an exception becomes one line naming the endpoint."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import socket
import ssl
import sys
import time
from typing import Any, Callable, Iterator, List, Optional, Tuple

from ..._endpoints import Credentials, Endpoint
from ..._errors import EndpointError, MissingLibraryError, one_line
from .. import _vsphere_raw

# pyVmomi is imported on first use, by guest convergence: discovery does not need it (see _vsphere_raw),
# and importing it costs every inventory run 0.05 to 0.13 s.
HAS_PYVMOMI = importlib.util.find_spec("pyVmomi") is not None


class _PyVmomi:
    """One of pyVmomi's namespaces (`vim`, `vmodl`), importing pyVmomi when an attribute is first read."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(getattr(importlib.import_module("pyVmomi"), self._name), attr)


vim: Any = _PyVmomi("vim")
vmodl: Any = _PyVmomi("vmodl")


def preload() -> None:
    """pyVmomi and the types every read of a guest meets, loaded now (pyVmomi builds each type on first use):
    worker processes forked afterwards share them instead of each building them again."""
    if not HAS_PYVMOMI:
        return
    for name in ("vim.ServiceInstance", "vim.VirtualMachine", "vim.HostSystem", "vim.Datastore", "vim.Network",
                 "vim.Folder", "vim.Datacenter", "vim.ClusterComputeResource", "vim.ResourcePool", "vim.vm.ConfigInfo",
                 "vim.vm.device.VirtualDisk", "vim.vm.device.VirtualEthernetCard", "vim.vm.RuntimeInfo",
                 "vim.option.OptionValue", "vim.view.ContainerView", "vmodl.query.PropertyCollector.ObjectSpec"):
        space, *path = name.split(".")
        obj: Any = vim if space == "vim" else vmodl
        for part in path:
            obj = getattr(obj, part)


PAGE_SIZE = 1000
# The clock and sleep of task waits (tests replace them with a fake clock).
_monotonic = time.monotonic
_sleep = time.sleep
# A task that writes a disk (eager-zeroed or thick) may take long on real storage: its wait is bounded by this,
# plus DISK_SECONDS_PER_GIB per GiB written (about 17 MiB/s: far slower than any datastore that works). Other
# tasks get TASK_BOUND. Each poll has the connection timeout; the task's own state decides in between.
TASK_BOUND = 3600.0
DISK_SECONDS_PER_GIB = 60.0

# One container view of a bulk read: (managed object types to put in it, [(type, property paths)]).
ViewSpec = Tuple[List[Any], List[Tuple[Any, List[str]]]]


@functools.lru_cache(maxsize=8)
def _ssl_context(validate: bool, ca_path: Optional[str] = None) -> ssl.SSLContext:
    """The shared TLS context for VALIDATE and CA_PATH: one per process and setting (see tls_context)."""
    from ..._endpoints import tls_context

    return tls_context(validate, ca_path)


def ssl_context(endpoint: Endpoint) -> ssl.SSLContext:
    creds = endpoint.credentials
    return _ssl_context(bool(creds.validate_certs), creds.ca_path)


def fail(endpoint: Endpoint, timeout: float, exc: BaseException) -> EndpointError:
    """Turn whatever pyVmomi, the SOAP reader or the network raised into one line naming the endpoint."""
    label = endpoint.label
    if isinstance(exc, socket.timeout) or "timed out" in str(exc):
        return EndpointError(label, f"timed out after {timeout:g}s")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return EndpointError(label, f"TLS certificate not trusted ({exc.verify_message}); "
                                    "install its CA or set validate_certs: false")
    if isinstance(exc, ConnectionRefusedError):
        return EndpointError(label, f"connection refused on port {endpoint.port}")
    if isinstance(exc, OSError):
        return EndpointError(label, f"cannot connect on port {endpoint.port}: {exc.strerror or exc}")
    # A pyVmomi fault can only come from convergence, which imported pyVmomi.
    if (isinstance(exc, _vsphere_raw.SoapFault) and exc.kind == "InvalidLogin") or (
            "pyVmomi" in sys.modules and isinstance(exc, vim.fault.InvalidLogin)):
        return EndpointError(label, f"login refused for user '{endpoint.credentials.username}' "
                                    "(wrong user name or password)")
    msg = getattr(exc, "msg", None) or str(exc)
    return EndpointError(label, f"vSphere: {one_line(msg)}")


def credentials(endpoint: Endpoint) -> Credentials:
    """The endpoint's credentials, or one clear line before any login when there are none."""
    creds = endpoint.credentials
    if not creds.username or not creds.password:
        raise EndpointError(endpoint.label, "no credentials: set username and password (or a matching "
                                            "credentials entry, or VMWARE_USER / VMWARE_PASSWORD)")
    return creds


def fault_text(fault: Any) -> str:
    """A vSphere fault as one line: its type, its message, the file or name it is about."""
    kind = type(fault).__name__.rsplit(".", 1)[-1]
    msg = getattr(fault, "msg", None) or ""
    if not msg:
        for item in getattr(fault, "faultMessage", None) or []:
            msg = getattr(item, "message", None) or ""
            if msg:
                break
    detail = getattr(fault, "file", None) or getattr(fault, "name", None)
    text = f"{kind}: {msg}" if msg else kind
    if detail and str(detail) not in text:
        text += f" ({detail})"
    return one_line(text)


class Connection:
    """pyVmomi's stub, service content and login for one endpoint, opened on first use and closed once.
    COUNT is told about every remote round trip."""

    def __init__(self, endpoint: Endpoint, timeout: float, count: Callable[..., None]) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.count = count
        self.stub: Any = None
        self.content: Any = None
        self.logged_in = False

    def fail(self, exc: BaseException) -> EndpointError:
        return fail(self.endpoint, self.timeout, exc)

    def service_content(self) -> Any:
        if self.content is not None:
            return self.content
        if not HAS_PYVMOMI:
            raise MissingLibraryError("pyvmomi", "vSphere endpoints")
        try:
            try:
                from pyVmomi import SoapStubAdapter
            except ImportError:  # installed but broken
                raise MissingLibraryError("pyvmomi", "vSphere guest convergence") from None
            self.stub = SoapStubAdapter(host=self.endpoint.host, port=self.endpoint.port or 443,
                                        sslContext=ssl_context(self.endpoint), httpConnectionTimeout=self.timeout)
            self.content = vim.ServiceInstance("ServiceInstance", self.stub).RetrieveContent()
        except Exception as exc:  # noqa: BLE001 - network, TLS and SOAP errors all become one line
            raise self.fail(exc) from None
        self.count()
        return self.content

    def login(self) -> Any:
        content = self.service_content()
        if self.logged_in:
            return content
        creds = credentials(self.endpoint)
        try:
            content.sessionManager.Login(creds.username, creds.password)
        except Exception as exc:  # noqa: BLE001
            raise self.fail(exc) from None
        self.count()
        self.logged_in = True
        return content

    def close(self) -> None:
        if self.logged_in and self.content is not None:
            try:
                self.content.sessionManager.Logout()
                self.count()
            except Exception:  # noqa: BLE001, S110 - the session dies with the connection anyway
                pass
        self.logged_in = False
        self.content = None
        # pyVmomi's objects hold their stub in reference cycles, so its pooled connections would otherwise stay
        # open until the cycle collector runs (and discovery pauses it): close them now.
        if self.stub is not None:
            self.stub.DropConnections()
            self.stub = None

    # ------------------------------------------------------------------ calls and tasks
    def guest_error(self, name: str, what: str, exc: BaseException) -> EndpointError:
        if "pyVmomi" in sys.modules and isinstance(exc, vmodl.MethodFault):
            reason = fault_text(exc)
        else:
            reason = self.fail(exc).reason
        return EndpointError(self.endpoint.label, f"guest {name!r}: {what} failed: {reason}")

    def invoke(self, name: str, what: str, method: Any, *args: Any, **kwargs: Any) -> Any:
        """One remote call; any failure becomes one line naming the guest and the operation."""
        self.count()
        try:
            return method(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - SOAP faults and network errors all become one line
            raise self.guest_error(name, what, exc) from None

    def wait(self, task: Any, name: str, what: str, written_gib: float = 0.0) -> Any:
        """Poll a task until vSphere says it ended (few calls: the delay doubles up to 1s). Each poll is one call
        under the connection timeout; the task itself may run as long as it needs: a large eager-zeroed disk
        takes minutes to hours. Only a task that never ends is given up on, after TASK_BOUND plus
        DISK_SECONDS_PER_GIB per GiB the task writes (WRITTEN_GIB), with the task still running on vSphere."""
        bound = TASK_BOUND + DISK_SECONDS_PER_GIB * written_gib
        deadline = _monotonic() + bound
        delay = 0.05
        while True:
            info = self.invoke(name, what, getattr, task, "info")
            state = str(info.state)
            if state == "success":
                return info.result
            if state == "error":
                raise EndpointError(self.endpoint.label, f"guest {name!r}: {what} failed: {fault_text(info.error)}")
            if _monotonic() >= deadline:
                progress = getattr(info, "progress", None)
                raise EndpointError(self.endpoint.label, f"guest {name!r}: {what} still {state} after {bound:g}s"
                                    + (f" ({progress}% done)" if progress is not None else "")
                                    + "; the task goes on in vSphere")
            _sleep(delay)
            delay = min(delay * 2, 1.0)

    def task(self, name: str, what: str, method: Any, *args: Any, written_gib: float = 0.0, **kwargs: Any) -> Any:
        return self.wait(self.invoke(name, what, method, *args, **kwargs), name, what, written_gib)

    def retrieve(self, content: Any, specs: List[ViewSpec]) -> Iterator[Any]:
        """One RetrievePropertiesEx (plus continuation pages) over several container views. SPECS: for each
        view, (managed object types to put in the view, [(type, property paths)])."""
        pc = vmodl.query.PropertyCollector
        object_specs, prop_specs = [], []
        for view_types, props in specs:
            view = content.viewManager.CreateContainerView(content.rootFolder, view_types, True)
            self.count()
            traverse = pc.TraversalSpec(name="view", type=vim.view.ContainerView, path="view", skip=False)
            object_specs.append(pc.ObjectSpec(obj=view, skip=True, selectSet=[traverse]))
            for mo_type, paths in props:
                prop_specs.append(pc.PropertySpec(type=mo_type, pathSet=paths, all=False))
        filter_spec = pc.FilterSpec(objectSet=object_specs, propSet=prop_specs, reportMissingObjectsInResults=False)
        collector = content.propertyCollector
        result = collector.RetrievePropertiesEx([filter_spec], pc.RetrieveOptions(maxObjects=PAGE_SIZE))
        self.count()
        while result is not None:
            yield from result.objects
            if not result.token:
                break
            result = collector.ContinueRetrievePropertiesEx(result.token)
            self.count()
