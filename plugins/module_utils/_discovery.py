# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Discovery of many endpoints in parallel, and probing of address ranges for hypervisor APIs.

Results are plain JSON-able dicts without credentials: the same data goes to the inventory, to the
inventory cache and to module results.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import json
import socket
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ._endpoints import (
    LIBVIRT_PORTS,
    PLAINTEXT_LIBVIRT_PORTS,
    Credentials,
    Endpoint,
    public_summary,
    with_credentials,
)
from ._errors import EndpointError, VirtfleetError, one_line
from .backends import backend_for
from .backends.base import HypervisorBackend

BackendFactory = Callable[[Endpoint, float], HypervisorBackend]
Progress = Callable[[str], None]


def _no_progress(_msg: str) -> None:
    """Default progress sink: say nothing."""


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while discovery results are read and turned into inventory.

    Reading a large endpoint allocates ~300,000 XML elements plus the facts built from them, in a process
    that (under Ansible) already holds a large heap; every few hundred allocations the collector ran and its
    full passes walked that whole heap: ~0.5 s of a 1,680-VM inventory (measured). Nearly all of it is freed
    by reference counting; what is left in cycles waits until the collector is restored (as it was,
    also on error). Backends close their connections in close(), so no socket waits with it.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def discover_endpoint(endpoint: Endpoint, guests: bool, timeout: float,
                      factory: BackendFactory = backend_for) -> Dict[str, Any]:
    """Discover one endpoint. Never raises for endpoint trouble: the error is part of the result."""
    start = time.monotonic()
    result: Dict[str, Any] = {"endpoint": public_summary(endpoint), "error": None}
    backend = factory(endpoint, timeout)
    try:
        found = backend.discover(guests=guests)
        result.update(
            identity=found.identity.to_dict(),
            hypervisors=[h.to_dict() for h in found.hypervisors],
            guests=_guest_dicts(found),
            bmc=found.bmc,
        )
    except VirtfleetError as exc:
        result["error"] = exc.reason if isinstance(exc, EndpointError) else str(exc)
    except Exception as exc:  # noqa: BLE001 - one broken endpoint must not take the inventory down
        result["error"] = f"unexpected {type(exc).__name__}: {one_line(exc)}"
    finally:
        backend.close()
    result["calls"] = backend.calls
    result["seconds"] = round(time.monotonic() - start, 3)
    # A JSON round trip turns library types (pyVmomi's short/long, enum strings) into plain Python values,
    # which is what the inventory, its cache and module results can hold. Guest facts are plain already
    # (GuestFacts.to_dict of values the backends parse themselves) and are most of the data: they skip it.
    guest_dicts = result.pop("guests", None)
    plain: Dict[str, Any] = json.loads(json.dumps(result, default=str))
    if guest_dicts is not None:
        plain["guests"] = guest_dicts
    return plain


def _guest_dicts(found: Any) -> List[Dict[str, Any]]:
    # A guest names its hypervisor by the backend key; here it gets the hypervisor's inventory name.
    names = {h.key: h.name for h in found.hypervisors}
    out = []
    for guest in found.guests:
        data: Dict[str, Any] = guest.to_dict()
        data["hypervisor"] = names.get(guest.host_key)
        out.append(data)
    return out


def discover_all(endpoints: Sequence[Endpoint], guests: bool, timeout: float, max_workers: int,
                 progress: Progress = _no_progress, factory: BackendFactory = backend_for) -> List[Dict[str, Any]]:
    """Discover every endpoint, at most MAX_WORKERS at a time; results in the order of ENDPOINTS."""
    if not endpoints:
        return []
    results: List[Optional[Dict[str, Any]]] = [None] * len(endpoints)
    workers = max(1, min(max_workers, len(endpoints)))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="virtfleet") as pool:
        futures = {pool.submit(discover_endpoint, ep, guests, timeout, factory): i for i, ep in enumerate(endpoints)}
        done = 0
        for future in concurrent.futures.as_completed(futures):
            i = futures[future]
            result = future.result()
            results[i] = result
            done += 1
            label = endpoints[i].label
            if result["error"]:
                progress(f"[{done}/{len(endpoints)}] {label}: unreachable after {result['seconds']:.2f}s: "
                         f"{result['error']}")
            else:
                what = result["identity"]["type"]
                progress(f"[{done}/{len(endpoints)}] {label}: {what}, {len(result['hypervisors'])} hypervisor(s), "
                         f"{len(result['guests'])} guest(s) in {result['seconds']:.2f}s ({result['calls']} calls)")
    return [r for r in results if r is not None]


