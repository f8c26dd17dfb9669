# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""Shared pytest configuration: make the collection importable as ansible_collections.virtfleet.core."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / ".build"
# `make collection` copies the tree to .build/ansible_collections/virtfleet/core; tests import from there
# exactly as Ansible does. Fall back to a symlinked tree for a bare `pytest` run.
if not (BUILD / "ansible_collections" / "virtfleet" / "core").exists():
    (BUILD / "ansible_collections" / "virtfleet").mkdir(parents=True, exist_ok=True)
    (BUILD / "ansible_collections" / "virtfleet" / "core").symlink_to(REPO)
sys.path.insert(0, str(REPO / "tests" / "lab"))

# Import the collection the way Ansible does (its collection finder), before any test imports it, so that
# plugin loading (inventory_loader.get) and plain imports see the same modules.
from ansible.utils.collection_loader._collection_finder import _AnsibleCollectionFinder  # noqa: E402

_AnsibleCollectionFinder(paths=[str(BUILD)])._install()
