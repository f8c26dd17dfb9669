# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
name: hypervisors
short_description: Find the hypervisors (ESXi, vCenter-managed ESXi, KVM/QEMU) on a fleet and their guests
version_added: "1.0.0"
description:
  - Probes a list of endpoints and address ranges, identifies what answers (ESXi, vCenter, libvirt, Redfish BMC),
    reads each hypervisor's facts and capacity and, optionally, every guest VM, in bulk and in parallel.
  - Every hypervisor becomes an inventory host with the dict hostvar C(virtfleet_hypervisor); with O(guests),
    every guest becomes a host with C(virtfleet_guest).
  - Groups made - C(hypervisors), C(guests), one per hypervisor type (C(esxi), C(kvm), C(qemu) ...),
    C(running), C(stopped), C(paused), C(suspended), C(cluster_<name>) per vCenter cluster,
    C(guests_of_<hypervisor>) per hypervisor with guests, C(vcenters), C(bmcs) and C(unreachable).
  - An endpoint that is down, refuses login or times out lands in C(unreachable) with the one-line hostvar
    C(virtfleet_error); the rest of the inventory is built. With O(strict=true) the run fails instead.
  - Every discovered object keeps a host of its own, and no host of another inventory source is touched. A name
    that is already taken (by another source, by an endpoint, a hypervisor or another guest of this source),
    that equals a group's name, or that is C(localhost) is renamed, with a warning - a guest to
    C(<guest>@<hypervisor>) (and C(<guest>@<hypervisor>#<uuid>) when that is taken too), a hypervisor to
    C(<name>@<endpoint>), an endpoint to C(<host>@<api>). Every object sharing a name is renamed, so the
    names do not depend on the order of discovery.
  - Group names are made of letters, digits and underscores only; other characters become C(_), and a
    name starting with a digit gets a leading C(_) (also for O(keyed_groups) and O(groups)).
  - Every string read from a hypervisor or a guest is marked unsafe, so it is never templated.
  - Credentials never enter hostvars or the cache; a password in an endpoint URI is refused.
  - Probing talks TLS only (vSphere, Redfish over https, libvirt over TLS), unless O(allow_plaintext=true).
author:
  - virtfleet maintainers (@virtfleet)
requirements:
  - libvirt-python (libvirt endpoints; vSphere and Redfish endpoints need no extra library)
extends_documentation_fragment:
  - ansible.builtin.constructed
  - ansible.builtin.inventory_cache
options:
  plugin:
    description: Marks this file as a configuration for this plugin.
    type: str
    required: true
    choices: [virtfleet.core.hypervisors]
  endpoints:
    description:
      - What to discover. Each item is either a C(uri) or a C(probe) range.
      - C(uri) is V(vsphere://host[:port]) (ESXi or vCenter), V(redfish://host[:port]) or
        V(redfish+http://host:port) (a BMC), or any libvirt URI (V(qemu:///system), V(qemu+ssh://host/system),
        V(qemu+tls://host/system), V(qemu+tcp://host/system), V(test:///default)).
      - C(probe) is an address or CIDR range (at most 4096 addresses) to scan on C(ports)
        (default V([443, 16509, 16514])). 443 (and any other port) is identified as vSphere or Redfish over TLS;
        16514 as libvirt over TLS. Plain Redfish over http and libvirt over plain TCP (16509) are only tried
        with O(allow_plaintext=true).
      - A password in a URI is refused (use O(password) or O(credentials)); so is a user in a vSphere or
        Redfish URI. A libvirt URI that runs a program (the C(ext) transport, C(command=), C(netcat=)) is refused
        unless O(allow_uri_commands=true); C(no_verify=1) in a libvirt URI is refused unless C(validate_certs)
        is false for that endpoint.
      - V(qemu+libssh://user@host/system?keyfile=/path/key&known_hosts=/path/known_hosts) checks the SSH host key
        against that known_hosts file; C(known_hosts_verify=ignore) or C(auto) is refused unless C(validate_certs)
        is false for that endpoint.
      - A plain string item is taken as a C(uri).
      - A C(uri) may be a template, for example a lookup of an environment variable an AWX credential injects.
      - When empty, E(LIBVIRT_DEFAULT_URI) is used if set.
    type: list
    elements: raw
    default: []
  credentials:
    description:
      - Credentials per endpoint host, matched in order with a shell glob against the host as written
        (or the probed address). The first match wins; unmatched endpoints use O(username) and O(password).
      - Each item has C(match), C(username), C(password), C(validate_certs) and C(ca_path).
      - C(validate_certs) defaults to O(validate_certs), C(ca_path) to O(ca_path).
    type: list
    elements: dict
    default: []
  username:
    description: Default user for endpoints no O(credentials) entry matches.
    type: str
    env:
      - name: VMWARE_USER
  password:
    description:
      - Default password for endpoints no O(credentials) entry matches.
      - Without it and E(VMWARE_PASSWORD), the first line of the file E(VIRTFLEET_PASSWORD_FILE) names.
    type: str
    env:
      - name: VMWARE_PASSWORD
  validate_certs:
    description: Verify TLS certificates. Only set V(false) for a lab or a simulator.
    type: bool
    default: true
    env:
      - name: VMWARE_VALIDATE_CERTS
  ca_path:
    description:
      - A PEM file of CA certificates, or a directory of hashed certificates, to verify vSphere and Redfish
        endpoints with; only these CAs are then trusted. Not used where C(validate_certs) is false.
    type: path
    env:
      - name: VIRTFLEET_CA_PATH
      - name: REQUESTS_CA_BUNDLE
  allow_plaintext:
    description:
      - Let a O(endpoints) C(probe) also try Redfish over plain http and libvirt over plain TCP (port 16509).
        Credentials then travel unencrypted to whatever answers there. URIs written in O(endpoints) are used
        as written.
    type: bool
    default: false
  allow_uri_commands:
    description:
      - Allow libvirt URIs that make libvirt run a program (the C(ext) transport and C(command=) on this
        machine, C(netcat=) on the remote one).
    type: bool
    default: false
  guests:
    description: Also add every guest VM as an inventory host (templates are left out).
    type: bool
    default: false
  max_workers:
    description: How many endpoints are discovered (and probe targets checked) at the same time; 1 to 256.
    type: int
    default: 32
  timeout:
    description:
      - Seconds allowed for each network operation on an endpoint; more than 0, at most 3600.
      - One vSphere or Redfish call (its whole answer) may take at most six times this long; a remote libvirt
        connection whose peer stops answering is closed after about this long (libvirt keepalive).
    type: float
    default: 10
notes:
  - The configuration file's name must end in C(hypervisors.yml) or C(hypervisors.yaml).
  - With O(guests=false) the hypervisors carry guest counts only. The fleet's placement
    (P(virtfleet.core.place#filter)) refuses an inventory whose hypervisors report guests it holds no facts of,
    because every fleet guest would look new.
  - With the inventory cache on, a guest made since the cache was written is missing from what placement sees;
    run the fleet playbooks with fresh discovery.
seealso:
  - module: virtfleet.core.hypervisor_info
    description: The same facts for one endpoint, inside a playbook.
  - module: virtfleet.core.guest_info
    description: Guests in the model the guest modules take as desired state.
  - name: The hypervisors inventory
    description: Endpoints, probing, credentials, groups, hostvars, renamed hosts, cache (docs/inventory.md).
    link: https://github.com/virtfleet/virtfleet.core/blob/main/docs/inventory.md
  - name: Security
    description: TLS, credentials, templating safety of discovered data (docs/security.md).
    link: https://github.com/virtfleet/virtfleet.core/blob/main/docs/security.md
"""

EXAMPLES = r"""
# hypervisors.yml (the file name must end in hypervisors.yml or hypervisors.yaml)
plugin: virtfleet.core.hypervisors
endpoints:
  - uri: qemu:///system
  - uri: vsphere://esx01.example.com
  - uri: vsphere://vcenter.example.com
  - probe: 192.0.2.0/28
    ports: [443, 16509]
credentials:
  - match: "esx*.example.com"
    username: root
    password: "{{ lookup('ansible.builtin.env', 'ESX_PASSWORD') }}"
  - match: "vcenter.example.com"
    username: administrator@vsphere.local
    password: "{{ lookup('ansible.builtin.env', 'VCENTER_PASSWORD') }}"
guests: true
keyed_groups:
  - key: virtfleet_guest.tags.role | default(omit)
    prefix: role
cache: true
cache_plugin: ansible.builtin.jsonfile
cache_connection: ~/.cache/virtfleet
"""

import hashlib
import json
import os
import re
import time
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from ansible.errors import AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin, Cacheable, Constructable
from ansible.release import __version__ as ansible_version
from ansible.utils.display import Display
from ansible.utils.unsafe_proxy import wrap_var as _wrap_var

from ansible_collections.virtfleet.core.plugins.module_utils._discovery import dedupe, discover_all, paused_gc, probe
from ansible_collections.virtfleet.core.plugins.module_utils._endpoints import (
    HIDDEN,
    MAX_TIMEOUT,
    MAX_WORKERS,
    Credentials,
    Endpoint,
    check_bounds,
    check_rules_match,
    check_transport,
    credentials_for,
    env_credentials,
    looks_secret,
    parse_credential_rules,
    parse_endpoint,
    probe_addresses,
    probe_ports,
    with_credentials,
)
from ansible_collections.virtfleet.core.plugins.module_utils._errors import ConfigError


def _untrusted_by_default(version: str) -> bool:
    """ansible-core 2.19 introduced data tagging: a value is only templated when it is tagged as trusted,
    and nothing from an inventory plugin is. Before 2.19, strings had to be wrapped as unsafe."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 19)


def wrap_var(value: Any) -> Any:
    """Mark hypervisor/guest data unsafe for templating. On 2.19+ it already is (see above), and wrap_var
    there would only copy every value again: about 0.35 s for 1,700 hosts, measured."""
    return value if _UNTRUSTED_BY_DEFAULT else _wrap_var(value)


_UNTRUSTED_BY_DEFAULT = _untrusted_by_default(ansible_version)

display = Display()

OPTIONS = {"plugin", "endpoints", "credentials", "username", "password", "validate_certs", "ca_path",
           "allow_plaintext", "allow_uri_commands", "guests", "max_workers", "timeout", "compose", "groups",
           "keyed_groups", "strict", "use_extra_vars", "leading_separator", "cache", "cache_plugin",
           "cache_timeout", "cache_connection", "cache_prefix"}
# Groups this plugin makes whatever it finds (power states included); no host may take one of these names.
FIXED_GROUPS = ("all", "ungrouped", "hypervisors", "guests", "unreachable", "vcenters", "bmcs", "running", "stopped",
                "paused", "suspended", "unknown")
# ansible-core's implicit localhost names (C.LOCALHOST): a discovered host so named would become the controller.
LOCALHOST_NAMES = frozenset(("localhost", "127.0.0.1", "::1"))
_NOT_GROUP_CHARS = re.compile(r"[^A-Za-z0-9_]")


def safe_group_name(name: str) -> str:
    """A valid group name: letters, digits and underscores, not starting with a digit."""
    out = _NOT_GROUP_CHARS.sub("_", str(name))
    return out if out and not out[0].isdigit() else f"_{out}"


class _Names:
    """Inventory host names, handed out so that every discovered object gets a host of its own.

    A wanted name is used when no other object of the batch wants it and it is free: not a host already in the
    inventory (another source's, or one named earlier in this run), not a group, not localhost. Else every
    object of the batch that wants it is renamed NAME@QUALIFIER, then NAME@QUALIFIER#ID, then #ID-N.
    """

    def __init__(self, taken: Set[str], groups: Set[str]) -> None:
        self.taken, self.groups = taken, groups

    def _free(self, name: str) -> bool:
        return name not in self.taken and name not in self.groups and name.lower() not in LOCALHOST_NAMES

    def assign(self, wanted: Sequence[Tuple[str, str, str]], what: str) -> List[str]:
        """For each (name, qualifier, id) of WANTED, its host name, in order; each renaming is a warning."""
        names = [name for name, _q, _i in wanted]
        for step in (lambda n, q, i: f"{n}@{q}", lambda n, q, i: f"{n}@{q}#{i}"):
            counts: Dict[str, int] = {}
            for name in names:
                counts[name] = counts.get(name, 0) + 1
            names = [name if counts[name] == 1 and self._free(name) else step(*item)
                     for name, item in zip(names, wanted)]
        out: List[str] = []
        for name, item in zip(names, wanted):
            final, n = name, 1
            while final in out or not self._free(final):
                n += 1
                final = f"{name}-{n}"
            out.append(final)
            if final != item[0]:
                display.warning(f"virtfleet.core.hypervisors: {what} name '{item[0]}' is taken or not unique; "
                                f"this one is named '{final}'")
        self.taken.update(out)
        return out


class InventoryModule(BaseInventoryPlugin, Constructable, Cacheable):
    NAME = "virtfleet.core.hypervisors"

    def verify_file(self, path: str) -> bool:
        return super().verify_file(path) and path.endswith(("hypervisors.yml", "hypervisors.yaml"))

    # ------------------------------------------------------------------ configuration
    def _plan(self, config: Dict[str, Any]) -> Tuple[List[Endpoint], List[Tuple[List[str], List[int]]], Any]:
        """Validate everything and build the endpoint list before any network traffic."""
        unknown = sorted(set(config) - OPTIONS, key=str)
        if unknown:  # its value is never shown: an unknown option may well be a misspelt password
            raise ConfigError(str(unknown[0]), HIDDEN, f"unknown option of {self.NAME}")
        check_bounds("max_workers", self.get_option("max_workers"), MAX_WORKERS, integer=True)
        check_bounds("timeout", self.get_option("timeout"), MAX_TIMEOUT)
        default = env_credentials(self._render(self.get_option("username")),
                                  self._render(self.get_option("password")), self.get_option("validate_certs"),
                                  self.get_option("ca_path"))
        rules = parse_credential_rules([
            {k: self._render(v) for k, v in rule.items()} if isinstance(rule, dict) else rule
            for rule in self.get_option("credentials") or []
        ], default=default)
        allow_commands = bool(self.get_option("allow_uri_commands"))
        items = list(self.get_option("endpoints") or [])
        if not items and os.environ.get("LIBVIRT_DEFAULT_URI"):
            items = [{"uri": os.environ["LIBVIRT_DEFAULT_URI"]}]
        if not items:
            raise ConfigError("endpoints", [], "empty; list at least one uri or probe (or set LIBVIRT_DEFAULT_URI)")
        endpoints: List[Endpoint] = []
        probes: List[Tuple[List[str], List[int]]] = []
        for i, item in enumerate(items):
            where = f"endpoints[{i}]"
            if isinstance(item, str):
                item = {"uri": item}
            if isinstance(item, dict) and isinstance(item.get("uri"), str) and "{" in item["uri"]:
                # A template too, e.g. a lookup of the environment variable an AWX credential injects.
                rendered = self._render(item["uri"])
                if not str(rendered).strip():
                    raise ConfigError(f"{where}.uri", item["uri"], "the template gives an empty URI (is the "
                                      "credential that sets its variable attached to this job?)")
                item = dict(item, uri=rendered)
            if not isinstance(item, dict):
                raise ConfigError(where, HIDDEN, "expected a uri string or a dict with uri or probe")
            extra = sorted(set(item) - {"uri", "probe", "ports"}, key=str)
            if extra:
                raise ConfigError(f"{where}.{extra[0]}", HIDDEN, "unknown key; expected uri, or probe with ports")
            if ("uri" in item) == ("probe" in item):
                raise ConfigError(where, sorted(item), "give exactly one of uri or probe")
            if "uri" in item:
                if "ports" in item:
                    raise ConfigError(f"{where}.ports", item["ports"], "ports go with probe, not uri")
                endpoint = parse_endpoint(item["uri"], f"{where}.uri", allow_uri_commands=allow_commands)
                check_transport(with_credentials(endpoint, credentials_for(endpoint.host, rules, default)),
                                f"{where}.uri")
                endpoints.append(endpoint)
            else:
                probes.append((probe_addresses(item["probe"], f"{where}.probe"),
                               probe_ports(item.get("ports"), f"{where}.ports")))
        check_rules_match(rules, [e.host for e in endpoints], has_probes=bool(probes))
        return endpoints, probes, (rules, default)

    def _render(self, value: Any) -> Any:
        """Template a credential or URI string written in the inventory file, e.g. a lookup of an environment
        variable."""
        if isinstance(value, str) and ("{{" in value or "{%" in value):
            return self.templar.template(value)
        return value

    @staticmethod
    def _attach(endpoints: List[Endpoint], rules: Any, default: Credentials) -> List[Endpoint]:
        return [with_credentials(e, credentials_for(e.host, rules, default)) for e in endpoints]

    def _progress(self, msg: str) -> None:
        if display.verbosity >= 1:
            display.display(f"virtfleet.core.hypervisors: {msg}", stderr=True)

    # ------------------------------------------------------------------ entry point
    def parse(self, inventory: Any, loader: Any, path: str, cache: bool = True) -> None:
        super().parse(inventory, loader, path, cache)
        config = self._read_config_data(path)
        try:
            endpoints, probes, (rules, default) = self._plan(config)
        except ConfigError as exc:
            # A value under a secret-looking name is never shown, whichever check found it.
            text = f"{exc.option}={HIDDEN}: {exc.problem}" if looks_secret(exc.option) else str(exc)
            raise AnsibleParserError(f"{self.NAME} ({path}): {text}") from None

        # Per file and per endpoint list: templated URIs may name other endpoints in another job.
        listed = json.dumps([e.uri for e in endpoints] + [list(p) for p in probes], sort_keys=True, default=str)
        cache_key = f"{self.get_cache_key(path)}_{hashlib.sha256(listed.encode()).hexdigest()[:12]}"
        use_cache = self.get_option("cache")
        results: Optional[List[Dict[str, Any]]] = None
        if use_cache and cache:
            try:
                results = self._cache[cache_key]
                self._progress("cache hit; nothing contacted")
            except KeyError:
                results = None
        with paused_gc():
            if results is None:
                results = self._fetch(endpoints, probes, rules, default)
                if use_cache:
                    self._cache[cache_key] = results
            self._populate(results)

    def _fetch(self, endpoints: List[Endpoint], probes: List[Tuple[List[str], List[int]]], rules: Any,
               default: Credentials) -> List[Dict[str, Any]]:
        timeout = float(self.get_option("timeout"))
        workers = int(self.get_option("max_workers"))
        found: List[Endpoint] = []
        unknown: List[Dict[str, Any]] = []
        for addresses, ports in probes:
            self._progress(f"probing {len(addresses)} address(es) on ports {ports}")
            hits, misses = probe(addresses, ports, timeout, workers,
                                 lambda host: credentials_for(host, rules, default), self._progress,
                                 allow_plaintext=bool(self.get_option("allow_plaintext")))
            found.extend(hits)
            unknown.extend(misses)
        targets = self._attach(dedupe(endpoints + found), rules, default)
        self._progress(f"discovering {len(targets)} endpoint(s), {workers} at a time")
        start = time.monotonic()
        results = discover_all(targets, bool(self.get_option("guests")), timeout, workers, self._progress)
        self._progress(f"discovery done in {time.monotonic() - start:.2f}s: {len(results)} endpoint(s), "
                       f"{sum(r['calls'] for r in results)} calls in all")
        for miss in unknown:
            self._progress(f"{miss['address']}:{miss['port']}: {miss['error']}")
        return results

    # ------------------------------------------------------------------ inventory building (pure)
    # Group names made by compose's keyed_groups/groups go through this too (Constructable calls it).
    _sanitize_group_name = staticmethod(safe_group_name)

    def _populate(self, results: List[Dict[str, Any]]) -> None:
        """Turn discovery results (plain dicts, e.g. from the cache) into hosts, groups and hostvars.

        Every name is decided first (_Names), against the hosts and groups already in the inventory and every
        group this run makes; hosts join groups by add_host(group=), which never mistakes a host for a group."""
        inv = self.inventory
        strict = bool(self.get_option("strict"))
        want_guests = bool(self.get_option("guests"))

        errors = [r for r in results if r.get("error")]
        if strict and errors:
            first = errors[0]
            raise AnsibleParserError(f"{self.NAME}: endpoint {first['endpoint']['uri']} failed: {first['error']}")

        ok = [r for r in results if not r.get("error")]
        groups = set(inv.groups) | set(FIXED_GROUPS) | {safe_group_name(g) for g in self.get_option("groups") or {}}
        for result in ok:
            for hv in result.get("hypervisors", []):
                groups.add(safe_group_name(hv["type"]))
                if hv.get("cluster"):
                    groups.add(safe_group_name(f"cluster_{hv['cluster']}"))
        names = _Names(set(inv.hosts), groups)

        # 1. Endpoints that are hosts of their own: unreachable ones, vCenters, BMCs - named as the user wrote them.
        own = [r for r in results if r.get("error") or r["identity"]["type"] == "vcenter" or r.get("bmc")]
        labels = dict(zip((id(r) for r in own), names.assign(
            [(self._label(r), r["endpoint"]["api"], str(r["endpoint"].get("port") or "")) for r in own],
            "endpoint")))
        # 2. Hypervisors; 3. the holder group of each; 4. guests.
        pairs = [(r, hv) for r in ok for hv in r.get("hypervisors", [])]
        hv_list = names.assign([(hv["name"], self._label(r), str(i)) for i, (r, hv) in enumerate(pairs)],
                               "hypervisor")
        hv_names = {(self._label(r), hv["name"]): name for (r, hv), name in zip(pairs, hv_list)}
        groups.update(safe_group_name(f"guests_of_{name}") for name in hv_list)

        for group in ("hypervisors", "guests", "unreachable"):
            inv.add_group(group)
        for result in results:
            if id(result) in labels:
                self._add_endpoint_host(labels[id(result)], result, hv_names)
        for (result, hv), name in zip(pairs, hv_list):
            self._add_hypervisor(name, hv, result, strict)
        if want_guests:
            self._add_guests(ok, hv_names, names, strict)

    @staticmethod
    def _label(result: Dict[str, Any]) -> str:
        endpoint = result["endpoint"]
        return str(endpoint["host"] or endpoint["uri"])

    def _join(self, host: str, group: str) -> None:
        self.inventory.add_group(group)
        self.inventory.add_host(host, group=group)

    def _add_endpoint_host(self, name: str, result: Dict[str, Any], hv_names: Dict[Tuple[str, str], str]) -> None:
        inv = self.inventory
        if result.get("error"):
            self._join(name, "unreachable")
            inv.set_variable(name, "virtfleet_error", wrap_var(result["error"]))
            inv.set_variable(name, "virtfleet_endpoint", wrap_var(result["endpoint"]))
            return
        if result["identity"]["type"] == "vcenter":
            self._join(name, "vcenters")
            managed = [hv_names[(self._label(result), h["name"])] for h in result["hypervisors"]]
            vcenter = dict(result["identity"], endpoint=result["endpoint"]["uri"], hosts=managed)
            inv.set_variable(name, "virtfleet_vcenter", wrap_var(vcenter))
        if result.get("bmc"):
            self._join(name, "bmcs")
            inv.set_variable(name, "virtfleet_bmc", wrap_var(result["bmc"]))
        inv.set_variable(name, "ansible_host", wrap_var(result["endpoint"]["host"]))

    def _add_hypervisor(self, name: str, hv: Dict[str, Any], result: Dict[str, Any], strict: bool) -> None:
        inv = self.inventory
        self._join(name, "hypervisors")
        self._join(name, safe_group_name(hv["type"]))
        if hv.get("cluster"):
            self._join(name, safe_group_name(f"cluster_{hv['cluster']}"))
        # Wrapped once, and the same (unsafe on every ansible-core) value goes to hostvars and to compose.
        facts = wrap_var(dict(hv, name=name))
        # A vCenter-managed host is reached by its vCenter name; a direct endpoint by its address as written.
        ansible_host = hv["name"] if hv.get("manager") and result["identity"]["type"] == "vcenter" else (
            result["endpoint"]["host"] or hv["name"])
        inv.set_variable(name, "ansible_host", wrap_var(ansible_host))
        inv.set_variable(name, "virtfleet_hypervisor", facts)
        self._construct(name, {"virtfleet_hypervisor": facts}, strict)

    def _add_guests(self, results: List[Dict[str, Any]], hv_names: Dict[Tuple[str, str], str], names: _Names,
                    strict: bool) -> None:
        inv = self.inventory
        entries = []
        for result in results:
            label = self._label(result)
            for guest in result.get("guests", []):
                hypervisor = hv_names.get((label, guest.get("hypervisor") or ""), guest.get("hypervisor") or label)
                entries.append((guest, hypervisor))
        guest_names = names.assign([(str(g["name"]), hv, str(g.get("uuid") or i))
                                    for i, (g, hv) in enumerate(entries)], "guest")
        for (guest, hypervisor), name in zip(entries, guest_names):
            facts = wrap_var(dict(guest, hypervisor=hypervisor))
            self._join(name, "guests")
            self._join(name, safe_group_name(guest["power_state"]))
            self._join(name, safe_group_name(f"guests_of_{hypervisor}"))
            if guest.get("ip_addresses"):
                inv.set_variable(name, "ansible_host", wrap_var(guest["ip_addresses"][0]))
            inv.set_variable(name, "virtfleet_guest", facts)
            self._construct(name, {"virtfleet_guest": facts}, strict)

    def _construct(self, host: str, variables: Dict[str, Any], strict: bool) -> None:
        self._set_composite_vars(self.get_option("compose"), variables, host, strict=strict)
        self._add_host_to_composed_groups(self.get_option("groups"), variables, host, strict=strict)
        self._add_host_to_keyed_groups(self.get_option("keyed_groups"), variables, host, strict=strict)
