# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""What every bench script shares: writing its own section of docs/benchmarks.md between two markers."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"


def machine(platform: str = "") -> str:
    """'Measured <date> on <n> cores (<kernel>)[, <platform>]', the line every section starts with."""
    uname = os.uname()
    line = f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores ({uname.sysname} {uname.release})"
    return f"{line}, {platform}" if platform else line


def write_section(marker: str, body: str) -> None:
    """Replace (or append) the text between MARKER and MARKER-end with BODY; the rest of the file stays."""
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    section = f"{marker}\n{body.rstrip()}\n{marker}-end\n"
    if marker in text:
        text = re.sub(re.escape(marker) + r".*?" + re.escape(marker) + "-end\n", lambda _m: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + section
    DOC.write_text(text)
    print(f"bench: written to {DOC.relative_to(DOC.parents[1])}")
