# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""The inventory plugin's security properties: no hijacked host, valid group names, no secret in an error,
bounded options, and names that are never templated - through the real _populate and Ansible's Templar."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import test_hypervisors
from ansible.errors import AnsibleParserError
from test_hypervisors import esx, members, run

from ansible_collections.virtfleet.core.plugins.module_utils._model import GuestFacts, HypervisorFacts, Identity

fake = test_hypervisors.fake  # the fixture: a fake backend behind discover_all

GROUP_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def result(host: str, kind: str = "esxi", hvs: list[str] | None = None, guests: list[tuple[str, str, str]] = (),
           error: str | None = None, bmc: bool = False, api: str = "vsphere") -> dict[str, Any]:
    """A discovery result as _discovery produces it (and the cache holds it). GUESTS: (name, hypervisor, uuid)."""
    endpoint = {"api": api, "uri": f"{api}://{host}", "host": host, "port": 443}
    if error:
        return {"endpoint": endpoint, "error": error, "calls": 0, "seconds": 0.0}
    hypervisors = [HypervisorFacts(name=n, type="esxi", api=api, endpoint=endpoint["uri"],
                                   manager=host if kind == "vcenter" else None).to_dict() for n in (hvs or [])]
    guest_dicts = []
    for name, hv, uuid in guests:
        data = GuestFacts(name=name, uuid=uuid, power_state="running", ip_addresses=[f"192.0.2.{len(guest_dicts)}"]
                          ).to_dict()
        data["hypervisor"] = hv
        guest_dicts.append(data)
    return {"endpoint": endpoint, "error": None, "identity": Identity(api=api, type=kind).to_dict(),
            "hypervisors": hypervisors, "guests": guest_dicts, "bmc": {"systems": []} if bmc else None,
            "calls": 1, "seconds": 0.1}


def populate(plugin: Any, results: list[dict[str, Any]], **options: Any) -> tuple[Any, list[str]]:
    import ansible_collections.virtfleet.core.plugins.inventory.hypervisors as mod

    warnings: list[str] = []
    real = mod.display.warning
    mod.display.warning = lambda msg, *a, **k: warnings.append(msg)  # type: ignore[method-assign]
    try:
        plugin.set_options(direct=dict({"plugin": "virtfleet.core.hypervisors", "guests": True}, **options))
        plugin._populate(results)
    finally:
        mod.display.warning = real  # type: ignore[method-assign]
    return plugin.inventory, warnings


def parse_file(plugin: Any, tmp_path: Path, config: dict[str, Any]) -> Any:
    """Parse a real configuration file the way ansible-inventory does (its loader marks the file trusted)."""
    import yaml

    path = tmp_path / "sec.hypervisors.yml"
    path.write_text(yaml.safe_dump(dict({"plugin": "virtfleet.core.hypervisors", "username": "u",
                                         "password": "s3cret"}, **config)))
    plugin.parse(plugin.inventory, plugin.loader, str(path), cache=False)
    return plugin.inventory


