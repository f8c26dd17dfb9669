# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""The guests module's entries are declared suboptions (the guest spec): AnsibleModule checks them, and a refused
entry is still named in one line by its index and name; what the module returns is not masked beyond the guests'
secrets."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any, Dict

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.virtfleet.core.plugins.modules import guests

BASE = {"uri": "test:///default"}


def run(args: Dict[str, Any]) -> Dict[str, Any]:
    """The module's result for ARGS (it exits; its JSON goes to stdout)."""
    out = io.StringIO()
    with patch_module_args(args), contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        guests.main()
    return json.loads(out.getvalue())


@pytest.mark.parametrize(("bad", "field"), [
    ({"firmware": "coreboot"}, "firmware"),
    ({"colour": "blue"}, "colour"),
    ({"vcpus": "many"}, "vcpus"),
    ({"state": "gone"}, "state"),
    ({"disks": [{"size_gib": 1}]}, "name"),
    ({"nics": [{"network": "lan", "model": "tulip"}]}, "model"),
])
def test_a_refused_entry_is_one_line_naming_the_guest_and_the_field(bad: Dict[str, Any], field: str) -> None:
    result = run({**BASE, "guests": [{"name": "good01"}, {"name": "wrong01", **bad}]})
    msg = result["msg"]
    assert result["failed"] and "\n" not in msg, result
    assert msg.startswith("guests[1] (wrong01)") and field in msg, msg


def test_an_entry_that_is_not_a_dict_is_named() -> None:
    result = run({**BASE, "guests": [{"name": "good01"}, "wrong01"]})
    assert result["failed"] and result["msg"].startswith("guests[1]='wrong01': must be a dict"), result


def test_a_problem_outside_the_entries_keeps_ansibles_message() -> None:
    result = run({**BASE, "guests": [{"name": "good01"}], "exclusive": "maybe"})
    assert result["failed"] and "exclusive" in result["msg"] and "guests[" not in result["msg"], result


def test_the_entries_user_data_masks_its_secrets_only() -> None:
    """user_data is masked by the collection's rule (strings of 8 characters or more), not every value of it as
    AnsibleModule's no_log would: a guest named after a package keeps its name. The entries' types are coerced
    (vcpus '2') and a disk's datastore alias gives no warning."""
    pytest.importorskip("libvirt")
    secret = "s3cret-passw0rd"
    result = run({**BASE, "_ansible_check_mode": True, "guests": [{
        "name": "nginx01", "vcpus": "2",
        "disks": [{"name": "root", "size_gib": 1, "datastore": "default-pool"}],
        "cloud_init": {"user_data": {"packages": ["nginx"], "password": secret, "ssh_pwauth": 1}},
    }]})
    assert not result.get("failed"), result
    guest = result["guests"][0]
    assert guest["name"] == "nginx01" and guest["guest"]["vcpus"] == 2 and guest["action"] == "create", guest
    assert guest["guest"]["cloud_init"].startswith("sha256:")
    assert secret not in json.dumps(result) and not result.get("warnings"), result
