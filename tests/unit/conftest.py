# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""Unit-test fixtures: the collection loaded the way Ansible loads it, fakes at the library boundary."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture()
def inventory_plugin() -> Any:
    from ansible.inventory.data import InventoryData
    from ansible.parsing.dataloader import DataLoader
    from ansible.plugins.loader import inventory_loader
    from ansible.template import Templar

    plugin = inventory_loader.get("virtfleet.core.hypervisors")
    assert plugin is not None
    plugin.inventory = InventoryData()
    plugin.loader = DataLoader()
    plugin.templar = Templar(loader=plugin.loader)
    return plugin
