# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: hypervisors
short_description: Find the hypervisors (ESXi, vCenter-managed ESXi, KVM/QEMU) on a fleet and their guests
version_added: 0.1.0
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
  - Guest names that appear on more than one hypervisor (or equal a hypervisor's name) are all renamed
    C(<guest>@<hypervisor>), with a warning; a name is never silently overwritten.
  - Every string read from a hypervisor or a guest is marked unsafe, so it is never templated.
  - Credentials never enter hostvars or the cache.
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
        (default V([443, 16509, 16514])). 443 is identified as vSphere or Redfish; 16509 and 16514 as libvirt
        over TCP and TLS.
      - A plain string item is taken as a C(uri).
      - When empty, E(LIBVIRT_DEFAULT_URI) is used if set.
    type: list
    elements: raw
    default: []
  credentials:
    description:
      - Credentials per endpoint host, matched in order with a shell glob against the host as written
        (or the probed address). The first match wins; unmatched endpoints use O(username) and O(password).
      - Each item has C(match), C(username), C(password) and C(validate_certs).
      - C(validate_certs) defaults to O(validate_certs).
    type: list
    elements: dict
    default: []
  username:
    description: Default user for endpoints no O(credentials) entry matches.
    type: str
    env:
      - name: VMWARE_USER
  password:
    description: Default password for endpoints no O(credentials) entry matches.
    type: str
    env:
      - name: VMWARE_PASSWORD
  validate_certs:
    description: Verify TLS certificates. Only set V(false) for a lab or a simulator.
    type: bool
    default: true
    env:
      - name: VMWARE_VALIDATE_CERTS
  guests:
    description: Also add every guest VM as an inventory host (templates are left out).
    type: bool
    default: false
  max_workers:
    description: How many endpoints are discovered (and probe targets checked) at the same time.
    type: int
    default: 32
  timeout:
    description: Seconds allowed for each network operation on an endpoint.
    type: float
    default: 10
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

import os
import time
from typing import Any, Dict, List, Optional, Tuple

from ansible.errors import AnsibleParserError
from ansible.inventory.group import to_safe_group_name
from ansible.plugins.inventory import BaseInventoryPlugin, Cacheable, Constructable
from ansible.release import __version__ as ansible_version
from ansible.utils.display import Display
from ansible.utils.unsafe_proxy import wrap_var as _wrap_var

from ansible_collections.virtfleet.core.plugins.module_utils._discovery import dedupe, discover_all, paused_gc, probe
from ansible_collections.virtfleet.core.plugins.module_utils._endpoints import (
    Credentials,
    Endpoint,
    check_rules_match,
    credentials_for,
    env_credentials,
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

OPTIONS = {"plugin", "endpoints", "credentials", "username", "password", "validate_certs", "guests", "max_workers",
           "timeout", "compose", "groups", "keyed_groups", "strict", "use_extra_vars", "leading_separator",
           "cache", "cache_plugin", "cache_timeout", "cache_connection", "cache_prefix"}


class InventoryModule(BaseInventoryPlugin, Constructable, Cacheable):
    NAME = "virtfleet.core.hypervisors"

    def verify_file(self, path: str) -> bool:
        return super().verify_file(path) and path.endswith(("hypervisors.yml", "hypervisors.yaml"))

    # ------------------------------------------------------------------ configuration
    def _plan(self, config: Dict[str, Any]) -> Tuple[List[Endpoint], List[Tuple[List[str], List[int]]], Any]:
        """Validate everything and build the endpoint list before any network traffic."""
        unknown = sorted(set(config) - OPTIONS)
        if unknown:
            raise ConfigError(unknown[0], config[unknown[0]], f"unknown option of {self.NAME}")
        default = env_credentials(self._render(self.get_option("username")),
                                  self._render(self.get_option("password")), self.get_option("validate_certs"))
        rules = parse_credential_rules([
            {k: self._render(v) for k, v in rule.items()} if isinstance(rule, dict) else rule
            for rule in self.get_option("credentials") or []
        ], default=default)
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
            if not isinstance(item, dict):
                raise ConfigError(where, item, "expected a uri string or a dict with uri or probe")
            extra = sorted(set(item) - {"uri", "probe", "ports"})
            if extra:
                raise ConfigError(f"{where}.{extra[0]}", item[extra[0]],
                                  "unknown key; expected uri, or probe with ports")
            if ("uri" in item) == ("probe" in item):
                raise ConfigError(where, item, "give exactly one of uri or probe")
            if "uri" in item:
                if "ports" in item:
                    raise ConfigError(f"{where}.ports", item["ports"], "ports go with probe, not uri")
                endpoints.append(parse_endpoint(item["uri"], f"{where}.uri"))
            else:
                probes.append((probe_addresses(item["probe"], f"{where}.probe"),
                               probe_ports(item.get("ports"), f"{where}.ports")))
        check_rules_match(rules, [e.host for e in endpoints], has_probes=bool(probes))
        for option in ("max_workers", "timeout"):
            value = self.get_option(option)
            if value is None or value <= 0:
                raise ConfigError(option, value, "must be greater than 0")
        return endpoints, probes, (rules, default)

    def _render(self, value: Any) -> Any:
        """Template a credential string written in the inventory file, e.g. a lookup of an environment variable."""
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
            raise AnsibleParserError(f"{self.NAME} ({path}): {exc}") from None

        cache_key = self.get_cache_key(path)
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
                                 lambda host: credentials_for(host, rules, default), self._progress)
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
    def _populate(self, results: List[Dict[str, Any]]) -> None:
        """Turn discovery results (plain dicts, e.g. from the cache) into hosts, groups and hostvars."""
        inv = self.inventory
        strict = bool(self.get_option("strict"))
        want_guests = bool(self.get_option("guests"))
        for group in ("hypervisors", "guests", "unreachable"):
            inv.add_group(group)

        errors = [r for r in results if r.get("error")]
        if strict and errors:
            first = errors[0]
            raise AnsibleParserError(f"{self.NAME}: endpoint {first['endpoint']['uri']} failed: {first['error']}")

        hv_names = self._hypervisor_names(results)
        for result in results:
            label = result["endpoint"]["host"] or result["endpoint"]["uri"]
            if result.get("error"):
                inv.add_host(label, group="unreachable")
                inv.set_variable(label, "virtfleet_error", wrap_var(result["error"]))
                inv.set_variable(label, "virtfleet_endpoint", wrap_var(result["endpoint"]))
                continue
            identity = result["identity"]
            if identity["type"] == "vcenter":
                inv.add_group("vcenters")
                inv.add_host(label, group="vcenters")
                inv.set_variable(label, "ansible_host", wrap_var(result["endpoint"]["host"]))
                managed = [hv_names[(label, h["name"])] for h in result["hypervisors"]]
                vcenter = dict(identity, endpoint=result["endpoint"]["uri"], hosts=managed)
                inv.set_variable(label, "virtfleet_vcenter", wrap_var(vcenter))
            if result.get("bmc"):
                inv.add_group("bmcs")
                inv.add_host(label, group="bmcs")
                inv.set_variable(label, "ansible_host", wrap_var(result["endpoint"]["host"]))
                inv.set_variable(label, "virtfleet_bmc", wrap_var(result["bmc"]))
            for hv in result.get("hypervisors", []):
                self._add_hypervisor(hv_names[(label, hv["name"])], hv, result, strict)

        if want_guests:
            self._add_guests(results, hv_names, strict)

    def _hypervisor_names(self, results: List[Dict[str, Any]]) -> Dict[Tuple[str, str], str]:
        """(endpoint label, hypervisor name) -> inventory name; a name two endpoints share gets '@endpoint'."""
        pairs = [((r["endpoint"]["host"] or r["endpoint"]["uri"]), hv["name"])
                 for r in results if not r.get("error") for hv in r.get("hypervisors", [])]
        counts: Dict[str, int] = {}
        for _label, name in pairs:
            counts[name] = counts.get(name, 0) + 1
        names = {}
        for label, name in pairs:
            if counts[name] > 1:
                names[(label, name)] = f"{name}@{label}"
                display.warning(f"{self.NAME}: hypervisor name '{name}' is reported by several endpoints; "
                                f"named '{name}@{label}'")
            else:
                names[(label, name)] = name
        return names

    def _add_hypervisor(self, name: str, hv: Dict[str, Any], result: Dict[str, Any], strict: bool) -> None:
        inv = self.inventory
        inv.add_host(name, group="hypervisors")
        type_group = to_safe_group_name(hv["type"])
        inv.add_group(type_group)
        inv.add_child(type_group, name)
        if hv.get("cluster"):
            group = to_safe_group_name(f"cluster_{hv['cluster']}")
            inv.add_group(group)
            inv.add_child(group, name)
        facts = dict(hv, name=name)
        # A vCenter-managed host is reached by its vCenter name; a direct endpoint by its address as written.
        ansible_host = hv["name"] if hv.get("manager") and result["identity"]["type"] == "vcenter" else (
            result["endpoint"]["host"] or hv["name"])
        inv.set_variable(name, "ansible_host", wrap_var(ansible_host))
        inv.set_variable(name, "virtfleet_hypervisor", wrap_var(facts))
        self._construct(name, {"virtfleet_hypervisor": facts}, strict)

    def _add_guests(self, results: List[Dict[str, Any]], hv_names: Dict[Tuple[str, str], str], strict: bool) -> None:
        inv = self.inventory
        entries = []
        for result in results:
            if result.get("error"):
                continue
            label = result["endpoint"]["host"] or result["endpoint"]["uri"]
            for guest in result.get("guests", []):
                hypervisor = hv_names.get((label, guest.get("hypervisor") or ""), guest.get("hypervisor") or label)
                entries.append((guest, hypervisor))
        counts: Dict[str, int] = {}
        for guest, _hv in entries:
            counts[guest["name"]] = counts.get(guest["name"], 0) + 1
        taken = set(hv_names.values())
        for guest, hypervisor in entries:
            name = guest["name"]
            if counts[name] > 1 or name in taken:
                renamed = f"{name}@{hypervisor}"
                display.warning(f"{self.NAME}: guest name '{name}' is not unique; this one on '{hypervisor}' "
                                f"is named '{renamed}'")
                name = renamed
            facts = dict(guest, hypervisor=hypervisor)
            inv.add_host(name, group="guests")
            state_group = to_safe_group_name(guest["power_state"])
            inv.add_group(state_group)
            inv.add_child(state_group, name)
            holder = to_safe_group_name(f"guests_of_{hypervisor}")
            inv.add_group(holder)
            inv.add_child(holder, name)
            if guest.get("ip_addresses"):
                inv.set_variable(name, "ansible_host", wrap_var(guest["ip_addresses"][0]))
            inv.set_variable(name, "virtfleet_guest", wrap_var(facts))
            self._construct(name, {"virtfleet_guest": facts}, strict)

    def _construct(self, host: str, variables: Dict[str, Any], strict: bool) -> None:
        self._set_composite_vars(self.get_option("compose"), variables, host, strict=strict)
        self._add_host_to_composed_groups(self.get_option("groups"), variables, host, strict=strict)
        self._add_host_to_keyed_groups(self.get_option("keyed_groups"), variables, host, strict=strict)
