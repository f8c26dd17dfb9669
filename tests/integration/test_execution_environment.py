# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""The execution environment: what ansible-builder makes of docs/awx/execution-environment.yml and the tarball.

`ansible-builder create` renders the build context; no image is built (no container runtime or registry
here). What the image would get is worked out from that context with the build's own steps, run on this
machine: the galaxy stage's `ansible-galaxy collection install -r requirements.yml` from the context,
ansible-builder's introspection of the installed collection (what its builder stage runs), and bindep's
profile evaluation on the definition's RPM platform, as its `assemble` script does it: the `compile` profile
for the builder stage (`bindep -b compile`), the default profile for the final image (`bindep -l newline`).

Expected names come from the repository's requirements.txt and bindep.txt; a collection copy that lost one
of them (or whose meta/execution-environment.yml names a missing file) fails the same check, naming it.
No lab needed.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, List, Set

import pytest
import yaml
from bindep.depends import Depends
from conftest import BIN, COLLECTION, REPO, build_collection
from packaging.requirements import Requirement

DEFINITION = REPO / "docs" / "awx" / "execution-environment.yml"
# bindep's platform profiles on the definition's base image (CentOS Stream, an RPM platform of the Red Hat
# family): bindep adds these to the profiles asked for, as `bindep --profiles` lists them there.
RPM_PLATFORM = ("platform:centos", "platform:redhat", "platform:rpm", "platform:python3")
BINDEP_LINE = re.compile(r"^(?P<name>[^#\s]\S*)\s*(?:\[(?P<selectors>[^\]]*)\])?")
STAGE = re.compile(r"^# (\w+) build stage$", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Dependencies:
    """What an EE installs for the collection: pip packages, system packages of the builder stage and of
    the final image."""

    python: FrozenSet[str]
    builder: FrozenSet[str]
    final: FrozenSet[str]


def pip_names(lines: List[str]) -> FrozenSet[str]:
    """Package names of requirement lines (comments, blank lines and ansible-builder's annotations aside)."""
    names = {Requirement(line.split("#", 1)[0]).name.lower() for line in lines if line.split("#", 1)[0].strip()}
    return frozenset(names)


@functools.lru_cache(maxsize=None)
def _depends(bindep_text: str) -> Depends:
    return Depends(bindep_text)  # about a second each: bindep compiles its grammar for every file


def system_packages(bindep_text: str, profile: str) -> FrozenSet[str]:
    """The packages bindep selects on the EE's RPM platform for PROFILE (compile: builder stage; default: final)."""
    return frozenset(rule[0] for rule in _depends(bindep_text).active_rules([profile, *RPM_PLATFORM]))


def lab_only_packages(bindep_text: str) -> FrozenSet[str]:
    """Packages that only "test" entries name: the local lab's, never an EE's."""
    test: Set[str] = set()
    other: Set[str] = set()
    for line in bindep_text.splitlines():
        entry = BINDEP_LINE.match(line)
        if entry:
            (test if "test" in (entry["selectors"] or "").split() else other).add(entry["name"])
    return frozenset(test - other)


def definition_packages(definition: Dict[str, Any]) -> FrozenSet[str]:
    """The pip packages the EE definition installs itself (ansible-core, ansible-runner)."""
    deps = definition["dependencies"]
    return pip_names([deps[key]["package_pip"] for key in ("ansible_core", "ansible_runner") if key in deps])


def expected_dependencies(source: Path, definition: Dict[str, Any]) -> Dependencies:
    """From the repository's own files: requirements.txt less what the definition installs itself (the
    collection's ansible-core line documents its runtime; the EE's engine is the definition's), bindep.txt
    evaluated on the EE's platform."""
    bindep_text = (source / "bindep.txt").read_text()
    requirements = pip_names((source / "requirements.txt").read_text().splitlines())
    return Dependencies(python=requirements - definition_packages(definition),
                        builder=system_packages(bindep_text, "compile"),
                        final=system_packages(bindep_text, "default"))


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A rendered build context and what its stages would install, or the step that failed."""

    context: Path
    containerfile: str
    galaxy_requirements: Dict[str, Any]
    dependencies: Dependencies | None
    failure: str = ""


def run(args: List[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # As in an image build: no collections path of this checkout (ansible-galaxy would find the collection
    # "already installed" there and install nothing).
    env = {k: v for k, v in os.environ.items() if k != "ANSIBLE_COLLECTIONS_PATH"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


def render(definition: Dict[str, Any], tarball: Path, work: Path) -> Rendered:
    """The definition (its collection entry pointed at TARBALL) through `ansible-builder create`, then the
    galaxy stage's install from the context and the builder stage's introspection of what it installed."""
    src = work / "ee"
    src.mkdir()
    shutil.copy2(tarball, src / tarball.name)
    adjusted = yaml.safe_load(yaml.safe_dump(definition))
    (entry,) = adjusted["dependencies"]["galaxy"]["collections"]
    entry["name"] = f"{Path(entry['name']).parent}/{tarball.name}"
    (src / "execution-environment.yml").write_text(yaml.safe_dump(adjusted, sort_keys=False))
    context = work / "context"
    proc = run([str(BIN / "ansible-builder"), "create", "--file", "execution-environment.yml",
                "--context", str(context), "--output-filename", "Containerfile"], cwd=src)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    containerfile = (context / "Containerfile").read_text()
    build = context / "_build"
    galaxy_requirements: Dict[str, Any] = yaml.safe_load((build / "requirements.yml").read_text())

    # Galaxy stage: `COPY _build /build`, `WORKDIR /build`, ansible-galaxy install -r requirements.yml.
    stage = work / "build"
    shutil.copytree(build, stage)
    collections = work / "collections"
    proc = run([str(BIN / "ansible-galaxy"), "collection", "install", "-r", "requirements.yml",
                "--collections-path", str(collections)], cwd=stage)
    if proc.returncode != 0:
        return Rendered(context, containerfile, galaxy_requirements, None,
                        "galaxy stage failed: " + proc.stdout + proc.stderr)

    # Builder stage: introspect.py introspect (the EE definition's own requirements files, when it has any).
    pip_out, bindep_out = work / "introspected-requirements.txt", work / "introspected-bindep.txt"
    args = [str(BIN / "ansible-builder"), "introspect", str(collections),
            "--write-pip", str(pip_out), "--write-bindep", str(bindep_out)]
    for option, name in (("--user-pip", "requirements.txt"), ("--user-bindep", "bindep.txt")):
        if (stage / name).exists():
            args += [option, str(stage / name)]
    proc = run(args, cwd=stage)
    if proc.returncode != 0:
        return Rendered(context, containerfile, galaxy_requirements, None,
                        "introspection failed: " + proc.stdout + proc.stderr)
    bindep_text = bindep_out.read_text() if bindep_out.exists() else ""
    pip_lines = pip_out.read_text().splitlines() if pip_out.exists() else []
    return Rendered(context, containerfile, galaxy_requirements,
                    Dependencies(python=pip_names(pip_lines),
                                 builder=system_packages(bindep_text, "compile"),
                                 final=system_packages(bindep_text, "default")))


def problems(rendered: Rendered, expected: Dependencies, never: FrozenSet[str],
             definition: Dict[str, Any]) -> List[str]:
    """What the EE would miss or wrongly get; empty when it gets the collection's dependencies."""
    if rendered.dependencies is None:
        return [rendered.failure]
    got = rendered.dependencies
    found = [f"python package {name} is not installed (requirements.txt names it)"
             for name in sorted(expected.python - got.python)]
    found += [f"system package {name} is not installed in the builder stage (bindep.txt, compile)"
              for name in sorted(expected.builder - got.builder)]
    found += [f"system package {name} is not installed in the final image (bindep.txt)"
              for name in sorted(expected.final - got.final)]
    installed = got.builder | got.final
    found += [f"test-only system package {name} would be installed" for name in sorted(never & installed)]
    found += [f"python package {name} is installed from the collection as well as by the definition"
              for name in sorted(definition_packages(definition) & got.python)]
    return found


def check_execution_environment(tarball: Path, work: Path) -> Rendered:
    """Render the EE with TARBALL and fail, naming each dependency the image would miss."""
    definition: Dict[str, Any] = yaml.safe_load(DEFINITION.read_text())
    rendered = render(definition, tarball, work)
    found = problems(rendered, expected_dependencies(REPO, definition),
                     lab_only_packages((REPO / "bindep.txt").read_text()), definition)
    assert not found, "the execution environment is incomplete:\n" + "\n".join(found)
    return rendered


@pytest.fixture()
def definition() -> Dict[str, Any]:
    data: Dict[str, Any] = yaml.safe_load(DEFINITION.read_text())
    return data


def test_definition_names_this_version_of_the_collection(definition: Dict[str, Any]) -> None:
    """The documented definition installs the tarball `ansible-galaxy collection build` makes of galaxy.yml."""
    galaxy = yaml.safe_load((REPO / "galaxy.yml").read_text())
    tarball = f"{galaxy['namespace']}-{galaxy['name']}-{galaxy['version']}.tar.gz"
    (entry,) = definition["dependencies"]["galaxy"]["collections"]
    assert entry["type"] == "file" and Path(entry["name"]).name == tarball
    copied = [f for f in definition["additional_build_files"] if fnmatch.fnmatch(tarball, f["src"])]
    assert [f["dest"] for f in copied] == [str(Path(entry["name"]).parent)], "the tarball is copied where it is read"


def test_collection_declares_its_dependencies_for_ansible_builder() -> None:
    """meta/execution-environment.yml points at the two files, and the repository's files hold what the
    EE check expects (so a check against them checks something)."""
    meta = yaml.safe_load((REPO / "meta" / "execution-environment.yml").read_text())
    assert meta == {"version": 1, "dependencies": {"python": "requirements.txt", "system": "bindep.txt"}}
    definition = yaml.safe_load(DEFINITION.read_text())
    expected = expected_dependencies(REPO, definition)
    assert expected.python and expected.final and expected.builder > expected.final
    never = lab_only_packages((REPO / "bindep.txt").read_text())
    assert never and not never & (expected.builder | expected.final)


def test_rendered_context_installs_the_collection_and_its_dependencies(collection_tarball: Path, tmp_path: Path,
                                                                       definition: Dict[str, Any]) -> None:
    rendered = check_execution_environment(collection_tarball, tmp_path)
    containerfile = rendered.containerfile
    deps = definition["dependencies"]
    assert f'ARG EE_BASE_IMAGE="{definition["images"]["base_image"]["name"]}"' in containerfile
    refs = next(line for line in containerfile.splitlines() if line.startswith("ARG ANSIBLE_INSTALL_REFS="))
    assert deps["ansible_core"]["package_pip"] in refs and deps["ansible_runner"]["package_pip"] in refs
    # The stages that use what was checked above: the galaxy install, introspection + assemble, bindep's
    # run list installed in the final image.
    parts = STAGE.split(containerfile)
    stages = dict(zip(parts[1::2], parts[2::2]))
    galaxy, builder, final = stages["Galaxy"], stages["Builder"], stages["Final"]
    assert "ansible-galaxy collection install" in galaxy and "-r requirements.yml" in galaxy
    assert "introspect.py introspect" in builder and "/output/scripts/assemble" in builder
    assert "install-from-bindep" in final
    # The collection comes from the tarball copied into the context, byte for byte.
    (entry,) = rendered.galaxy_requirements["collections"]
    assert entry["type"] == "file"
    shipped = rendered.context / "_build" / entry["name"]
    digest = hashlib.sha256
    assert digest(shipped.read_bytes()).hexdigest() == digest(collection_tarball.read_bytes()).hexdigest()


def _drop_bindep_libvirt_headers(root: Path) -> str:
    """bindep.txt without the RPM compile entry that brings libvirt's headers."""
    path = root / "bindep.txt"
    lines = path.read_text().splitlines()
    line = next(ln for ln in lines if ln.startswith("libvirt") and "platform:rpm" in ln and "compile" in ln)
    path.write_text("\n".join(ln for ln in lines if ln != line) + "\n")
    return line.split()[0]


def _drop_last_requirement(root: Path) -> str:
    """requirements.txt without its last requirement."""
    path = root / "requirements.txt"
    lines = path.read_text().splitlines()
    last = max(i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#"))
    path.write_text("\n".join(lines[:last] + lines[last + 1:]) + "\n")
    return Requirement(lines[last]).name


def _meta_names_a_missing_file(root: Path) -> str:
    """meta/execution-environment.yml pointing its Python requirements at a file the collection lacks."""
    path = root / "meta" / "execution-environment.yml"
    meta = yaml.safe_load(path.read_text())
    meta["dependencies"]["python"] = "requirements-ee.txt"
    path.write_text(yaml.safe_dump(meta))
    return "requirements-ee.txt"


@pytest.mark.parametrize("breakage", [_drop_bindep_libvirt_headers, _drop_last_requirement,
                                      _meta_names_a_missing_file], ids=["bindep", "requirements", "meta"])
def test_collection_missing_a_dependency_fails_naming_it(breakage: Callable[[Path], str], tmp_path: Path) -> None:
    root = tmp_path / "src" / "ansible_collections" / "virtfleet" / "core"
    shutil.copytree(COLLECTION, root, ignore=shutil.ignore_patterns(".git"))
    missing = breakage(root)
    tarball = build_collection(root, tmp_path / "dist")
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(AssertionError) as failure:
        check_execution_environment(tarball, work)
    assert missing in str(failure.value)
