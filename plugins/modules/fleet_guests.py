#!/usr/bin/python
# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: fleet_guests
short_description: Converge the guests placed on many libvirt and vSphere hypervisors, in one task
version_added: "1.0.0"
description:
  - The fleet form of M(virtfleet.core.guests) - every target (one hypervisor with its guests, as the
    P(virtfleet.core.place#filter) filter returns them in C(targets)) is converged in parallel, each with one
    connection, one bulk read and every guest planned before anything on that hypervisor is changed.
  - A target whose plan fails (a guest that is invalid for that hypervisor, an endpoint that is down) changes
    nothing there and is reported in its result; the other targets go on.
  - Runs on the controller (an action plugin of the same name does the work there, without shipping a module),
    which is what reaches the hypervisors. This module file runs the same code where an action plugin
    cannot be used.
  - The playbooks C(virtfleet.core.plan), C(virtfleet.core.apply) and C(virtfleet.core.drift) and the role
    C(virtfleet.core.fleet) call this once per run.
author:
  - virtfleet maintainers (@virtfleet)
requirements:
  - libvirt-python and pycdlib (libvirt endpoints)
  - pyvmomi (vSphere endpoints)
extends_documentation_fragment:
  - virtfleet.core.convergence
  - virtfleet.core.attributes
options:
  targets:
    description:
      - One entry per hypervisor, as the P(virtfleet.core.place#filter) filter returns them in C(targets).
      - Each target is checked when it is planned (its keys, and each of its guests against the guest spec of
        M(virtfleet.core.guest)); a target that is refused fails alone, with one line naming it and its guest, and
        the other targets go on.
      - Without it, the C(targets) of O(placement).
    type: list
    elements: dict
    suboptions:
      hypervisor:
        description: The hypervisor's inventory name, unique among the targets; its result is named by it.
        type: str
      uri:
        description: The endpoint the hypervisor is reached through (see O(virtfleet.core.guests#module:uri)). The
          targets of one endpoint (a vCenter's hosts) share one connection.
        type: str
      placement:
        description:
          - Where new guests go on this hypervisor - the options of M(virtfleet.core.guests) of the same names
            (C(datacenter), C(cluster), C(esxi_host), C(datastore), C(folder), C(resource_pool), C(domain_type)).
        type: dict
      guests:
        description:
          - The guests of this hypervisor, entries as for O(virtfleet.core.guests#module:guests).
          - An entry that placement marked (C(fleet_user_data=true)) gets its C(cloud_init.user_data) from
            O(fleet_file).
        type: list
        elements: dict
        default: []
      exclusive:
        description: Remove the guests of O(owner) on this hypervisor that are not listed (the fleet's C(prune)),
          except those in O(targets[].keep).
        type: bool
        default: false
      keep:
        description: Guest names never removed by O(targets[].exclusive) (the fleet's other guests, wherever they
          are).
        type: list
        elements: str
        default: []
  expect:
    description:
      - For an apply, the C(targets) a check-mode run of this module returned. Each target is planned again and
        nothing is changed on it when its plan differs from what that run planned.
    type: list
    elements: dict
  user_data_digest:
    description:
      - For an apply, the C(user_data_digest) the check-mode run returned; a fleet file whose user_data changed
        since is refused before anything is changed.
    type: str
  placement:
    description:
      - The P(virtfleet.core.place#filter) filter's output (RV(virtfleet.core.place#filter:_value)). Its C(targets)
        are converged unless O(targets) is given, and the result holds RV(plan), the plan (plan.json) built from it
        and the targets' results.
    type: dict
  fleet_file:
    description:
      - The fleet file placement read. Placement leaves the guests' C(cloud_init.user_data) in it (so no fact, event
        or plan holds it) and marks those guests; their user_data is read from here just before converging.
    type: path
  username:
    description: User for every vSphere target. Falls back to E(VMWARE_USER).
    type: str
    aliases: [user]
  password:
    description: >-
      Password for every vSphere target. Falls back to E(VMWARE_PASSWORD), then to the first line of the file
      E(VIRTFLEET_PASSWORD_FILE) names.
    type: str
    aliases: [pass, pwd]
  validate_certs:
    description: Check the TLS certificate of every endpoint. Falls back to E(VMWARE_VALIDATE_CERTS).
    type: bool
    default: true
  ca_path:
    description: CA bundle to check certificates with. Falls back to E(VIRTFLEET_CA_PATH), E(REQUESTS_CA_BUNDLE).
    type: path
  allow_uri_commands:
    description: Allow libvirt URIs that run a program (see M(virtfleet.core.guests)).
    type: bool
    default: false
  timeout:
    description: Seconds per call to one endpoint.
    type: float
    default: 10
  max_endpoints:
    description:
      - Targets converged at the same time. They are shared among one worker process per CPU core (reading and
        planning is CPU-bound, and threads of one Python process share one core), each with threads for the
        network waits.
    type: int
    default: 8
attributes:
  check_mode:
    support: full
    details:
      - Same results per target as the real run; nothing that changes a hypervisor is sent. The fleet's plan is
        this module's check-mode run.
  diff_mode:
    support: none
    details:
      - No diff is returned; each guest's changes are in RV(targets[].guests[].changes).
notes:
  - Runs on the controller (the action plugin), whatever host the task is for.
  - Credentials are shared by all vSphere targets of one task; converge fleets behind vCenters with different
    credentials in one task each.
seealso:
  - module: virtfleet.core.guests
    description: One endpoint's guests, the same convergence.
  - plugin: virtfleet.core.place
    plugin_type: filter
    description: Places a fleet's guests on the discovered hypervisors; its output is O(placement).
  - plugin: virtfleet.core.fleet_plan
    plugin_type: filter
    description: Builds the plan (plan.json) from a placement and this module's results.
  - module: virtfleet.core.fleet_report
    description: Writes the plan as plan.json, plan.md and report.html.
  - name: The virtfleet.core.fleet role
    description: Place, plan, apply and check a fleet with this module (roles/fleet/README.md).
    link: https://github.com/virtfleet/virtfleet.core/blob/main/roles/fleet/README.md
  - name: The fleet
    description: The fleet file, placement rules, plan.json, the reviewed plan, drift, prune (docs/fleet.md).
    link: https://github.com/virtfleet/virtfleet.core/blob/main/docs/fleet.md
"""

EXAMPLES = r"""
- name: Plan a placed fleet (check mode); fleet_planned.plan is plan.json
  virtfleet.core.fleet_guests:
    placement: "{{ fleet_placement }}"
    owner: "{{ fleet_placement.fleet }}"
  check_mode: true
  register: fleet_planned
"""

RETURN = r"""
user_data_digest:
  description: A digest of the guests' user_data this run used (see O(user_data_digest)).
  returned: success
  type: str
  sample: sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
restart_required:
  description: At least one guest of any target has a change that waits for a restart.
  returned: success
  type: bool
  sample: false
plan:
  description: >-
    The plan (plan.json), built by the P(virtfleet.core.fleet_plan#filter) filter from O(placement) and the targets'
    results; its keys (C(version), C(fleet), C(guests), C(unplaceable), C(unreachable), C(pending), C(errors),
    C(notes), C(hypervisors), C(summary), C(changed), C(options), C(digest)) are described in docs/fleet.md and
    in RV(virtfleet.core.fleet_plan#filter:_value).
  returned: when placement is given
  type: dict
  sample: {"version": 1, "fleet": "web-team", "changed": true, "digest": "sha256:1f2e...",
           "summary": {"create": 1, "update": 0, "delete": 0, "none": 3, "unplaceable": 0, "pending": 0,
                       "unreachable": 0, "errors": 0}}
targets:
  description: One result per target, in the order given.
  returned: success
  type: list
  elements: dict
  contains:
    hypervisor:
      description: The target's inventory name.
      type: str
      sample: kvm01
    uri:
      description: The target's endpoint.
      type: str
      sample: qemu+ssh://root@kvm01.example.com/system
    failed:
      description: The target's plan or apply failed (see C(msg)); when its plan failed nothing was changed there.
      type: bool
      sample: false
    msg:
      description: Why the target failed, one line; null otherwise.
      type: str
      sample: null
    guests:
      description: One result per guest, as RV(virtfleet.core.guests#module:guests) - C(name), C(changed),
        C(action), C(changes), C(restart_required), C(guest), C(failed), C(msg). Empty when the target's plan
        failed.
      type: list
      elements: dict
      contains:
        name:
          description: Guest name.
          type: str
          sample: web01
        changed:
          description: Something changed on this guest (or would, in check mode).
          type: bool
          sample: true
        action:
          description: V(create), V(update), V(remove) or V(none).
          type: str
          sample: create
        changes:
          description: What changed (or would), each with C(field), C(before), C(after) and C(live), as
            RV(virtfleet.core.guest#module:changes).
          type: list
          elements: dict
          sample: [{"field": "guest", "before": "absent", "after": "present", "live": true}]
        restart_required:
          description: A change of this guest waits for a restart.
          type: bool
          sample: false
        guest:
          description: The guest's normalised model after the run, as RV(virtfleet.core.guest#module:guest).
          type: dict
          sample: {"name": "web01", "vcpus": 2, "memory_mib": 2048}
        failed:
          description: This guest failed while it was applied.
          type: bool
          sample: false
        msg:
          description: Why this guest failed, one line; null otherwise.
          type: str
          sample: null
    planned:
      description: The guests the target was given, each as C(name).
      type: list
      elements: dict
      contains:
        name:
          description: Guest name.
          type: str
          sample: web01
      sample: [{"name": "web01"}]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.virtfleet.core.plugins.module_utils._fleet_run import (
    fleet_guests_argument_spec,
    run_fleet_module,
)


def main() -> None:
    spec = fleet_guests_argument_spec()
    # no_log: the targets hold the guests' cloud-init documents; results mask them (see run_fleet_module).
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True, no_log=True)
    run_fleet_module(module)


if __name__ == "__main__":
    main()
