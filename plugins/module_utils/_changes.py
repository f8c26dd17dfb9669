# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""What the planner hands the backends: structured changes and a guest's plan. Data only, no logic beyond
rendering a change for users, so that the backend contract (backends/base.py) never imports the planner."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Optional, Tuple

from ._model import GuestSpec, GuestState

# What a change is about. Whole-guest fields need no key; disks are keyed by name, NICs by MAC, boot by part.
SCALAR_KINDS = ("guest", "power_state", "vcpus", "memory_mib", "firmware", "autostart", "tags", "cloud_init")
KEYED_KINDS = ("disks", "nics", "boot")
_FIELD = re.compile(r"(?P<kind>disks|nics)\[(?P<key>[^\]]+)\](?:\.(?P<attr>\w+))?|boot\.(?P<boot>\w+)|(?P<scalar>\w+)")


@dataclasses.dataclass(frozen=True)
class Change:
    """One planned change, structured: KIND (a guest field or a device kind), KEY (which disk/NIC/boot part),
    ATTR (which attribute of it; None = the whole object is added). Backends apply changes through tables
    keyed by (kind, attr); ``field`` is the same change as users read it in results (``disks[root].size_gib``)."""

    kind: str
    before: Any
    after: Any
    live: bool = True
    key: Optional[str] = None
    attr: Optional[str] = None

    def __post_init__(self) -> None:
        if self.kind in SCALAR_KINDS and self.key is None:
            return
        if self.kind in KEYED_KINDS and self.key is not None:
            return
        # Also accepts a field string as users read it ("disks[root].size_gib"), for tests and old callers.
        match = _FIELD.fullmatch(self.kind)
        if match is None or (match.group("scalar") and match.group("scalar") not in SCALAR_KINDS):
            raise ValueError(f"not a change field: {self.kind!r}")
        if match.group("boot"):
            object.__setattr__(self, "kind", "boot")
            object.__setattr__(self, "key", match.group("boot"))
        elif match.group("kind"):
            object.__setattr__(self, "kind", match.group("kind"))
            object.__setattr__(self, "key", match.group("key"))
            object.__setattr__(self, "attr", match.group("attr"))

    @property
    def field(self) -> str:
        if self.kind == "boot":
            return f"boot.{self.key}"
        if self.kind in KEYED_KINDS:
            return f"{self.kind}[{self.key}]" + (f".{self.attr}" if self.attr else "")
        return self.kind

    def to_dict(self) -> Dict[str, Any]:
        return {"field": self.field, "before": self.before, "after": self.after, "live": self.live}


@dataclasses.dataclass
class GuestPlan:
    desired: GuestSpec
    current: Optional[GuestState]
    action: str = "none"  # create | update | remove | none
    changes: List[Change] = dataclasses.field(default_factory=list)
    power: Optional[str] = None  # start | stop | restart
    restart_required: bool = False
    remove_storage: bool = False
    after: Optional[GuestSpec] = None  # the model expected after the run (None when removed)

    @property
    def changed(self) -> bool:
        return bool(self.changes)


# A paused (libvirt) or PM-suspended guest still has its running configuration in memory.
ACTIVE = ("running", "paused", "suspended")


@dataclasses.dataclass
class BackendDefaults:
    """What a backend gives a new disk or NIC when the user does not say."""

    disk_format: str = "qcow2"
    disk_bus: str = "virtio"
    nic_model: str = "virtio"
    mac_prefix: str = "52:54:00"
    # Buses a disk can be hot-plugged on (QEMU cannot hot-plug IDE or SATA disks).
    hotplug_buses: Tuple[str, ...] = ("virtio", "scsi")
    # libvirt keeps a persistent definition beside the running one, so a restart-only change can wait there;
    # vSphere cannot, and such a change on a running guest is refused while planning unless it may restart.
    stages_restart_changes: bool = True
