# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The libvirt backend, by role:

session.py    the connection (reachability, auth, keepalive), every call counted, errors as one line
codec.py      domain XML: the one parse both readers use, the elements we write, the seed ISO, stored vs sent
discovery.py  identity, host facts and every guest as GuestFacts, in bulk
storage.py    volumes: names, create (exclusive), grow, kept disks, deleting what was created
guests.py     convergence: capacity, read_guests, verify_spec, create/update/start/stop/restart/remove
apply.py      update_guest's table: one function per (kind, attribute) of a planned change
backend.py    LibvirtBackend, the contract (backends/base.py) carried out by the functions above

Only this package (and the other backends) import a hypervisor library; libvirt-python only in session.py.
"""

from __future__ import annotations

from .backend import LibvirtBackend
from .codec import LIBOSINFO_NS, METADATA_NS
from .session import HAS_LIBVIRT, libvirt

__all__ = ["HAS_LIBVIRT", "LIBOSINFO_NS", "METADATA_NS", "LibvirtBackend", "libvirt"]
