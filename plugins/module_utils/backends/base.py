# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The typed contract every hypervisor backend fulfils. A new backend is a new subclass, nothing else."""

from __future__ import annotations

import abc
from typing import Any, Optional

from .._endpoints import Endpoint
from .._model import Discovery, Identity


class HypervisorBackend(abc.ABC):
    """Reads one endpoint. Instances are used from one thread, opened once, closed once.

    ``calls`` counts the remote round trips the backend made, for benchmarks and tests.
    """

    api: str = ""

    def __init__(self, endpoint: Endpoint, timeout: float = 10.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.calls = 0

    @abc.abstractmethod
    def identify(self) -> Identity:
        """What the endpoint is, without credentials where the protocol allows it."""

    @abc.abstractmethod
    def discover(self, guests: bool = True) -> Discovery:
        """Log in if needed, read host facts and (when GUESTS) every guest, in bulk."""

    def close(self) -> None:  # noqa: B027 - optional hook: a backend without a session has nothing to close
        """Log out and release the connection; safe to call twice."""

    def __enter__(self) -> HypervisorBackend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def backend_for(endpoint: Endpoint, timeout: float = 10.0) -> HypervisorBackend:
    """The backend class for an endpoint's API, imported lazily so that a missing library only
    matters to endpoints that need it."""
    backend: Optional[HypervisorBackend] = None
    if endpoint.api == "libvirt":
        from .libvirt import LibvirtBackend

        backend = LibvirtBackend(endpoint, timeout)
    elif endpoint.api == "vsphere":
        from .vsphere import VsphereBackend

        backend = VsphereBackend(endpoint, timeout)
    elif endpoint.api == "redfish":
        from .redfish import RedfishBackend

        backend = RedfishBackend(endpoint, timeout)
    if backend is None:
        raise ValueError(f"no backend for api {endpoint.api!r}")
    return backend
