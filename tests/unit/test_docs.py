# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""The collection's documentation, as users and Galaxy read it: ansible-doc renders every module, the inventory
plugin, every filter and every role without a warning, antsibull-docs' linter finds nothing, version_added and the
action group agree with galaxy.yml and meta/runtime.yml, and the guests role's guest options are the guest spec's.

Runs against the copy in .build (``make collection``). Every plugin and role is listed from the tree, so a new one
without documentation fails here. The ansible-doc and antsibull-docs runs are started once, side by side."""

from __future__ import annotations

import concurrent.futures
import copy
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / ".build"
COLLECTION = BUILD / "ansible_collections" / "virtfleet" / "core"
BIN = Path(sys.executable).parent
NS = "virtfleet.core"

# ansible-core's own warning about its internal collection, printed by every `ansible-doc -t role NAME` on 2.21
# whatever the role (ansible/ansible#85689, fixed by ansible/ansible#86815): not about this collection.
KNOWN_CORE_WARNINGS = (
    re.compile(r"\[WARNING\]: Collection at '[^']*/ansible/_internal/ansible_collections/ansible/_protomatter' does "
               r"not have a MANIFEST\.json file, nor has it galaxy\.yml: cannot detect version\."),
)


def names_in_tree() -> Dict[str, List[str]]:
    """Plugin type -> the collection's plugins of that type, from the tree."""
    filters: List[str] = []
    for path in sorted((REPO / "plugins" / "filter").glob("*.py")):
        module = importlib.import_module(f"ansible_collections.virtfleet.core.plugins.filter.{path.stem}")
        filters.extend(module.FilterModule().filters())
    return {
        "module": sorted(p.stem for p in (REPO / "plugins" / "modules").glob("*.py") if p.stem != "__init__"),
        "inventory": sorted(p.stem for p in (REPO / "plugins" / "inventory").glob("*.py") if p.stem != "__init__"),
        "filter": sorted(filters),
        "role": sorted(p.parent.parent.name for p in (REPO / "roles").glob("*/meta/argument_specs.yml")),
    }


def env() -> Dict[str, str]:
    return dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(BUILD), ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0",
                ANSIBLE_DEPRECATION_WARNINGS="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def run(cmd: List[str]) -> Tuple[List[str], subprocess.CompletedProcess[str]]:
    return cmd, subprocess.run(cmd, capture_output=True, text=True, check=False, env=env(), cwd=str(REPO),
                               timeout=300)


def warnings_of(stderr: str) -> List[str]:
    """Every line of STDERR but ansible-core's known warnings about itself."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    return [line for line in lines if not any(known.fullmatch(line.strip()) for known in KNOWN_CORE_WARNINGS)]


@pytest.fixture(scope="module")
def runs() -> Dict[str, Tuple[List[str], subprocess.CompletedProcess[str]]]:
    """Every documentation command, run at once: per plugin type the text rendering (what a user reads) and the
    listing, the role entry points by name, the metadata dump (what is checked below) and antsibull-docs' linter."""
    if not (COLLECTION / "galaxy.yml").exists():
        pytest.fail("no collection copy in .build: run `make collection` first")
    doc = str(BIN / "ansible-doc")
    names = names_in_tree()
    commands: Dict[str, List[str]] = {}
    for kind, plugins in names.items():
        commands[f"text {kind}"] = [doc, "-t", kind, *(f"{NS}.{name}" for name in plugins)]
        commands[f"list {kind}"] = [doc, "-t", kind, "-l", NS]
    # Every plugin type and role of the collection as JSON, in one run (what antsibull-docs and Galaxy read).
    commands["json"] = [doc, "--metadata-dump", "--no-fail-on-errors", NS]
    for role in names["role"]:
        commands[f"text role {role} main"] = [doc, "-t", "role", "-e", "main", f"{NS}.{role}"]
    lint = shutil.which("antsibull-docs", path=str(BIN)) or shutil.which("antsibull-docs")
    if lint:
        # rstcheck (of the RST antsibull-docs writes itself) is left out for time: markup errors in the documentation
        # are the linter's own findings.
        commands["antsibull-docs"] = [lint, "lint-collection-docs", "--plugin-docs", "--skip-rstcheck",
                                      "--validate-collection-refs", "all", "--disallow-unknown-collection-refs",
                                      str(COLLECTION)]
    # The linter first: it is the longest.
    order = sorted(commands, key=lambda key: key != "antsibull-docs")
    with concurrent.futures.ThreadPoolExecutor(max_workers=(os.cpu_count() or 1) + 1) as pool:
        futures = {key: pool.submit(run, commands[key]) for key in order}
        return {key: future.result() for key, future in futures.items()}


def ansible_doc_keys() -> List[str]:
    kinds = ("module", "inventory", "filter", "role")
    return [f"{what} {kind}" for kind in kinds for what in ("text", "list")] + ["json"]


