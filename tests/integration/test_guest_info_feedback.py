# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""guest_info's output fed back as desired state changes nothing (its docs promise it), on the lab's libvirtd:
through the guests module and through the guest module, in check mode and for real."""

from __future__ import annotations

import uuid
from typing import Any, Callable, Iterator

import pytest

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.lab
Run = Callable[..., dict[str, Any]]


@pytest.fixture()
def two_guests(lab: dict[str, Any], libvirt_conn: Any, run_module: Run) -> Iterator[list[str]]:
    tag = uuid.uuid4().hex[:6]
    names = [f"vftest-feed-{tag}-a", f"vftest-feed-{tag}-b"]
    guests = [{"name": n, "vcpus": 1, "memory_mib": 64, "autostart": i == 0,
               "disks": [{"name": "root", "size_gib": 1}, {"name": "data", "size_gib": 1}],
               "nics": [{"network": lab["libvirt"]["network"]}], "tags": {"suite": tag},
               "cloud_init": {"user_data": {"hostname": n}, "meta_data": {"instance-id": n}}}
              for i, n in enumerate(names)]
    made = run_module("guests", {"uri": lab["libvirt"]["uri"], "datastore": lab["libvirt"]["pool"],
                                 "domain_type": lab["domain_type"], "guests": guests})
    assert made["_status"] == "CHANGED", made
    yield names
    run_module("guests", {"uri": lab["libvirt"]["uri"], "remove_storage": True,
                          "guests": [{"name": n, "state": "absent"} for n in names]})
    for name in names:  # whatever is left if the removal failed
        try:
            libvirt_conn.lookupByName(name).undefine()
        except libvirt.libvirtError:
            pass


def test_guest_info_output_fed_back_changes_nothing(lab: dict[str, Any], run_module: Run,
                                                    two_guests: list[str]) -> None:
    uri = lab["libvirt"]["uri"]
    info = run_module("guest_info", {"uri": uri, "name": two_guests[0].rsplit("-", 1)[0] + "-*"})
    guests = info["guests"]
    assert [g["name"] for g in guests] == two_guests
    assert guests[0]["autostart"] is True and len(guests[0]["disks"]) == 2, "the read must carry what was set"
    assert guests[0]["status"]["cloud_init_digest"].startswith("sha256:")
    for check in (True, False):
        again = run_module("guests", {"uri": uri, "guests": guests}, check=check)
        assert again["_status"] == "SUCCESS", again
        assert not any(g["changed"] for g in again["guests"]), again["guests"]
    single = run_module("guest", {"uri": uri, **guests[1]}, check=True)
    assert single["_status"] == "SUCCESS" and single["changed"] is False, single
