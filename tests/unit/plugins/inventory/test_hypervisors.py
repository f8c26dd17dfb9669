# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""The inventory plugin with a fake backend: config validation before contact, naming, groups, safety."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from ansible.errors import AnsibleParserError

from ansible_collections.virtfleet.core.plugins.module_utils import _discovery
from ansible_collections.virtfleet.core.plugins.module_utils._endpoints import Endpoint
from ansible_collections.virtfleet.core.plugins.module_utils._errors import EndpointError
from ansible_collections.virtfleet.core.plugins.module_utils._model import (
    Discovery,
    GuestFacts,
    HypervisorFacts,
    Identity,
    count_guests,
)
from ansible_collections.virtfleet.core.plugins.module_utils.backends.base import HypervisorBackend


class FakeBackend(HypervisorBackend):
    """Answers from a table keyed by endpoint host; records what was contacted."""

    contacted: ClassVar[list[str]] = []
    table: ClassVar[dict[str, Any]] = {}

    def identify(self) -> Identity:
        return self.discover(False).identity

    def discover(self, guests: bool = True) -> Discovery:
        FakeBackend.contacted.append(self.endpoint.uri)
        self.calls += 1
        answer = self.table[self.endpoint.host]
        if isinstance(answer, Exception):
            raise answer
        hosts, vms = answer
        count_guests(hosts, vms)
        return Discovery(identity=Identity(api="vsphere", type="esxi"), hypervisors=hosts,
                         guests=vms if guests else [])


def esx(host: str, vms: list[str], states: list[str] | None = None) -> tuple[list[HypervisorFacts], list[GuestFacts]]:
    hv = HypervisorFacts(name=host, type="esxi", api="vsphere", endpoint=f"vsphere://{host}", key="ha-host")
    guests = [GuestFacts(name=n, uuid=f"uuid-{host}-{n}", power_state=(states or ["running"] * len(vms))[i],
                         host_key="ha-host") for i, n in enumerate(vms)]
    return [hv], guests


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> type[FakeBackend]:
    FakeBackend.contacted = []
    FakeBackend.table = {}
    real = _discovery.discover_all

    def discover_all(endpoints: Any, guests: bool, timeout: float, workers: int, progress: Any = None,
                     factory: Any = None) -> Any:
        return real(endpoints, guests, timeout, workers, progress or (lambda _m: None), FakeBackend)

    import ansible_collections.virtfleet.core.plugins.inventory.hypervisors as mod
    monkeypatch.setattr(mod, "discover_all", discover_all)
    monkeypatch.setattr(mod, "probe", lambda *a, **k: pytest.fail("probe must not run"))
    return FakeBackend


def run(plugin: Any, config: dict[str, Any]) -> Any:
    config = dict({"plugin": "virtfleet.core.hypervisors", "username": "u", "password": "s3cret"}, **config)
    plugin._read_config_data = lambda _path: (plugin.set_options(direct=config), config)[1]
    plugin._cache = {}
    plugin.parse(plugin.inventory, plugin.loader, "/x/fake.hypervisors.yml", cache=False)
    return plugin.inventory


def members(inv: Any, group: str) -> set[str]:
    return {h.name for h in inv.groups[group].get_hosts()} if group in inv.groups else set()


def test_guests_with_the_same_name_get_hypervisor_suffix(inventory_plugin: Any, fake: Any) -> None:
    fake.table = {"esx01": esx("esx01", ["web", "db"]), "esx02": esx("esx02", ["web", "cache"], ["stopped"] * 2)}
    inv = run(inventory_plugin, {"endpoints": ["vsphere://esx01", "vsphere://esx02"], "guests": True})
    assert members(inv, "guests") == {"web@esx01", "web@esx02", "db", "cache"}
    assert members(inv, "running") == {"web@esx01", "db"}
    assert members(inv, "stopped") == {"web@esx02", "cache"}
    assert members(inv, "guests_of_esx02") == {"web@esx02", "cache"}
    assert members(inv, "esxi") == {"esx01", "esx02"}
    assert inv.get_host("web@esx02").vars["virtfleet_guest"]["hypervisor"] == "esx02"
    assert inv.get_host("esx01").vars["virtfleet_hypervisor"]["guests"] == {"total": 2, "running": 2, "stopped": 0}


def test_unreachable_is_isolated_and_strict_fails(inventory_plugin: Any, fake: Any) -> None:
    fake.table = {"esx01": esx("esx01", []), "down": EndpointError("down", "connection refused on port 443")}
    inv = run(inventory_plugin, {"endpoints": ["vsphere://esx01", "vsphere://down"]})
    assert members(inv, "unreachable") == {"down"}
    assert inv.get_host("down").vars["virtfleet_error"] == "connection refused on port 443"
    assert "esx01" in members(inv, "hypervisors")
    with pytest.raises(AnsibleParserError, match=r"vsphere://down failed: connection refused"):
        run(inventory_plugin, {"endpoints": ["vsphere://esx01", "vsphere://down"], "strict": True})