def dumped(runs: Dict[str, Any], kind: str) -> Dict[str, Any]:
    """The collection's plugins of KIND (or its roles) from ansible-doc's metadata dump."""
    return json.loads(runs["json"][1].stdout)["all"].get(kind) or {}


@pytest.mark.parametrize("key", ansible_doc_keys())
def test_ansible_doc_renders_without_a_warning(runs: Dict[str, Any], key: str) -> None:
    cmd, proc = runs[key]
    assert proc.returncode == 0, f"{' '.join(cmd)}: rc={proc.returncode}\n{proc.stderr}"
    assert not warnings_of(proc.stderr), f"{' '.join(cmd)}:\n{proc.stderr}"
    assert "UNDOCUMENTED" not in proc.stdout, f"{' '.join(cmd)}:\n{proc.stdout}"


def test_every_role_entry_point_renders(runs: Dict[str, Any]) -> None:
    keys = [k for k in runs if k.startswith("text role ")]
    assert keys, "no role found"
    for key in keys:
        cmd, proc = runs[key]
        assert proc.returncode == 0 and not warnings_of(proc.stderr), f"{' '.join(cmd)}:\n{proc.stderr}"
        assert "ENTRY POINT: *main*" in proc.stdout, proc.stdout


def test_every_plugin_and_role_is_in_the_json(runs: Dict[str, Any]) -> None:
    for kind, plugins in names_in_tree().items():
        data = dumped(runs, kind)
        assert sorted(data) == sorted(f"{NS}.{name}" for name in plugins), kind
        for fqcn, entry in data.items():
            assert "error" not in entry, f"{fqcn}: {entry.get('error')}"
            docs = list(entry["entry_points"].values()) if kind == "role" else [entry["doc"]]
            assert all(d.get("short_description") and d.get("description") for d in docs), fqcn


def test_antsibull_docs_lint_finds_nothing(runs: Dict[str, Any]) -> None:
    if "antsibull-docs" not in runs:
        pytest.fail("antsibull-docs is not installed (requirements-dev.txt)")
    cmd, proc = runs["antsibull-docs"]
    findings = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and not findings, f"{' '.join(cmd)}: rc={proc.returncode}\n{findings}"


def _version(text: str) -> Tuple[int, ...]:
    assert re.fullmatch(r"\d+\.\d+\.\d+", text), f"not a collection version: {text!r}"
    return tuple(int(part) for part in text.split("."))


def test_version_added_is_a_collection_version_not_after_galaxy_yml(runs: Dict[str, Any]) -> None:
    """Every plugin and role entry point says in which version of this collection it came (not per option: every
    option came with its plugin in the first release)."""
    release = _version(yaml.safe_load((REPO / "galaxy.yml").read_text(encoding="utf-8"))["version"])
    for kind in names_in_tree():
        for fqcn, entry in dumped(runs, kind).items():
            docs = list(entry["entry_points"].values()) if kind == "role" else [entry["doc"]]
            for doc in docs:
                added = str(doc.get("version_added"))
                assert _version(added) <= release, f"{fqcn}: version_added {added} is after galaxy.yml's"


def test_attributes_and_the_action_group_agree_with_meta_runtime(runs: Dict[str, Any]) -> None:
    runtime = yaml.safe_load((REPO / "meta" / "runtime.yml").read_text(encoding="utf-8"))
    groups = {f"{NS}.{group}": {f"{NS}.{m}" if "." not in m else m for m in members}
              for group, members in (runtime.get("action_groups") or {}).items()}
    for fqcn, entry in dumped(runs, "module").items():
        attributes = entry["doc"].get("attributes") or {}
        for name in ("check_mode", "diff_mode"):
            assert attributes.get(name, {}).get("support") in ("full", "partial", "none", "N/A"), (fqcn, name)
            if attributes[name]["support"] != "full":
                assert attributes[name].get("details"), f"{fqcn}: {name} is not fully supported: say why"
        documented = set((attributes.get("action_group") or {}).get("membership") or [])
        actual = {group for group, members in groups.items() if fqcn in members}
        assert documented == actual, f"{fqcn}: documented action groups {documented}, meta/runtime.yml {actual}"


# ------------------------------------------------------------------------ one guest spec for module and role
# The guest options are written once, in the guest_spec doc fragment's DOCUMENTATION. Its GUESTS (the guests module's
# guests[] suboptions) and the guests role's guests_list options spell them out again - a doc fragment is read as a
# literal and a role cannot extend one - and these tests keep them equal, printing the YAML to paste on a difference.
_REFERENCE = re.compile(r"O\((?!ignore:)([a-z_]+)")


