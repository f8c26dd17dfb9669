# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""Endpoint, probe-range and credential parsing: every bad input is one line naming option and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from ansible_collections.virtfleet.core.plugins.module_utils._argspec import connection_secrets
from ansible_collections.virtfleet.core.plugins.module_utils._endpoints import (
    MAX_PROBE_ADDRESSES,
    Credentials,
    check_rules_match,
    credentials_for,
    env_credentials,
    parse_credential_rules,
    parse_endpoint,
    probe_addresses,
    probe_ports,
    with_current_credential_files,
)
from ansible_collections.virtfleet.core.plugins.module_utils._errors import ConfigError


@pytest.mark.parametrize(("uri", "api", "host", "port"), [
    ("vsphere://esx01.example.com", "vsphere", "esx01.example.com", 443),
    ("vsphere://10.0.0.1:8443", "vsphere", "10.0.0.1", 8443),
    ("qemu:///system", "libvirt", None, None),
    ("qemu+ssh://root@kvm01/system", "libvirt", "kvm01", None),
    ("qemu+tcp://127.0.10.30/system", "libvirt", "127.0.10.30", None),
    ("test:///default", "libvirt", None, None),
    ("redfish://bmc01", "redfish", "bmc01", 443),
    ("redfish+http://127.0.0.1:8000", "redfish", "127.0.0.1", 8000),
])
def test_parse_endpoint(uri: str, api: str, host: str | None, port: int | None) -> None:
    ep = parse_endpoint(uri)
    assert (ep.api, ep.host, ep.port, ep.uri) == (api, host, port, uri)


