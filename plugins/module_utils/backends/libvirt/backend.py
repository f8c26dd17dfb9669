# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""LibvirtBackend: the contract (backends/base.py) carried out by this package's functions. One connection per
backend (session.py); each method reads what it needs and passes it on, so no call depends on an earlier one."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from ..._changes import GuestPlan
from ..._endpoints import Endpoint
from ..._model import OWNER_TAG, Discovery, GuestSpec, GuestState, HostCapacity, Identity, Placement
from ..base import GuestBackend
from . import discovery, guests, storage
from .session import Session


class LibvirtBackend(GuestBackend):
    api = "libvirt"

    def __init__(self, endpoint: Endpoint, timeout: float = 10.0) -> None:
        self.session = Session(endpoint, timeout)
        super().__init__(endpoint, timeout)
        # A read-only memo: the host's domain capabilities do not change while a backend is in use, and
        # verify_spec runs once per guest of a run.
        self._domcaps: Optional[guests.DomainCaps] = None

    @property
    def calls(self) -> int:
        return self.session.calls

    @calls.setter
    def calls(self, value: int) -> None:
        self.session.calls = value

    def close(self) -> None:
        self.session.close()

    # ------------------------------------------------------------------ discovery
    def identify(self) -> Identity:
        return discovery.identify(self.session)

    def discover(self, guests: bool = True) -> Discovery:
        return discovery.discover(self.session, guests)

    # ------------------------------------------------------------------ convergence: reads
    def capacity(self, placement: Placement) -> HostCapacity:
        return guests.capacity(self.session, placement)

    def read_guests(self, placement: Placement) -> List[GuestState]:
        return guests.read_guests(self.session)

    def leftover_disks(self, specs: List[GuestSpec], placement: Placement) -> Dict[Tuple[str, str], float]:
        pool = storage.default_pool(storage.pool_names(self.session), placement.pool)
        return storage.leftover_disks(self.session, specs, pool, lambda: guests.volumes_in_use(self.session))

    def verify_spec(self, spec: GuestSpec) -> None:
        if self._domcaps is None:
            self._domcaps = guests.domain_caps(self.session)
        guests.verify_spec(spec, self._domcaps)

    # ------------------------------------------------------------------ convergence: mutators
    def create_guest(self, spec: GuestSpec, placement: Placement, owner: str = OWNER_TAG) -> GuestState:
        return guests.create_guest(self.session, spec, placement, owner)

    def update_guest(self, current: GuestState, plan: GuestPlan) -> None:
        guests.update_guest(self.session, current, plan)

    def start_guest(self, current: GuestState) -> None:
        guests.start_guest(self.session, current)

    def stop_guest(self, current: GuestState, timeout: float, force: bool) -> None:
        guests.stop_guest(self.session, current, timeout, force)

    def restart_guest(self, current: GuestState, timeout: float, force: bool,
                      plan: Optional[GuestPlan] = None) -> None:
        guests.restart_guest(self.session, current, timeout, force)

    def remove_guest(self, current: GuestState, remove_storage: bool) -> None:
        guests.remove_guest(self.session, current, remove_storage)
