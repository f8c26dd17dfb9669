#!/usr/bin/python
# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: fleet_report
short_description: Write a fleet plan as plan.json, plan.md and report.html on the controller
version_added: 0.3.0
description:
  - Renders the plan built by the P(virtfleet.core.fleet_plan#filter) filter into the files C(plan.json) (the
    machine-readable plan, see docs/fleet.md), C(plan.md) (for a pull-request comment) and C(report.html) (one
    self-contained page - nothing is fetched when it is opened).
  - Runs on the controller as an action plugin, whatever host the task is for; a file that already holds the
    same content is not rewritten.
author:
  - virtfleet maintainers (@virtfleet)
options:
  plan:
    description: The plan (the fleet_plan filter's output).
    type: dict
    required: true
  dest:
    description: Directory the files are written to; created when missing.
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
    description: The files are written in check mode too - they describe the plan, they change no hypervisor.
  diff_mode:
    support: none
    description: No diff is returned; the per-guest changes are in the results.
"""

EXAMPLES = r"""
- name: Write the plan next to the pipeline's artifacts
  virtfleet.core.fleet_report:
    plan: "{{ fleet_result }}"
    dest: fleet-out
"""

RETURN = r"""
files:
  description: Path of each file written, by name.
  returned: always
  type: dict
"""
