# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The typed contract every hypervisor backend fulfils. A new backend is a new subclass plus one line in the
registry (backends/__init__.py). This file imports neither the planner nor a concrete backend."""

from __future__ import annotations

import abc
from typing import Any, Dict, List, Optional, Tuple, TypeVar

from .._changes import BackendDefaults, GuestPlan
from .._endpoints import Endpoint
from .._model import Discovery, GuestSpec, GuestState, HostCapacity, Identity, Placement

_B = TypeVar("_B", bound="HypervisorBackend")


class HypervisorBackend(abc.ABC):
    """Reads one endpoint. Instances are used from one thread, opened once, closed once.

    ``calls`` counts the remote round trips the backend made, for benchmarks and tests.
    """

    api: str = ""

    def __init__(self, endpoint: Endpoint, timeout: float = 10.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.calls = 0

    @classmethod
    def preload(cls) -> None:
        """Import what the backend imports on first use, before a process forks workers that all need it."""
        return None

    @abc.abstractmethod
    def identify(self) -> Identity:
        """What the endpoint is, without credentials where the protocol allows it."""

    @abc.abstractmethod
    def discover(self, guests: bool = True) -> Discovery:
        """Log in if needed, read host facts and (when GUESTS) every guest, in bulk."""

    def close(self) -> None:  # noqa: B027 - optional hook: a backend without a session has nothing to close
        """Log out and release the connection; safe to call twice."""

    def __enter__(self: _B) -> _B:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class GuestBackend(HypervisorBackend):
    """A backend that can also change guests. The planner decides; these methods only carry out.

    Every method may raise EndpointError (one line, naming the endpoint) and nothing else on purpose.
    Mutators are only ever called outside check mode, after every guest of the run was planned.
    """

    defaults: BackendDefaults = BackendDefaults()

    # ------------------------------------------------------------------ reads (bulk)
    @abc.abstractmethod
    def capacity(self, placement: Placement) -> HostCapacity:
        """The host a new guest would land on: CPUs, memory, networks, pools/datastores, MACs in use."""

    @abc.abstractmethod
    def read_guests(self, placement: Placement) -> List[GuestState]:
        """Every guest within reach, normalised into GuestState, in a fixed number of round trips."""

    def leftover_disks(self, specs: List[GuestSpec], placement: Placement) -> Dict[Tuple[str, str], float]:
        """(guest, disk) -> GiB of storage that creating that disk would reuse: a disk kept when a guest of the
        same name was removed without remove_storage. The planner checks sizes against it."""
        return {}

    def verify_spec(self, spec: GuestSpec) -> None:
        """Raise ConfigError for a field this hypervisor cannot do (called for every guest before any change)."""

    # ------------------------------------------------------------------ mutators
    @abc.abstractmethod
    def create_guest(self, spec: GuestSpec, placement: Placement, owner: str) -> GuestState:
        """Create the guest described by SPEC (complete: the planner filled defaults, MACs, pools), with its
        disks and first-boot seed, powered off, marked as OWNER's (the mark names the guest's uuid); return it
        (enough to start it).

        Create-exclusive: a guest of that name appearing meanwhile (another run) is an EndpointError, never
        overwritten. If it fails half-way it removes exactly what this call created (never storage it reused
        or that another run made), and a kill at any point leaves what it created removable by the next run."""

    @abc.abstractmethod
    def update_guest(self, current: GuestState, plan: GuestPlan) -> None:
        """Apply PLAN.changes. On a running guest the live ones reach it now; the others are written to the
        persistent definition where the backend keeps one (libvirt), else wait for apply_offline (vSphere)."""

    @abc.abstractmethod
    def start_guest(self, current: GuestState) -> None:
        """Power on (or resume) and return once the hypervisor reports it running."""

    @abc.abstractmethod
    def stop_guest(self, current: GuestState, timeout: float, force: bool) -> None:
        """ACPI/guest shutdown, wait up to TIMEOUT; then power off if FORCE, else raise EndpointError."""

    def apply_offline(self, current: GuestState, plan: GuestPlan) -> None:
        """Apply PLAN's changes that need the guest powered off, once it is. An explicit step of its own, called
        after a stop (state: stopped, or within restart_guest): a backend that keeps a persistent definition
        (libvirt) has already written them in update_guest and has nothing to do here."""

    def restart_guest(self, current: GuestState, timeout: float, force: bool, plan: Optional[GuestPlan] = None) -> None:
        """Stop, apply PLAN's offline changes, start. Backends that can record it mark the guest first, so that a run
        killed (or failing) between the stop and the start leaves a guest the next run starts again
        (GuestState.interrupted_restart); start_guest clears that mark."""
        self.stop_guest(current, timeout, force)
        if plan is not None:
            self.apply_offline(current, plan)
        self.start_guest(current)

    @abc.abstractmethod
    def remove_guest(self, current: GuestState, remove_storage: bool) -> None:
        """Power off if needed and remove the definition (nvram, snapshots metadata, managed save included).
        Disks are kept unless REMOVE_STORAGE, and then only those in current.created_disks."""
