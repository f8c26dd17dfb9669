# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Endpoints, probe ranges and credentials: parsed and validated before anything is contacted."""

from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress
import os
from typing import Any, Dict, List, Optional, Sequence
from urllib.parse import urlsplit

from ansible.module_utils.parsing.convert_bool import boolean

from ._errors import ConfigError

LIBVIRT_SCHEMES = ("qemu", "test", "xen", "lxc", "bhyve", "vz", "ch")
VSPHERE_SCHEMES = ("vsphere",)
REDFISH_SCHEMES = ("redfish", "redfish+http")
DEFAULT_PROBE_PORTS = (443, 16509, 16514)
MAX_PROBE_ADDRESSES = 4096
LIBVIRT_PORTS = {16509: "qemu+tcp", 16514: "qemu+tls"}


@dataclasses.dataclass(frozen=True)
class Credentials:
    username: Optional[str] = None
    password: Optional[str] = dataclasses.field(default=None, repr=False)
    validate_certs: bool = True


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One API endpoint: libvirt URI, vSphere (ESXi or vCenter) or Redfish BMC."""

    api: str  # libvirt | vsphere | redfish
    uri: str
    host: Optional[str]  # None for a local libvirt URI
    port: Optional[int] = None
    credentials: Credentials = dataclasses.field(default_factory=Credentials, repr=False)

    @property
    def label(self) -> str:
        """How the endpoint is named in messages and in the inventory: as the user wrote it."""
        return self.host or self.uri


def _scheme_family(scheme: str) -> Optional[str]:
    base = scheme.split("+", 1)[0]
    if scheme in VSPHERE_SCHEMES:
        return "vsphere"
    if scheme in REDFISH_SCHEMES:
        return "redfish"
    if base in LIBVIRT_SCHEMES:
        return "libvirt"
    return None


def parse_endpoint(uri: str, option: str = "uri") -> Endpoint:
    """Parse one endpoint URI; a bad one raises ConfigError naming OPTION and the value."""
    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError(option, uri, "expected a URI such as vsphere://esx01.example.com or qemu:///system")
    uri = uri.strip()
    if "://" not in uri:
        raise ConfigError(option, uri, f"no scheme; write vsphere://{uri} for ESXi/vCenter "
                                       f"or qemu+ssh://{uri}/system for libvirt")
    parts = urlsplit(uri)
    family = _scheme_family(parts.scheme)
    if family is None:
        raise ConfigError(option, uri, f"unknown scheme '{parts.scheme}'; use vsphere://, redfish://, "
                                       "or a libvirt URI (qemu://, qemu+ssh://, qemu+tls://, qemu+tcp://, test://)")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(option, uri, "the port is not a number from 1 to 65535") from None
    host = parts.hostname
    if family in ("vsphere", "redfish"):
        if not host:
            raise ConfigError(option, uri, "no host; write e.g. vsphere://esx01.example.com")
        if parts.path not in ("", "/") and family == "vsphere":
            raise ConfigError(option, uri, "a vSphere endpoint is vsphere://host[:port], with no path")
        default_port = 80 if parts.scheme == "redfish+http" else 443
        return Endpoint(api=family, uri=uri, host=host, port=port or default_port)
    return Endpoint(api="libvirt", uri=uri, host=host or None, port=port)


def probe_addresses(spec: str, option: str = "probe") -> List[str]:
    """Expand an address or CIDR range into host addresses, refusing more than MAX_PROBE_ADDRESSES."""
    try:
        network = ipaddress.ip_network(str(spec).strip(), strict=False)
    except ValueError:
        raise ConfigError(option, spec, "not an IP address or CIDR range (e.g. 192.0.2.0/28)") from None
    if network.num_addresses > MAX_PROBE_ADDRESSES:
        raise ConfigError(option, spec, f"{network.num_addresses} addresses; at most {MAX_PROBE_ADDRESSES} "
                                        "may be probed at once, split the range")
    hosts = list(network.hosts()) if network.num_addresses > 2 else list(network)
    return [str(a) for a in hosts]


def probe_ports(ports: Any, option: str = "ports") -> List[int]:
    if ports is None:
        return list(DEFAULT_PROBE_PORTS)
    if not isinstance(ports, (list, tuple)) or not ports:
        raise ConfigError(option, ports, "expected a non-empty list of TCP ports")
    out = []
    for port in ports:
        try:
            value = int(port)
        except (TypeError, ValueError):
            raise ConfigError(option, ports, f"'{port}' is not a port number") from None
        if not 0 < value < 65536:
            raise ConfigError(option, ports, f"{value} is not a port number from 1 to 65535")
        out.append(value)
    return out


def env_credentials(username: Optional[str] = None, password: Optional[str] = None,
                    validate_certs: Optional[Any] = None) -> Credentials:
    """Fill what was not given from VMWARE_USER / VMWARE_PASSWORD / VMWARE_VALIDATE_CERTS (AWX injects these)."""
    if username is None:
        username = os.environ.get("VMWARE_USER") or None
    if password is None:
        password = os.environ.get("VMWARE_PASSWORD") or None
    if validate_certs is None:
        validate_certs = os.environ.get("VMWARE_VALIDATE_CERTS", True)
    try:
        verify = boolean(validate_certs, strict=True)
    except TypeError:
        raise ConfigError("validate_certs", validate_certs, "expected a boolean") from None
    return Credentials(username=username, password=password, validate_certs=verify)


@dataclasses.dataclass(frozen=True)
class CredentialRule:
    match: str
    credentials: Credentials


def parse_credential_rules(rules: Any, option: str = "credentials",
                           default: Optional[Credentials] = None) -> List[CredentialRule]:
    """Validate credentials entries; an entry without validate_certs inherits DEFAULT's."""
    if rules is None:
        return []
    if not isinstance(rules, list):
        raise ConfigError(option, rules, "expected a list of {match, username, password, validate_certs}")
    out = []
    allowed = {"match", "username", "password", "validate_certs"}
    for i, rule in enumerate(rules):
        where = f"{option}[{i}]"
        if not isinstance(rule, dict):
            raise ConfigError(where, "<redacted>", "expected a dict with match, username, password, validate_certs")
        unknown = sorted(set(rule) - allowed)
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}", "<redacted>" if "pass" in unknown[0] else rule[unknown[0]],
                              f"unknown option; expected one of {', '.join(sorted(allowed))}")
        match = rule.get("match")
        if not isinstance(match, str) or not match:
            raise ConfigError(f"{where}.match", match, "expected a host name glob such as 'esx*.example.com'")
        verify = rule.get("validate_certs")
        if verify is None and default is not None:
            verify = default.validate_certs
        creds = env_credentials(rule.get("username"), rule.get("password"), verify)
        out.append(CredentialRule(match=match, credentials=creds))
    return out


def credentials_for(host: Optional[str], rules: Sequence[CredentialRule], default: Credentials) -> Credentials:
    """The first rule whose glob matches HOST (case-insensitive), else DEFAULT."""
    name = (host or "localhost").lower()
    for rule in rules:
        if fnmatch.fnmatchcase(name, rule.match.lower()):
            return rule.credentials
    return default


def with_credentials(endpoint: Endpoint, creds: Credentials) -> Endpoint:
    return dataclasses.replace(endpoint, credentials=creds)


def check_rules_match(rules: Sequence[CredentialRule], hosts: Sequence[Optional[str]], has_probes: bool) -> None:
    """A rule that can match nothing is a typo; say so before anything is contacted."""
    if has_probes:
        return
    names = [(h or "localhost").lower() for h in hosts]
    for i, rule in enumerate(rules):
        if not any(fnmatch.fnmatchcase(n, rule.match.lower()) for n in names):
            raise ConfigError(f"credentials[{i}].match", rule.match, "matches no endpoint")


def public_summary(endpoint: Endpoint) -> Dict[str, Any]:
    """Endpoint data that is safe to show, cache and return: never credentials."""
    return {"api": endpoint.api, "uri": endpoint.uri, "host": endpoint.host, "port": endpoint.port}
