# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""The licence a Galaxy reviewer checks: LICENSE is the GPL v3 that galaxy.yml names, and every source file says
so in an SPDX header."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
TAG = "SPDX-License-Identifier: GPL-3.0-or-later"
SOURCE = (".py", ".yml", ".yaml", ".sh", ".j2", ".go")


def test_licence_file_is_the_one_galaxy_yml_names() -> None:
    assert yaml.safe_load((REPO / "galaxy.yml").read_text())["license"] == ["GPL-3.0-or-later"]
    text = (REPO / "LICENSE").read_text()
    assert "GNU GENERAL PUBLIC LICENSE" in text and "Version 3, 29 June 2007" in text


def test_every_source_file_has_an_spdx_header() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    source = [f for f in files if f.endswith(SOURCE) and "fixtures" not in f and not f.startswith("changelogs/")]
    assert len(source) > 100
    missing = [f for f in source if TAG not in (REPO / f).read_text()[:600]]
    assert not missing, f"no SPDX header: {missing}"