def trusted(value: Any) -> Any:
    """Configuration as read from an inventory file: its strings are trusted templates."""
    from ansible.template import trust_as_template

    if isinstance(value, dict):
        return {k: trusted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [trusted(v) for v in value]
    return trust_as_template(value) if isinstance(value, str) else value


def ansible_host(inv: Any, name: str) -> Any:
    return inv.get_host(name).vars.get("ansible_host")


# ------------------------------------------------------------------------------------------------ defect 10
def test_a_guest_never_takes_over_an_endpoint_localhost_or_another_sources_host(inventory_plugin: Any) -> None:
    inv = inventory_plugin.inventory
    inv.add_host("web01")  # another inventory source's host
    inv.set_variable("web01", "ansible_host", "10.9.9.9")
    taken = ["vc01", "bmc01", "down01", "localhost", "127.0.0.1", "web01", "esx01"]
    results = [
        result("vc01", "vcenter", hvs=["esx01"], guests=[(n, "esx01", f"u-{n}") for n in taken]),
        result("bmc01", "bmc", bmc=True, api="redfish"),
        result("down01", error="connection refused on port 443"),
    ]
    inv, warnings = populate(inventory_plugin, results)
    # The objects that were there keep their host and address; each guest has a host of its own.
    assert ansible_host(inv, "web01") == "10.9.9.9"
    assert ansible_host(inv, "vc01") == "vc01" and "virtfleet_guest" not in inv.get_host("vc01").vars
    assert ansible_host(inv, "bmc01") == "bmc01" and "virtfleet_guest" not in inv.get_host("bmc01").vars
    assert inv.get_host("down01").vars["virtfleet_error"].startswith("connection refused")
    assert "virtfleet_guest" not in inv.get_host("down01").vars
    assert "localhost" not in inv.hosts and "127.0.0.1" not in inv.hosts and inv.localhost is None
    assert "virtfleet_hypervisor" in inv.get_host("esx01").vars
    assert "virtfleet_guest" not in inv.get_host("esx01").vars
    assert members(inv, "guests") == {f"{n}@esx01" for n in taken}
    for i, name in enumerate(taken):
        assert inv.get_host(f"{name}@esx01").vars["virtfleet_guest"]["name"] == name
        assert ansible_host(inv, f"{name}@esx01") == f"192.0.2.{i}"
    assert len([w for w in warnings if "is taken or not unique" in w]) == len(taken)


def test_two_same_named_guests_on_one_hypervisor_both_stay(inventory_plugin: Any) -> None:
    results = [result("esx01", hvs=["esx01"], guests=[("dup", "esx01", "uuid-a"), ("dup", "esx01", "uuid-b"),
                                                      ("solo", "esx01", "uuid-c")])]
    inv, warnings = populate(inventory_plugin, results)
    assert members(inv, "guests") == {"dup@esx01#uuid-a", "dup@esx01#uuid-b", "solo"}
    assert {inv.get_host(h).vars["virtfleet_guest"]["uuid"] for h in members(inv, "guests")} == {
        "uuid-a", "uuid-b", "uuid-c"}
    assert len(warnings) == 2


def test_names_do_not_depend_on_the_order_of_discovery(inventory_plugin: Any) -> None:
    guests = [("dup", "esx01", "uuid-a"), ("dup", "esx01", "uuid-b"), ("web", "esx01", "uuid-c")]
    first, _w = populate(inventory_plugin, [result("esx01", hvs=["esx01"], guests=guests)])
    names = {h: first.get_host(h).vars["virtfleet_guest"]["uuid"] for h in members(first, "guests")}
    from ansible.inventory.data import InventoryData

    inventory_plugin.inventory = InventoryData()
    second, _w = populate(inventory_plugin, [result("esx01", hvs=["esx01"], guests=guests[::-1])])
    assert {h: second.get_host(h).vars["virtfleet_guest"]["uuid"] for h in members(second, "guests")} == names


@pytest.mark.parametrize("name", ["running", "guests", "hypervisors", "guests_of_esx01", "esxi", "all", "ungrouped"])
def test_a_guest_named_like_a_group_stays_a_host_and_groups_stay_right(inventory_plugin: Any, name: str) -> None:
    results = [result("esx01", hvs=["esx01"], guests=[(name, "esx01", "u-1"), ("web", "esx01", "u-2")])]
    inv, warnings = populate(inventory_plugin, results)
    renamed = f"{name}@esx01"
    assert inv.get_host(renamed).vars["virtfleet_guest"]["name"] == name
    assert members(inv, "guests") == {renamed, "web"}
    assert members(inv, "running") == {renamed, "web"}
    assert members(inv, "hypervisors") == {"esx01"}
    assert members(inv, "guests_of_esx01") == {renamed, "web"}
    assert name not in inv.hosts
    for group in inv.groups.values():  # no group became a child of another because of a guest's name
        assert not any(child.name == name for child in group.child_groups) or name == "ungrouped" or (
            group.name == "all")
    assert any(renamed in w for w in warnings)


def test_group_names_are_letters_digits_and_underscores(inventory_plugin: Any) -> None:
    results = [result("vc-01.example.com", "vcenter", hvs=["esx-01.example.com", "10.0.0.7"],
                      guests=[("web-01", "esx-01.example.com", "u1"), ("db 02", "10.0.0.7", "u2")])]
    results[0]["hypervisors"][0]["cluster"] = "Prod Cluster/1"
    results[0]["guests"][0]["tags"] = {"role": "front-end.v2"}
    inv, warnings = populate(inventory_plugin, results, **trusted({
        "keyed_groups": [{"key": "virtfleet_guest.tags.role | default(omit)", "prefix": "role"},
                         {"key": "virtfleet_guest.name", "prefix": "", "separator": ""}],
        "groups": {"web-servers": "'web' in (virtfleet_guest.name | default(''))"}}))
    bad = [g for g in inv.groups if not GROUP_NAME.match(g)]
    assert bad == []
    assert {"guests_of_esx_01_example_com", "guests_of_10_0_0_7", "cluster_Prod_Cluster_1", "role_front_end_v2",
            "web_servers", "web_01", "db_02"} <= set(inv.groups)
    assert members(inv, "guests_of_esx_01_example_com") == {"web-01"}
    assert not any("Invalid characters" in w for w in warnings)


# ------------------------------------------------------------------------------------------------ defect 7
@pytest.mark.parametrize("control", [False, True], ids=["plugin", "control-trusted"])
def test_templated_names_are_never_evaluated_through_compose_groups_and_keyed_groups(
        inventory_plugin: Any, fake: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, control: bool) -> None:
    """A guest and a hypervisor named as templates go through compose, groups and keyed_groups, and then are
    templated the way a play reads them: the literal names survive and the lookup never runs. The control
    (the same data marked trusted) shows that this harness does see templating when it happens."""
    from ansible.template import Templar, trust_as_template

    import ansible_collections.virtfleet.core.plugins.inventory.hypervisors as mod

    marker = tmp_path / "pwned"
    lookup = f"{{{{ lookup('pipe', 'touch {marker}') }}}}"
    maths = "{{ 7919*7 }}"
    hosts, vms = esx("esx01", [lookup, maths])
    hosts[0].name = "hv-{{ 6131*7 }}"
    fake.table = {"esx01": (hosts, vms)}
    if control:  # what a plugin that marked remote data as trusted templates would hand out
        monkeypatch.setattr(mod, "wrap_var", trusted)
    config = {
        "endpoints": ["vsphere://esx01"], "guests": True,
        "compose": {"vf_name": "virtfleet_guest.name", "vf_hv": "virtfleet_hypervisor.name",
                    "vf_label": "'x-' + virtfleet_guest.name"},
        "groups": {"has_braces": "'{' in virtfleet_guest.name"},
        "keyed_groups": [{"key": "virtfleet_guest.name", "prefix": "n"}],
    }
    try:
        inv = parse_file(inventory_plugin, tmp_path, config)
    except AnsibleParserError as exc:  # keyed_groups got the int 55433: only possible when the name was templated
        assert control, exc
        assert "Int" in str(exc)
        return
    rendered = []
    for host in inv.hosts.values():
        variables = host.get_vars()
        templar = Templar(loader=inventory_plugin.loader, variables=variables)
        for var in ("vf_name", "vf_label", "vf_hv"):
            if var in variables:
                rendered.append(str(templar.template(trust_as_template(f"{{{{ {var} }}}}"))))
        if "virtfleet_guest" in variables:
            rendered.append(str(templar.template(trust_as_template("{{ virtfleet_guest.name }}"))))
    text = " ".join(rendered) + " ".join(inv.groups)
    if control:
        assert "55433" in text or marker.exists()
        return
    assert not marker.exists()
    # Values no path or id holds by chance (a tmp dir may be pytest-42).
    assert "55433" not in text and "42917" not in text
    assert rendered.count(maths) == 2 and rendered.count(lookup) == 2 and f"x-{maths}" in rendered
    assert "hv-{{ 6131*7 }}" in rendered
    assert members(inv, "has_braces") == {lookup, maths}


# ------------------------------------------------------------------------------------------------ defect 9
@pytest.mark.parametrize(("config", "secret"), [
    ({"vcenter_password": "Hunter2-secret"}, "Hunter2-secret"),
    ({"endpoints": [{"uri": "vsphere://vc01", "password": "Hunter2-secret"}]}, "Hunter2-secret"),
    ({"endpoints": ["vsphere://vc01"],
      "credentials": [{"match": "vc01", "username": "u", "pasword": "Hunter2-secret"}]}, "Hunter2-secret"),
    ({"endpoints": ["vsphere://vc01"], "credentials": [{"match": "vc01", "api_token": "Hunter2-secret"}]},
     "Hunter2-secret"),
    ({"endpoints": ["vsphere://root:Hunter2-secret@vc01"]}, "Hunter2-secret"),
    ({"endpoints": ["redfish://admin:Hunter2-secret@bmc01"]}, "Hunter2-secret"),
    ({"endpoints": ["qemu+ssh://root:Hunter2-secret@kvm01/system"]}, "Hunter2-secret"),
])
def test_no_secret_in_a_configuration_error(inventory_plugin: Any, fake: Any, config: dict[str, Any],
                                            secret: str) -> None:
    config = dict({"endpoints": ["vsphere://vc01"]}, **config)
    with pytest.raises(AnsibleParserError) as err:
        run(inventory_plugin, config)
    assert secret not in str(err.value)
    assert "\n" not in str(err.value)
    assert fake.contacted == []


# ------------------------------------------------------------------------------------------------ defect 11
@pytest.mark.parametrize(("option", "value", "message"), [
    ("max_workers", 0, "max_workers=0: must be greater than 0 and at most 256"),
    ("max_workers", -3, "max_workers=-3: must be greater than 0"),
    ("max_workers", 100000, "max_workers=100000: must be greater than 0 and at most 256"),
    ("timeout", float("nan"), "timeout=nan: must be greater than 0"),
    ("timeout", float("inf"), "timeout=inf: must be greater than 0"),
    ("timeout", 1e9, "at most 3600"),
])
def test_bounds_of_workers_and_timeout(inventory_plugin: Any, fake: Any, option: str, value: Any,
                                       message: str) -> None:
    with pytest.raises(AnsibleParserError, match=re.escape(message)):
        run(inventory_plugin, {"endpoints": ["vsphere://esx01"], option: value})
    assert fake.contacted == []


@pytest.mark.parametrize(("uri", "message"), [
    ("qemu+ext:///system?command=/tmp/x", "the parameter command= makes libvirt run a program"),
    ("qemu+ssh://kvm01/system?netcat=rm%20-rf%20/", "the parameter netcat= makes libvirt run a program"),
    ("qemu+ext:///system", "the ext transport makes libvirt run a program"),
    ("qemu+tls://kvm01/system?no_verify=1", "no_verify turns off TLS certificate checks while validate_certs is true"),
])
def test_libvirt_uris_that_run_programs_or_skip_tls_checks_are_refused(inventory_plugin: Any, fake: Any,
                                                                       uri: str, message: str) -> None:
    with pytest.raises(AnsibleParserError, match=re.escape(message)):
        run(inventory_plugin, {"endpoints": [uri]})
    assert fake.contacted == []


def test_uri_commands_and_no_verify_pass_when_the_user_says_so(inventory_plugin: Any, fake: Any) -> None:
    fake.table = {"kvm01": esx("kvm01", [])}
    run(inventory_plugin, {"endpoints": ["qemu+ssh://kvm01/system?netcat=/usr/bin/nc"], "allow_uri_commands": True})
    run(inventory_plugin, {"endpoints": ["qemu+tls://kvm01/system?no_verify=1"],
                           "credentials": [{"match": "kvm01", "validate_certs": False}]})
    assert fake.contacted == ["qemu+ssh://kvm01/system?netcat=/usr/bin/nc", "qemu+tls://kvm01/system?no_verify=1"]


def test_ca_path_reaches_every_endpoints_credentials(inventory_plugin: Any, fake: Any, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    import ansible_collections.virtfleet.core.plugins.inventory.hypervisors as mod

    def discover_all(endpoints: Any, *args: Any, **kwargs: Any) -> list[Any]:
        seen.update({e.host: e.credentials.ca_path for e in endpoints})
        return []

    monkeypatch.setattr(mod, "discover_all", discover_all)
    ca, other = tmp_path / "ca.pem", tmp_path / "other.pem"
    ca.write_text("x")
    other.write_text("y")
    run(inventory_plugin, {"endpoints": ["vsphere://esx01", "vsphere://esx02"], "ca_path": str(ca),
                           "credentials": [{"match": "esx02", "ca_path": str(other)}]})
    assert seen == {"esx01": str(ca), "esx02": str(other)}
    with pytest.raises(AnsibleParserError, match=r"ca_path='/nonexistent/ca.pem': not a CA certificate file"):
        run(inventory_plugin, {"endpoints": ["vsphere://esx01"], "ca_path": "/nonexistent/ca.pem"})