# ---------------------------------------------------------------------------------------------- probing
def _port_open(address: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def _identify_open_port(address: str, port: int, timeout: float, factory: BackendFactory,
                        creds: Credentials, allow_plaintext: bool = False) -> Tuple[Optional[Endpoint], Optional[str]]:
    """What answers on an open port: (endpoint, None), or (None, why nothing known answered).

    Only TLS is tried (vSphere, Redfish over https, libvirt over TLS) unless ALLOW_PLAINTEXT: then also Redfish
    over plain http and libvirt over plain TCP, where credentials travel in the clear."""
    host = f"[{address}]" if ":" in address else address
    candidates: List[Endpoint] = []
    if port in LIBVIRT_PORTS:
        if port in PLAINTEXT_LIBVIRT_PORTS and not allow_plaintext:
            return None, (f"port {port} is libvirt over plain TCP ({LIBVIRT_PORTS[port]}), not tried: set "
                          "allow_plaintext: true to use it, or list a qemu+tls:// or qemu+ssh:// uri")
        candidates.append(Endpoint(api="libvirt", uri=f"{LIBVIRT_PORTS[port]}://{host}/system", host=address,
                                   port=port))
    else:
        candidates.append(Endpoint(api="vsphere", uri=f"vsphere://{host}:{port}", host=address, port=port))
        candidates.append(Endpoint(api="redfish", uri=f"redfish://{host}:{port}", host=address, port=port))
        if allow_plaintext:
            candidates.append(Endpoint(api="redfish", uri=f"redfish+http://{host}:{port}", host=address, port=port))
    reasons = []
    for candidate in (with_credentials(c, creds) for c in candidates):
        if candidate.api == "libvirt":
            # The libvirt RPC port has no unauthenticated identification; it is a libvirt endpoint by protocol.
            return candidate, None
        backend = factory(candidate, timeout)
        try:
            backend.identify()
            return candidate, None
        except VirtfleetError as exc:
            reasons.append(f"{candidate.api}: {exc.reason if isinstance(exc, EndpointError) else exc}")
        finally:
            backend.close()
    return None, "; ".join(reasons)


def probe(addresses: Sequence[str], ports: Sequence[int], timeout: float, max_workers: int,
          credentials: Callable[[str], Credentials] = lambda _host: Credentials(),
          progress: Progress = _no_progress, factory: BackendFactory = backend_for,
          allow_plaintext: bool = False) -> Tuple[List[Endpoint], List[Dict[str, Any]]]:
    """Scan ADDRESSES x PORTS: endpoints that identified themselves, and open ports where nothing known answered.

    CREDENTIALS gives the credentials for an address (TLS verification applies to identification too).
    Plain HTTP and plain libvirt TCP are only tried with ALLOW_PLAINTEXT (see _identify_open_port).

    The connect timeout is kept short (a closed or filtered port is the common case in a range)."""
    targets = [(a, p) for a in addresses for p in ports]
    connect_timeout = min(timeout, 1.5)
    found: List[Endpoint] = []
    unknown: List[Dict[str, Any]] = []
    workers = max(1, min(max_workers, len(targets) or 1))

    def check(target: Tuple[str, int]) -> Tuple[Optional[Endpoint], Optional[Dict[str, Any]]]:
        address, port = target
        if not _port_open(address, port, connect_timeout):
            return None, None
        endpoint, why = _identify_open_port(address, port, timeout, factory, credentials(address), allow_plaintext)
        if endpoint is None:
            return None, {"address": address, "port": port, "error": f"nothing known answered ({why})"}
        return endpoint, None

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="virtfleet-probe") as pool:
        for i, (endpoint, miss) in enumerate(pool.map(check, targets), start=1):
            if endpoint is not None:
                found.append(endpoint)
                progress(f"probe: {endpoint.uri} answers ({endpoint.api})")
            if miss is not None:
                unknown.append(miss)
                progress(f"probe: {miss['address']}:{miss['port']} is open but {miss['error']}")
            if i % 256 == 0:
                progress(f"probe: {i}/{len(targets)} address:port pairs checked "
                         f"({time.monotonic() - started:.1f}s)")
    return found, unknown


def dedupe(endpoints: Sequence[Endpoint]) -> List[Endpoint]:
    """Drop repeated endpoints (the same URI written twice, or found by a probe and also listed)."""
    seen, out = set(), []
    for endpoint in endpoints:
        key = (endpoint.api, endpoint.host, endpoint.port) if endpoint.host else (endpoint.api, endpoint.uri)
        if key not in seen:
            seen.add(key)
            out.append(endpoint)
    return out
