# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""The changelog fragments make a clean first release: antsibull-changelog releases them in a copy of changelogs/
(never in the repository, whose fragments stay unreleased until a maintainer cuts the release), every fragment is
consumed, the release has its summary and every section the fragments name, and no fragment narrates development.

Everything expected is derived from changelogs/config.yaml and the fragments themselves."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHANGELOGS = REPO / "changelogs"
VERSION = "1.0.0"
DATE = "2026-12-01"

# Development narrative has no place in a user's release notes: issue and pull-request numbers, the review of a
# change, refactoring, benchmark targets. "reviewed" and "reviewable" stay allowed: applying the reviewed plan is a
# feature (the filter fleet_check_reviewed, -e fleet_plan=...), the word "review" alone is the development one.
DEVELOPMENT = [
    re.compile(r"\bissues?\s*#?\d+", re.IGNORECASE),
    re.compile(r"\b(?:PR|pull request)\s*#?\d+", re.IGNORECASE),
    re.compile(r"(?<![\w&])#\d+\b"),
    re.compile(r"\breview(?:s|ers?)?\b", re.IGNORECASE),
    re.compile(r"\brefactor", re.IGNORECASE),
    re.compile(r"\b(?:TODO|WIP|fixup)\b"),
    re.compile(r"\bbench-\w+|\btargets? (?:met|missed)\b", re.IGNORECASE),
]


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


CONFIG: Dict[str, Any] = load_yaml(CHANGELOGS / "config.yaml")
PRELUDE: str = CONFIG["prelude_section_name"]
SECTION_TITLES: Dict[str, str] = {PRELUDE: CONFIG["prelude_section_title"], **dict(CONFIG["sections"])}
FRAGMENTS: List[Path] = sorted(p for p in (CHANGELOGS / CONFIG["notesdir"]).iterdir()
                               if p.suffix in (".yml", ".yaml"))


def entries(content: Dict[str, Any]) -> Dict[str, List[str]]:
    """A fragment's text per section (the release summary is one string, the other sections lists)."""
    return {section: [value] if isinstance(value, str) else list(value) for section, value in content.items()}


ALL_ENTRIES: Dict[str, List[str]] = {}
for _fragment in FRAGMENTS:
    for _section, _texts in entries(load_yaml(_fragment)).items():
        ALL_ENTRIES.setdefault(_section, []).extend(_texts)


def plain(text: str) -> str:
    """Fragment RST or rendered Markdown, reduced to comparable words: no escapes, no code markup, one space."""
    text = text.replace("``", "").replace("<code>", "").replace("</code>", "").replace("\\", "")
    return " ".join(text.split())


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The collection's changelog data and galaxy.yml in a directory of their own, released there."""
    root = tmp_path_factory.mktemp("collection")
    shutil.copytree(CHANGELOGS, root / "changelogs")
    shutil.copy2(REPO / "galaxy.yml", root / "galaxy.yml")
    bindir = Path(sys.executable).parent  # the venv's antsibull-changelog and the ansible-doc it calls
    tool = bindir / "antsibull-changelog"
    if not tool.exists():
        pytest.fail(f"{tool} is missing: install requirements-dev.txt")
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", ANSIBLE_NOCOLOR="1")
    run = subprocess.run([str(tool), "release", "--is-collection", "--version", VERSION, "--date", DATE],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, f"antsibull-changelog release failed:\n{run.stdout}\n{run.stderr}"
    return root


def test_there_are_fragments_with_a_release_summary() -> None:
    assert FRAGMENTS, "no changelog fragments"
    assert len(ALL_ENTRIES.get(PRELUDE, [])) == 1, f"exactly one fragment gives the {PRELUDE}"
    unknown = set(ALL_ENTRIES) - set(SECTION_TITLES)
    assert not unknown, f"sections changelogs/config.yaml does not allow: {sorted(unknown)}"


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: p.name)
def test_fragment_narrates_no_development(fragment: Path) -> None:
    for section, texts in entries(load_yaml(fragment)).items():
        for text in texts:
            found = [m.group(0) for pattern in DEVELOPMENT for m in pattern.finditer(text)]
            assert not found, f"{fragment.name} {section}: development narrative {found} in: {text}"


def test_release_consumes_every_fragment(released: Path) -> None:
    left = [p.name for p in (released / "changelogs" / CONFIG["notesdir"]).iterdir()
            if p.suffix in (".yml", ".yaml")]
    assert left == [], f"fragments not consumed by the release: {left}"
    release = load_yaml(released / "changelogs" / CONFIG["changes_file"])["releases"][VERSION]
    assert release["release_date"] == DATE
    assert sorted(release["fragments"]) == [p.name for p in FRAGMENTS]
    for section, texts in ALL_ENTRIES.items():
        recorded = release["changes"][section]
        assert sorted(recorded if isinstance(recorded, list) else [recorded]) == sorted(texts), section


def test_changelog_file_has_the_release_and_its_sections(released: Path) -> None:
    template = CONFIG["changelog_filename_template"]
    stem = os.path.splitext(template)[0]
    outputs = [released / "changelogs" / f"{stem}.{fmt}" for fmt in CONFIG.get("output_formats", ["rst"])]
    assert outputs and all(p.exists() for p in outputs), f"expected changelog files {outputs}"
    for output in outputs:
        text = plain(output.read_text(encoding="utf-8"))
        assert f"v{VERSION}" in text
        for section, texts in ALL_ENTRIES.items():
            assert SECTION_TITLES[section] in text, f"{output.name}: no {SECTION_TITLES[section]!r} section"
            for entry in texts:
                assert plain(entry) in text, f"{output.name}: {section} entry missing: {entry}"
