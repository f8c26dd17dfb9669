# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""What each module loads: read-only modules never load the planner or the convergence engine, and no module
imports a hypervisor library it does not need before it talks to an endpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BUILD = Path(__file__).resolve().parents[4] / ".build"
ENGINE = ("._converge", "._plan", "._guest_module")


def loaded_by(module: str) -> set[str]:
    """The collection's modules (and libvirt/pyVmomi) that importing plugins/modules/MODULE loads, in a fresh
    interpreter, the way Ansible's collection loader imports them."""
    code = (
        "import sys\n"
        "from ansible.utils.collection_loader._collection_finder import _AnsibleCollectionFinder\n"
        f"_AnsibleCollectionFinder(paths=[{str(BUILD)!r}])._install()\n"
        f"import ansible_collections.virtfleet.core.plugins.modules.{module}\n"
        "print('\\n'.join(m for m in sys.modules if m.startswith(('ansible_collections.virtfleet', 'libvirt', "
        "'pyVmomi'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize("module", ["guest_info", "hypervisor_info"])
def test_read_only_modules_do_not_load_the_convergence_engine(module: str) -> None:
    loaded = loaded_by(module)
    prefix = "ansible_collections.virtfleet.core.plugins.module_utils"
    assert f"{prefix}._argspec" in loaded, "the probe must see the collection's modules (else it proves nothing)"
    assert not [m for m in loaded if m.endswith(ENGINE)], sorted(loaded)
    assert not [m for m in loaded if m.startswith(("libvirt", "pyVmomi"))], "no hypervisor library before use"


def test_the_guest_modules_do_load_it() -> None:
    assert any(m.endswith("._converge") for m in loaded_by("guests"))
