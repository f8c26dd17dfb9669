# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Write plan.json, plan.md and report.html on the controller, in one step (no module is shipped anywhere)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import jinja2
from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase

from ansible_collections.virtfleet.core.plugins.module_utils._argspec import plain_data

# The role's templates: the page and the comment are templates a user can read; this plugin only renders them.
FILES = ("plan.json", "plan.md", "report.html", "apply.json")
TEMPLATES = Path(__file__).resolve().parents[2] / "roles" / "fleet" / "templates"


def _write(path: Path, text: str) -> bool:
    """Write TEXT to PATH atomically; False when the file already holds it."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return True


def render(plan: Dict[str, Any], title: str) -> Dict[str, str]:
    """The three files' contents for PLAN."""
    # The page is HTML-escaped throughout (names and reasons come from hypervisors); the Markdown is not HTML.
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",),
                                                                 default_for_string=False),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=False)
    env.filters["to_json"] = lambda value: json.dumps(value, sort_keys=True)
    context = {"fleet_written": plan, "fleet_title": title}
    return {
        "plan.json": json.dumps(plan, indent=2, sort_keys=True) + "\n",
        "apply.json": json.dumps(plan, indent=2, sort_keys=True) + "\n",
        "plan.md": env.get_template("plan.md.j2").render(context),
        "report.html": env.get_template("report.html.j2").render(context),
    }


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _VALID_ARGS = frozenset(("plan", "dest", "title", "files"))

    def run(self, tmp: Optional[str] = None, task_vars: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        result = super().run(tmp, task_vars)
        args = self._task.args
        plan, dest = args.get("plan"), args.get("dest")
        if not isinstance(plan, dict) or not dest:
            raise AnsibleActionFail("fleet_report: plan (a dict) and dest (a directory) are required")
        wanted = args.get("files") or ["plan.json", "plan.md", "report.html"]
        unknown = sorted(set(wanted) - set(FILES))
        if unknown:
            raise AnsibleActionFail(f"fleet_report: files={unknown[0]!r}: expected one of {', '.join(FILES)}")
        contents = render(plain_data(plan), str(args.get("title") or "Plan"))
        out = Path(str(dest)).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        changed = False
        paths = {}
        for name in wanted:
            changed = _write(out / name, contents[name]) or changed
            paths[name] = str(out / name)
        result.update(changed=changed, files=paths)
        return result
