# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The backend registry: an endpoint's API -> its backend class, imported on first use so that a missing
library (libvirt-python, pyVmomi) only matters to endpoints that need it."""

from __future__ import annotations

from typing import Callable, Dict, Type

from .._endpoints import Endpoint
from .._errors import ConfigError
from .base import GuestBackend, HypervisorBackend


def _libvirt() -> Type[HypervisorBackend]:
    from .libvirt import LibvirtBackend

    return LibvirtBackend


def _vsphere() -> Type[HypervisorBackend]:
    from .vsphere import VsphereBackend

    return VsphereBackend


def _redfish() -> Type[HypervisorBackend]:
    from .redfish import RedfishBackend

    return RedfishBackend


# api -> the backend class, imported on first use. A new backend is one entry here and its own module. The
# imports are written out (not importlib): Ansible ships a module's module_utils by reading its import lines.
REGISTRY: Dict[str, Callable[[], Type[HypervisorBackend]]] = {
    "libvirt": _libvirt,
    "vsphere": _vsphere,
    "redfish": _redfish,
}


def preload(api: str) -> None:
    """Load the backend of API and what it imports on first use (see HypervisorBackend.preload)."""
    load = REGISTRY.get(api)
    if load is not None:
        load().preload()


def backend_for(endpoint: Endpoint, timeout: float = 10.0) -> HypervisorBackend:
    """A backend instance for the endpoint (not yet connected)."""
    try:
        load = REGISTRY[endpoint.api]
    except KeyError:
        raise ValueError(f"no backend for api {endpoint.api!r}") from None
    return load()(endpoint, timeout)


def guest_backend_for(endpoint: Endpoint, timeout: float = 10.0, option: str = "uri") -> GuestBackend:
    """A backend that can hold guests, or one ConfigError naming the option."""
    backend = backend_for(endpoint, timeout)
    if not isinstance(backend, GuestBackend):
        raise ConfigError(option, endpoint.label, "this endpoint cannot hold guests (use a libvirt or vSphere uri)")
    return backend
