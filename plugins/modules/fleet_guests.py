#!/usr/bin/python
# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: fleet_guests
short_description: Converge the guests placed on many libvirt and vSphere hypervisors, in one task
version_added: 0.3.0
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
options:
  targets:
    description:
      - One entry per hypervisor - C(hypervisor) (its inventory name), C(uri), C(placement) (the options of the
        virtfleet.core.placement fragment - datacenter, cluster, esxi_host, datastore, folder, resource_pool,
        domain_type), C(guests) (entries as for M(virtfleet.core.guests)), C(exclusive) and C(keep).
      - With C(exclusive), guests of O(owner) on that hypervisor that are not listed are removed (the fleet's
        C(prune)), except those named in C(keep) (the fleet's other guests, wherever they are).
      - Without it, the C(targets) of O(placement).
    type: list
    elements: dict
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
      - The P(virtfleet.core.place#filter) filter's output. Its C(targets) are converged unless O(targets) is given,
        and the result holds C(plan), the plan (plan.json) built from it and the targets' results.
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
    description: Password for every vSphere target. Falls back to E(VMWARE_PASSWORD).
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
    description: Same results per target as the real run; nothing that changes a hypervisor is sent.
  diff_mode:
    support: none
    description: No diff is returned; the per-guest changes are in the results.
notes:
  - Credentials are shared by all vSphere targets of one task; converge fleets behind vCenters with different
    credentials in one task each.
seealso:
  - module: virtfleet.core.guests
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
plan:
  description: The plan (see docs/fleet.md, plan.json), when O(placement) is given.
  returned: when placement is given
  type: dict
targets:
  description: One result per target, in the order given.
  returned: always
  type: list
  elements: dict
  contains:
    hypervisor:
      description: The target's inventory name.
      type: str
    failed:
      description: The target's plan or apply failed (see C(msg)); when its plan failed nothing was changed there.
      type: bool
    msg:
      description: Why the target failed, one line.
      type: str
    guests:
      description: One result per guest, as M(virtfleet.core.guests) returns them.
      type: list
      elements: dict
    planned:
      description: The names of the guests the target was given.
      type: list
      elements: dict
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
