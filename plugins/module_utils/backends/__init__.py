# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The backend registry: an endpoint's API -> its backend class, imported on first use so that a missing
library (libvirt-python, pyVmomi) only matters to endpoints that need it."""

from __future__ import annotations

import importlib
from typing import Dict, Tuple

from .._endpoints import Endpoint
from .._errors import ConfigError
from .base import GuestBackend, HypervisorBackend

# api -> (module under backends/, class name). A new backend is one line here and its own module.
REGISTRY: Dict[str, Tuple[str, str]] = {
    "libvirt": ("libvirt", "LibvirtBackend"),
    "vsphere": ("vsphere", "VsphereBackend"),
    "redfish": ("redfish", "RedfishBackend"),
}


def backend_for(endpoint: Endpoint, timeout: float = 10.0) -> HypervisorBackend:
    """A backend instance for the endpoint (not yet connected)."""
    try:
        module_name, class_name = REGISTRY[endpoint.api]
    except KeyError:
        raise ValueError(f"no backend for api {endpoint.api!r}") from None
    module = importlib.import_module(f"{__name__}.{module_name}")
    backend: HypervisorBackend = getattr(module, class_name)(endpoint, timeout)
    return backend


def guest_backend_for(endpoint: Endpoint, timeout: float = 10.0, option: str = "uri") -> GuestBackend:
    """A backend that can hold guests, or one ConfigError naming the option."""
    backend = backend_for(endpoint, timeout)
    if not isinstance(backend, GuestBackend):
        raise ConfigError(option, endpoint.label, "this endpoint cannot hold guests (use a libvirt or vSphere uri)")
    return backend
