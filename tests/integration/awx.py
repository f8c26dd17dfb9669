# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""AWX's way of injecting a credential, for tests: render a credential type's injectors with given inputs.

AWX (awx/main/models/credential) renders a custom credential type's `file` templates into files of the job's
private data directory (mode 0600), then its `env` and `extra_vars` templates with the inputs and
`tower.filename` (one file: `template`) or `tower.filename.<name>` (several: `template.<name>`), in a sandboxed
Jinja environment. Inputs not given take the field's default, else "" (False for booleans). The types under
docs/awx/credential_types are rendered with this, and the result is what the ansible-runner jobs get.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import yaml
from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

CREDENTIAL_TYPES = Path(__file__).resolve().parents[2] / "docs" / "awx" / "credential_types"
FIELD_TYPES = {"string", "boolean"}


@dataclasses.dataclass(frozen=True)
class Injected:
    """What one credential puts into a job: environment variables, extra vars and the files it wrote."""

    env: Dict[str, str]
    extra_vars: Dict[str, Any]
    files: List[Path]
    secrets: List[str]


def load_type(name: str) -> Dict[str, Any]:
    """A credential type of docs/awx/credential_types, checked as AWX checks one before saving it."""
    data = yaml.safe_load((CREDENTIAL_TYPES / f"{name}.yml").read_text())
    assert set(data) == {"name", "description", "kind", "inputs", "injectors"}, sorted(data)
    assert data["kind"] == "cloud"
    fields = data["inputs"]["fields"]
    ids = [f["id"] for f in fields]
    assert len(ids) == len(set(ids)), ids
    for field in fields:
        assert field.get("type", "string") in FIELD_TYPES, field
        assert set(field) <= {"id", "type", "label", "help_text", "secret", "multiline", "default", "format",
                              "choices", "ask_at_runtime"}, field
    assert set(data["inputs"].get("required", [])) <= set(ids)
    assert set(data["injectors"]) <= {"env", "file", "extra_vars"}, sorted(data["injectors"])
    return data


def inject(name: str, inputs: Dict[str, Any], private_data_dir: Path) -> Injected:
    """Render credential type NAME with INPUTS into PRIVATE_DATA_DIR, the way AWX does for a job."""
    ctype = load_type(name)
    fields = {f["id"]: f for f in ctype["inputs"]["fields"]}
    unknown = sorted(set(inputs) - set(fields))
    if unknown:
        raise ValueError(f"{ctype['name']}: unknown input {unknown[0]}")
    missing = [k for k in ctype["inputs"].get("required", []) if inputs.get(k) in (None, "")]
    if missing:
        raise ValueError(f"{ctype['name']}: input {missing[0]} is required")
    namespace: Dict[str, Any] = {}
    for key, field in fields.items():
        default = field.get("default", False if field.get("type") == "boolean" else "")
        namespace[key] = inputs.get(key, default)
    jinja = ImmutableSandboxedEnvironment(undefined=StrictUndefined)
    injectors = ctype["injectors"]
    files: List[Path] = []
    filenames: Dict[str, str] = {}
    cred_dir = private_data_dir / "env" / "credentials"
    cred_dir.mkdir(parents=True, exist_ok=True)
    for template_name, template in (injectors.get("file") or {}).items():
        fd, path = tempfile.mkstemp(prefix="cred-", dir=cred_dir)
        with os.fdopen(fd, "w") as handle:
            handle.write(jinja.from_string(template).render(**namespace))
        os.chmod(path, 0o600)
        files.append(Path(path))
        filenames[template_name.split(".", 1)[1] if "." in template_name else ""] = path
    tower = {"filename": filenames[""] if list(filenames) == [""] else filenames}
    context = dict(namespace, tower=tower)
    env = {k: jinja.from_string(v).render(**context) for k, v in (injectors.get("env") or {}).items()}
    extra = {k: jinja.from_string(v).render(**context) for k, v in (injectors.get("extra_vars") or {}).items()}
    secrets = [str(namespace[k]) for k, f in fields.items() if f.get("secret") and namespace[k]]
    return Injected(env=env, extra_vars=extra, files=files, secrets=secrets)
