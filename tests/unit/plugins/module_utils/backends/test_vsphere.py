# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""VsphereBackend's bulk retrieval against a fake property collector: pages are followed, views are few."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from ansible_collections.virtfleet.core.plugins.module_utils._endpoints import (
    Credentials,
    parse_endpoint,
    with_credentials,
)
from ansible_collections.virtfleet.core.plugins.module_utils._errors import EndpointError
from ansible_collections.virtfleet.core.plugins.module_utils.backends import vsphere as backend_mod
from ansible_collections.virtfleet.core.plugins.module_utils.backends.vsphere import discovery

pytestmark = pytest.mark.skipif(not backend_mod.HAS_PYVMOMI, reason="pyvmomi not installed")


class FakeCollector:
    def __init__(self, pages: list[list[Any]]) -> None:
        self.pages = pages
        self.calls: list[str] = []

    def _page(self, i: int) -> Any:
        token = str(i + 1) if i + 1 < len(self.pages) else None
        return SimpleNamespace(objects=self.pages[i], token=token)

    def RetrievePropertiesEx(self, specs: Any, options: Any) -> Any:
        self.calls.append("RetrievePropertiesEx")
        assert options.maxObjects == backend_mod.PAGE_SIZE
        return self._page(0)

    def ContinueRetrievePropertiesEx(self, token: str) -> Any:
        self.calls.append("ContinueRetrievePropertiesEx")
        return self._page(int(token))


def vm(moid: str, name: str, host: Any) -> Any:
    from pyVmomi import vim

    props = [SimpleNamespace(name="name", val=name), SimpleNamespace(name="runtime.powerState", val="poweredOff"),
             SimpleNamespace(name="runtime.host", val=host), SimpleNamespace(name="config.template", val=False)]
    return SimpleNamespace(obj=vim.VirtualMachine(moid), propSet=props)


def test_retrieve_follows_continuation_pages_with_one_view_per_type() -> None:
    from pyVmomi import vim

    host = vim.HostSystem("host-1")
    pages = [[vm(f"vm-{p}-{i}", f"vm{p}-{i}", host) for i in range(3)] for p in range(4)]
    collector = FakeCollector(pages)
    views: list[Any] = []
    content = SimpleNamespace(
        rootFolder=vim.Folder("group-d1"), propertyCollector=collector,
        viewManager=SimpleNamespace(CreateContainerView=lambda root, types, rec: views.append(types)
                                    or vim.view.ContainerView(f"view-{len(views)}")),
    )
    backend = backend_mod.VsphereBackend(parse_endpoint("vsphere://esx01"), 5)
    objs = list(backend._conn.retrieve(content, [([vim.VirtualMachine], [(vim.VirtualMachine, ["name"])]),
                                                 ([vim.HostSystem], [(vim.HostSystem, ["name"])])]))
    assert len(objs) == 12
    assert collector.calls == ["RetrievePropertiesEx"] + ["ContinueRetrievePropertiesEx"] * 3
    assert views == [[vim.VirtualMachine], [vim.HostSystem]]
    assert backend.calls == 2 + 4  # two views, four pages: nothing per object


def test_login_without_credentials_is_a_clear_error() -> None:
    backend = backend_mod.VsphereBackend(with_credentials(parse_endpoint("vsphere://esx01"), Credentials()), 5)
    backend._conn.content = SimpleNamespace()
    with pytest.raises(EndpointError, match="esx01: no credentials"):
        backend._login()


@pytest.mark.parametrize("fault", ["pyvmomi", "soap"])
def test_invalid_login_names_the_user_not_the_password(fault: str) -> None:
    from pyVmomi import vim

    from ansible_collections.virtfleet.core.plugins.module_utils.backends import _vsphere_raw

    ep = with_credentials(parse_endpoint("vsphere://esx01"), Credentials("root", "hunter2-x", True))
    backend = backend_mod.VsphereBackend(ep, 5)
    exc = vim.fault.InvalidLogin() if fault == "pyvmomi" else _vsphere_raw.SoapFault(
        "InvalidLogin", "Cannot complete login due to an incorrect user name or password.")
    err = backend._fail(exc)
    assert str(err) == "esx01: login refused for user 'root' (wrong user name or password)"
    assert "hunter2" not in str(err)


def test_discovery_without_credentials_fails_before_any_login(monkeypatch: pytest.MonkeyPatch) -> None:
    from ansible_collections.virtfleet.core.plugins.module_utils.backends import _vsphere_raw

    calls: list[str] = []
    monkeypatch.setattr(_vsphere_raw.Session, "call", lambda self, method, this, args="": calls.append(method))
    backend = backend_mod.VsphereBackend(with_credentials(parse_endpoint("vsphere://esx01"), Credentials()), 5)
    backend._soap.opened = (_vsphere_raw.Session("esx01", 443, backend._ssl_context(), 5, lambda: None),
                            SimpleNamespace(session_manager="ha-sessionmgr"))  # type: ignore[assignment]
    with pytest.raises(EndpointError, match="esx01: no credentials"):
        backend._soap.login()
    assert calls == []


def test_tls_contexts_are_shared_and_verify_unless_told_not_to() -> None:
    import ssl

    secure = backend_mod.VsphereBackend(parse_endpoint("vsphere://esx01"), 5)._ssl_context()
    assert secure.verify_mode == ssl.CERT_REQUIRED and secure.check_hostname
    lab = with_credentials(parse_endpoint("vsphere://esx02"), Credentials("root", "x", False))
    insecure = backend_mod.VsphereBackend(lab, 5)._ssl_context()
    assert insecure.verify_mode == ssl.CERT_NONE
    assert backend_mod.VsphereBackend(parse_endpoint("vsphere://esx03"), 5)._ssl_context() is secure


@pytest.mark.parametrize(("count", "parts"), [(0, 0), (1, 1), (249, 1), (500, 2), (999, 3), (1680, 4), (10000, 4)])
def test_vm_read_is_split_into_concurrent_parts_that_cover_every_vm_once(
        count: int, parts: int, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def chunk(session: Any, content: Any, vm_ids: list[str], props: list[str], networks: Any,
              details: bool) -> Any:
        seen.append(vm_ids)
        return [SimpleNamespace(moid=m) for m in vm_ids]

    monkeypatch.setattr(discovery, "guest_chunk", chunk)
    ids = [f"vm-{i}" for i in range(count)]
    guests = discovery.read_vms(None, None, ids, ["name"], {}, True,  # type: ignore[arg-type]
                                backend_mod.VM_CHUNKS, backend_mod.VM_CHUNK_MIN)
    assert len(seen) == parts
    assert sorted(g.moid for g in guests) == sorted(ids)
    assert sorted(m for part in seen for m in part) == sorted(ids)
    if parts > 1:
        assert max(map(len, seen)) - min(map(len, seen)) <= 1


def test_a_failing_part_fails_the_whole_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def chunk(session: Any, content: Any, vm_ids: list[str], props: list[str], networks: Any,
              details: bool) -> Any:
        if "vm-1" in vm_ids:
            raise OSError("connection reset")
        return [SimpleNamespace(moid=m) for m in vm_ids]

    monkeypatch.setattr(discovery, "guest_chunk", chunk)
    with pytest.raises(OSError, match="connection reset"):
        discovery.read_vms(None, None, [f"vm-{i}" for i in range(1000)], ["name"], {}, True,  # type: ignore[arg-type]
                           backend_mod.VM_CHUNKS, backend_mod.VM_CHUNK_MIN)