def test_hypervisor_strings_are_unsafe(inventory_plugin: Any, fake: Any) -> None:
    from ansible.utils.unsafe_proxy import wrap_var

    hosts, vms = esx("esx01", ["{{ lookup('pipe', 'id') }}"])
    fake.table = {"esx01": (hosts, vms)}
    inv = run(inventory_plugin, {"endpoints": ["vsphere://esx01"], "guests": True})
    name = "{{ lookup('pipe', 'id') }}"
    value = inv.get_host(name).vars["virtfleet_guest"]["name"]
    assert value == name
    assert type(value) is type(wrap_var(name))  # the unsafe/untrusted string type of this ansible-core


def test_no_secret_reaches_hostvars_or_results(inventory_plugin: Any, fake: Any) -> None:
    fake.table = {"esx01": EndpointError("esx01", "login refused for user 'u' (wrong user name or password)")}
    inv = run(inventory_plugin, {"endpoints": ["vsphere://esx01"]})
    assert "s3cret" not in repr(inv.get_host("esx01").vars)


@pytest.mark.parametrize(("config", "message"), [
    ({"endpoints": ["esx01.example.com"]}, "endpoints[0].uri='esx01.example.com': no scheme"),
    ({"endpoints": [{"probe": "192.0.2.0/33"}]}, "endpoints[0].probe='192.0.2.0/33': not an IP address or CIDR"),
    ({"endpoints": [{"probe": "10.0.0.0/16"}]}, "endpoints[0].probe='10.0.0.0/16': 65536 addresses"),
    ({"endpoints": [{"uri": "qemu:///system", "probe": "10.0.0.1"}]}, "give exactly one of uri or probe"),
    ({"endpoints": [{"url": "qemu:///system"}]}, "endpoints[0].url='<not shown>': unknown key"),
    ({"endpoints": ["vsphere://kvm01"], "credentials": [{"match": "esx*", "username": "u", "password": "p"}]},
     "credentials[0].match='esx*': matches no endpoint"),
    ({"endpoints": ["qemu:///system"], "timeout": 0}, "timeout=0.0: must be greater than 0 and at most 3600"),
    ({"endpoints": []}, "endpoints=[]: empty"),
    ({"endpoints": ["qemu:///system"], "gusts": True}, "gusts='<not shown>': unknown option"),
])
def test_bad_input_is_one_line_and_nothing_is_contacted(inventory_plugin: Any, fake: Any,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        config: dict[str, Any], message: str) -> None:
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)
    with pytest.raises(AnsibleParserError) as err:
        run(inventory_plugin, config)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert fake.contacted == []


def test_libvirt_default_uri_fills_an_empty_endpoint_list(inventory_plugin: Any, fake: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "qemu+ssh://kvm07/system")
    fake.table = {"kvm07": esx("kvm07", [])}
    inv = run(inventory_plugin, {})
    assert fake.contacted == ["qemu+ssh://kvm07/system"]
    assert "kvm07" in members(inv, "hypervisors")


def test_discover_all_runs_endpoints_in_parallel_and_keeps_order() -> None:
    """All eight discoveries must be in flight at once to pass the barrier; results keep the input order."""
    import threading

    barrier = threading.Barrier(8, timeout=10)

    class Parallel(HypervisorBackend):
        def identify(self) -> Identity:
            raise NotImplementedError

        def discover(self, guests: bool = True) -> Discovery:
            barrier.wait()
            return Discovery(identity=Identity(api="libvirt", type="kvm"),
                             hypervisors=[HypervisorFacts(name=self.endpoint.host or "", type="kvm", api="libvirt",
                                                          endpoint=self.endpoint.uri)])

    endpoints = [Endpoint(api="libvirt", uri=f"qemu+ssh://h{i}/system", host=f"h{i}") for i in range(8)]
    results = _discovery.discover_all(endpoints, False, 5, 8, factory=Parallel)
    assert [r["error"] for r in results] == [None] * 8
    assert [r["hypervisors"][0]["name"] for r in results] == [f"h{i}" for i in range(8)]


VERSIONS = [("2.17.14", False), ("2.18.0", False), ("2.19.0", True), ("2.20.1", True), ("3.0.0", True),
            ("devel", False)]


@pytest.mark.parametrize(("version", "untrusted"), VERSIONS)
def test_wrap_var_is_only_skipped_where_ansible_does_not_trust_plugin_data(version: str, untrusted: bool) -> None:
    from ansible_collections.virtfleet.core.plugins.inventory import hypervisors

    assert hypervisors._untrusted_by_default(version) is untrusted


def test_a_templated_uri_takes_the_credential_variable_and_refuses_an_empty_one(
        inventory_plugin: Any, fake: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An endpoint uri may be a template (an AWX credential's variable); one that renders empty, its credential
    not attached, is one line naming the endpoint, and nothing is contacted."""
    from ansible.template import trust_as_template

    uri = trust_as_template("{{ lookup('ansible.builtin.env', 'VF_TEST_URI') }}")
    monkeypatch.setenv("VF_TEST_URI", "vsphere://esx09")
    fake.table = {"esx09": esx("esx09", [])}
    assert "esx09" in members(run(inventory_plugin, {"endpoints": [uri]}), "hypervisors")
    assert fake.contacted == ["vsphere://esx09"]
    fake.contacted = []
    monkeypatch.delenv("VF_TEST_URI")
    with pytest.raises(AnsibleParserError) as err:
        run(inventory_plugin, {"endpoints": [uri]})
    assert "endpoints[0].uri=" in str(err.value) and "the template gives an empty URI" in str(err.value)
    assert "\n" not in str(err.value) and fake.contacted == []