def guest_options() -> Dict[str, Any]:
    from ansible_collections.virtfleet.core.plugins.doc_fragments.guest_spec import ModuleDocFragment

    options: Dict[str, Any] = yaml.safe_load(ModuleDocFragment.DOCUMENTATION)["options"]
    return options


def rebased(options: Dict[str, Any], guest_prefix: str, other_prefix: str = "") -> Dict[str, Any]:
    """OPTIONS (the guest options, or some of their suboptions) with each O() reference to a guest option
    (O(disks[].name)) pointing below GUEST_PREFIX (O(guests[].disks[].name)) and OTHER_PREFIX before any other
    option's name (the role's variables); every description a list."""
    names = set(guest_options())

    def text(value: str) -> str:
        return _REFERENCE.sub(lambda m: f"O({guest_prefix if m.group(1) in names else other_prefix}{m.group(1)}", value)

    out = {}
    for name, option in options.items():
        option = copy.deepcopy(option)
        described = option["description"]
        option["description"] = [text(d) for d in (described if isinstance(described, list) else [described])]
        if "suboptions" in option:
            option["suboptions"] = rebased(option["suboptions"], guest_prefix, other_prefix)
        out[name] = option
    return out


def _described(options: Dict[str, Any], key: str) -> Dict[str, Any]:
    """OPTIONS with every description a list (YAML lets a single one be a string), suboptions under KEY."""
    out = {}
    for name, option in options.items():
        option = copy.deepcopy(option)
        if isinstance(option.get("description"), str):
            option["description"] = [option["description"]]
        if key in option:
            option[key] = _described(option[key], key)
        out[name] = option
    return out


def test_the_guests_modules_entries_are_the_guest_options() -> None:
    """GUESTS (virtfleet.core.guest_spec.guests) is DOCUMENTATION nested below guests[]."""
    from ansible_collections.virtfleet.core.plugins.doc_fragments.guest_spec import ModuleDocFragment

    expected = rebased(guest_options(), "guests[].")
    actual = _described(yaml.safe_load(ModuleDocFragment.GUESTS)["options"]["guests"]["suboptions"], "suboptions")
    assert actual == expected, "GUESTS differs from DOCUMENTATION; expected its suboptions:\n" + yaml.safe_dump(
        expected, sort_keys=False, width=120)


def _role_form(options: Dict[str, Any], spec: Dict[str, Any], where: str) -> Dict[str, Any]:
    """The guest options as a role's argument spec holds them: ``options`` for ``suboptions``, the spec's no_log
    where it has one, and an alias as an option of its own (ansible-lint's schema of role argument specs has no
    ``aliases``; the module takes either name)."""
    out = {}
    for name, option in options.items():
        option = copy.deepcopy(option)
        sub = option.pop("suboptions", None)
        if sub is not None:
            option["options"] = _role_form(sub, spec[name].get("options") or {}, f"{where}{name}[].")
        if spec[name].get("no_log"):
            option["no_log"] = True
        aliases = option.pop("aliases", [])
        out[name] = option
        for alias in aliases:
            out[alias] = {"description": [f"Another name for O({where}{name})."], "type": option["type"]}
    return out


def test_the_guests_role_takes_the_guest_options_of_the_modules() -> None:
    """roles/guests/meta/argument_specs.yml's guests_list options: the same types, choices, defaults and
    descriptions, references made to point at the role's variables, and the spec's no_log."""
    from ansible_collections.virtfleet.core.plugins.module_utils._argspec import guest_argument_spec

    expected = _role_form(rebased(guest_options(), "guests_list[].", "guests_"), guest_argument_spec(),
                          "guests_list[].")
    role = yaml.safe_load((REPO / "roles" / "guests" / "meta" / "argument_specs.yml").read_text(encoding="utf-8"))
    actual = _described(role["argument_specs"]["main"]["options"]["guests_list"]["options"], "options")
    assert actual == expected, "guests_list options differ from the guest spec; expected:\n" + yaml.safe_dump(
        expected, sort_keys=False, width=120)


def test_the_guests_module_documents_its_entries_with_the_guest_options(runs: Dict[str, Any]) -> None:
    """What ansible-doc shows of the guests module's guests[] is the guest module's options (but descriptions)."""
    docs = dumped(runs, "module")
    single = docs[f"{NS}.guest"]["doc"]["options"]
    entries = docs[f"{NS}.guests"]["doc"]["options"]["guests"]["suboptions"]
    assert sorted(entries) == sorted(guest_options())
    for name in guest_options():
        assert _shape(entries[name]) == _shape(single[name]), name


def _shape(option: Dict[str, Any]) -> Dict[str, Any]:
    """An option without its descriptions (their references differ by where the option is)."""
    out = {k: v for k, v in option.items() if k not in ("description", "suboptions")}
    if "suboptions" in option:
        out["suboptions"] = {k: _shape(v) for k, v in option["suboptions"].items()}
    return out