@pytest.mark.parametrize(("uri", "fragment"), [
    ("esx01.example.com", "no scheme"),
    ("ftp://x", "unknown scheme 'ftp'"),
    ("vsphere://", "no host"),
    ("vsphere://esx:99999", "port"),
    ("vsphere://esx/sdk", "no path"),
    ("", "expected a URI"),
])
def test_bad_endpoint_is_one_line_naming_option_and_value(uri: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_endpoint(uri, "endpoints[3].uri")
    text = str(err.value)
    assert text.startswith(f"endpoints[3].uri={uri!r}: ")
    assert fragment in text and "\n" not in text


def test_probe_range_expansion_and_cap() -> None:
    assert probe_addresses("127.0.10.0/30") == ["127.0.10.1", "127.0.10.2"]
    assert probe_addresses("127.0.10.7") == ["127.0.10.7"]
    assert len(probe_addresses("127.0.0.0/20")) == MAX_PROBE_ADDRESSES - 2
    with pytest.raises(ConfigError, match=r"probe='10.0.0.0/19': 8192 addresses; at most 4096"):
        probe_addresses("10.0.0.0/19")
    with pytest.raises(ConfigError, match=r"probe='192.0.2.0/33': not an IP address or CIDR"):
        probe_addresses("192.0.2.0/33")


def test_probe_ports() -> None:
    assert probe_ports(None) == [443, 16509, 16514]
    assert probe_ports(["443", 8000]) == [443, 8000]
    with pytest.raises(ConfigError, match="70000 is not a port"):
        probe_ports([443, 70000])
    with pytest.raises(ConfigError, match="non-empty list"):
        probe_ports([])


def test_credentials_first_glob_wins_and_env_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMWARE_USER", "envuser")
    monkeypatch.setenv("VMWARE_PASSWORD", "envpass")
    monkeypatch.setenv("VMWARE_VALIDATE_CERTS", "false")
    rules = parse_credential_rules([
        {"match": "esx*.example.com", "username": "root", "password": "a"},
        {"match": "*", "username": "other", "password": "b", "validate_certs": True},
    ], default=Credentials(validate_certs=True))
    assert credentials_for("ESX01.example.com", rules, Credentials()).username == "root"
    assert credentials_for("vc.example.com", rules, Credentials()).username == "other"
    default = env_credentials()
    assert (default.username, default.password, default.validate_certs) == ("envuser", "envpass", False)
    assert "envpass" not in repr(default)


def test_password_from_a_file_when_the_environment_has_none(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    """VIRTFLEET_PASSWORD_FILE (an AWX credential's file injector): its first line, after VMWARE_PASSWORD and
    a given password; an unreadable or empty file is one line naming the variable and the path, no content."""
    secret = tmp_path / "password"
    secret.write_text("s3cret-from-file\nignored\n")
    monkeypatch.delenv("VMWARE_PASSWORD", raising=False)
    monkeypatch.setenv("VIRTFLEET_PASSWORD_FILE", str(secret))
    assert env_credentials().password == "s3cret-from-file"
    assert env_credentials(password="given").password == "given"
    monkeypatch.setenv("VMWARE_PASSWORD", "from-env")
    assert env_credentials().password == "from-env"
    monkeypatch.delenv("VMWARE_PASSWORD")
    monkeypatch.setenv("VIRTFLEET_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"^VIRTFLEET_PASSWORD_FILE=.*: cannot be read \(FileNotFoundError\)$"):
        env_credentials()
    (tmp_path / "empty").write_text("\n")
    monkeypatch.setenv("VIRTFLEET_PASSWORD_FILE", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="is empty"):
        env_credentials()


def test_credentials_errors() -> None:
    with pytest.raises(ConfigError, match=r"credentials\[0\].match"):
        parse_credential_rules([{"username": "x"}])
    with pytest.raises(ConfigError, match=r"credentials\[0\].token"):
        parse_credential_rules([{"match": "*", "token": "x"}])
    rules = parse_credential_rules([{"match": "esx*.example.com", "username": "u", "password": "p"}])
    with pytest.raises(ConfigError, match=r"credentials\[0\].match='esx\*.example.com': matches no endpoint"):
        check_rules_match(rules, ["kvm01.example.com"], has_probes=False)
    check_rules_match(rules, ["kvm01.example.com"], has_probes=True)  # a probe may still find a match


def test_gone_credential_files_are_taken_from_this_jobs_uri(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An AWX inventory stored by its update job names that job's key files, gone by the time a later job
    reads it: the later job's own URI for the same endpoint is used; any other URI is left as it is."""
    key = tmp_path / "key"
    key.write_text("k")
    stored = "qemu+libssh://root@kvm01.example.com:2222/system?keyfile=/gone/key&known_hosts=/gone/kh"
    current = f"qemu+libssh://root@kvm01.example.com:2222/system?keyfile={key}&known_hosts={key}"
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)
    monkeypatch.setenv("VIRTFLEET_LIBVIRT_URI", current)
    assert with_current_credential_files(stored) == current
    assert with_current_credential_files(current) == current  # files there: as given
    other = stored.replace("kvm01", "kvm02")
    assert with_current_credential_files(other) == other  # another endpoint: never another's credential
    assert with_current_credential_files("qemu:///system") == "qemu:///system"
    monkeypatch.delenv("VIRTFLEET_LIBVIRT_URI")
    assert with_current_credential_files(stored) == stored  # no credential in this job: connecting says why


def test_connection_secrets_are_the_uri_and_the_file_password(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    """What every module adds to its no_log values besides its password option."""
    secret = tmp_path / "password"
    secret.write_text("file-sentinel-123\n")
    monkeypatch.delenv("VMWARE_PASSWORD", raising=False)
    monkeypatch.setenv("VIRTFLEET_PASSWORD_FILE", str(secret))
    assert connection_secrets({"uri": "qemu:///system"}) == ["file-sentinel-123"]
    in_uri = connection_secrets({"uri": "vsphere://u:uri-sentinel@vc.example.com"})
    assert in_uri == ["uri-sentinel", "file-sentinel-123"]
    assert connection_secrets({"uri": "qemu:///system", "password": "given"}) == []  # no_log hides it
    monkeypatch.setenv("VIRTFLEET_PASSWORD_FILE", str(tmp_path / "missing"))
    assert connection_secrets({"uri": "qemu:///system"}) == []  # the run reports the file, naming it
