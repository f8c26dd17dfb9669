#!/usr/bin/python
# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: fleet_report
short_description: Write a fleet plan as plan.json, plan.md and report.html on the controller
version_added: "1.0.0"
description:
  - Renders the plan built by the P(virtfleet.core.fleet_plan#filter) filter into the files C(plan.json) (the
    machine-readable plan, see docs/fleet.md), C(plan.md) (for a pull-request comment) and C(report.html) (one
    self-contained page - nothing is fetched when it is opened).
  - Runs on the controller as an action plugin, whatever host the task is for; a file that already holds the
    same content is not rewritten.
author:
  - virtfleet maintainers (@virtfleet)
extends_documentation_fragment:
  - virtfleet.core.attributes
options:
  plan:
    description: The plan (the fleet_plan filter's output).
    type: dict
    required: true
  dest:
    description: Directory the files are written to, on the controller; created when missing. A relative path is
      relative to the directory C(ansible-playbook) runs in.
    type: path
    required: true
  title:
    description: Title of the report page.
    type: str
    default: Plan
  files:
    description: Which of the files to write. V(apply.json) holds the same JSON as V(plan.json) (for what an
      apply did, beside the plan it started from).
    type: list
    elements: str
    choices: [plan.json, plan.md, report.html, apply.json]
    default: [plan.json, plan.md, report.html]
attributes:
  check_mode:
    support: none
    details:
      - Not skipped in check mode either - the files are written and RV(files) returned, as in a normal run. They
        describe a plan and change no hypervisor; the fleet role writes them in the same run as its check-mode plan.
  diff_mode:
    support: none
    details:
      - No diff is returned.
notes:
  - Writes on the controller, whatever host the task is for (an action plugin; there is no module to run on a
    managed node). Each file is written to a temporary file first and moved into place.
  - Changed (C(changed=true)) when at least one file was written; a file that already holds the same content is
    left alone.
seealso:
  - plugin: virtfleet.core.fleet_plan
    plugin_type: filter
    description: Builds the plan this writes.
  - module: virtfleet.core.fleet_guests
    description: Its RV(virtfleet.core.fleet_guests#module:plan) is the same plan.
  - name: plan.json
    description: The plan's keys, kept stable (docs/fleet.md).
    link: https://github.com/virtfleet/virtfleet.core/blob/main/docs/fleet.md#planjson
"""

EXAMPLES = r"""
- name: Write the plan next to the pipeline's artifacts
  virtfleet.core.fleet_report:
    plan: "{{ fleet_result }}"
    dest: fleet-out
"""

RETURN = r"""
files:
  description: Path of each file written (or left alone because it already held the same content), by name.
  returned: success
  type: dict
  sample: {"plan.json": "fleet-out/plan.json", "plan.md": "fleet-out/plan.md", "report.html": "fleet-out/report.html"}
"""
