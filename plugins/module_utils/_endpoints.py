# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Endpoints, probe ranges and credentials: parsed and validated before anything is contacted."""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import ipaddress
import math
import os
import re
import ssl
from typing import Any, Dict, List, Optional, Sequence, Tuple
from urllib.parse import unquote, urlsplit

from ansible.module_utils.parsing.convert_bool import boolean

from ._errors import ConfigError

LIBVIRT_SCHEMES = ("qemu", "test", "xen", "lxc", "bhyve", "vz", "ch")
VSPHERE_SCHEMES = ("vsphere",)
REDFISH_SCHEMES = ("redfish", "redfish+http")
DEFAULT_PROBE_PORTS = (443, 16509, 16514)
MAX_PROBE_ADDRESSES = 4096
LIBVIRT_PORTS = {16509: "qemu+tcp", 16514: "qemu+tls"}
# What a probe may try on a port without the user's leave to talk in the clear (allow_plaintext).
PLAINTEXT_LIBVIRT_PORTS = (16509,)
# libvirt URI parts that make libvirt run a program: the ext transport runs `command=` on this machine, and
# the ssh transports run `netcat=` (a shell command line) on the remote one.
LIBVIRT_COMMAND_PARAMS = ("command", "netcat")
LIBVIRT_COMMAND_TRANSPORTS = ("ext",)
# known_hosts_verify of the libssh and libssh2 transports: ignore skips the SSH host key check, auto accepts (and
# writes into known_hosts) the key of any host not in it yet; only normal (the default) checks the key.
UNCHECKED_HOST_KEY_MODES = {"ignore": "turns off SSH host key checks",
                            "auto": "accepts any SSH host key that is not in known_hosts yet"}
# Bounds of the numeric options shared by the modules and the inventory plugin.
MAX_TIMEOUT = 3600.0
MAX_WORKERS = 256
HIDDEN = "<not shown>"
_SECRET_WORDS = re.compile(r"pass|pwd|secret|token|credential|auth|cookie|session|private|(^|_)key($|_)|apikey",
                           re.IGNORECASE)


def looks_secret(name: str) -> bool:
    """Whether an option NAME (its last part: credentials[0].password -> password) looks like it holds a
    secret (password, token, api_key, ...)."""
    last = re.sub(r"\[\d+\]$", "", str(name).rsplit(".", 1)[-1])
    return bool(_SECRET_WORDS.search(last))


def uri_password(uri: Any) -> Optional[str]:
    """The password in a URI's user info, if any (for a module to hide it from its own invocation)."""
    try:
        return urlsplit(uri).password if isinstance(uri, str) else None
    except ValueError:
        return None


def redacted_uri(uri: str) -> str:
    """URI with the password of its user info (user:password@) replaced, for messages."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return HIDDEN
    if parts.password is None:
        return uri
    userinfo, _sep, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return parts._replace(netloc=f"{user}:{HIDDEN}@{hostport}").geturl()


@dataclasses.dataclass(frozen=True)
class Credentials:
    username: Optional[str] = None
    password: Optional[str] = dataclasses.field(default=None, repr=False)
    validate_certs: bool = True
    # A PEM file or a directory of hashed certificates: then only these CAs are trusted (vSphere, Redfish).
    ca_path: Optional[str] = None


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


def libvirt_uri_params(uri: str) -> List[Tuple[str, str]]:
    """(name, value) of each query parameter of a libvirt URI, as libvirt may read them: libvirt splits the query
    at ``&`` and, where no ``&`` follows, at ``;``, decodes %-escapes and matches names case-insensitively. Split
    here at both, so that every parameter libvirt sees is seen here too; names are lower-cased."""
    params = []
    for part in re.split(r"[&;]", urlsplit(uri).query):
        if part:
            name, _sep, value = part.partition("=")
            params.append((unquote(name).strip().lower(), unquote(value)))
    return params


# libvirt URI parameters that name a credential's files; an AWX job writes them to its private data directory.
CREDENTIAL_FILE_PARAMS = ("keyfile", "known_hosts")
JOB_LIBVIRT_URIS = ("VIRTFLEET_LIBVIRT_URI", "LIBVIRT_DEFAULT_URI")


def with_current_credential_files(uri: str) -> str:
    """URI, or this job's own URI for the same libvirt endpoint when URI names credential files that are gone.

    An AWX inventory is stored by its update job; a later job that reads it finds the update job's keyfile= and
    known_hosts= paths, deleted with that job's private data directory. The libvirt-over-SSH credential attached
    to the later job injects the same endpoint (scheme, user, host, port, path) with files of its own
    (VIRTFLEET_LIBVIRT_URI / LIBVIRT_DEFAULT_URI): that one is used. Anything else is left as it is."""
    if not isinstance(uri, str) or "://" not in uri:
        return uri
    files = [v for k, v in libvirt_uri_params(uri) if k in CREDENTIAL_FILE_PARAMS]
    if not files or all(os.path.exists(f) for f in files):
        return uri
    here = urlsplit(uri)
    for name in JOB_LIBVIRT_URIS:
        candidate = os.environ.get(name) or ""
        there = urlsplit(candidate) if "://" in candidate else None
        if there and (there.scheme, there.netloc, there.path) == (here.scheme, here.netloc, here.path):
            return candidate
    return uri


def parse_endpoint(uri: str, option: str = "uri", allow_uri_commands: bool = False) -> Endpoint:
    """Parse one endpoint URI; a bad one raises ConfigError naming OPTION and the value (never a password).

    A password in the URI is refused (it would land in hostvars, the cache and results), and so are libvirt
    URIs that run a program (the ext transport, command=, netcat=) unless ALLOW_URI_COMMANDS."""
    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError(option, uri, "expected a URI such as vsphere://esx01.example.com or qemu:///system")
    uri = uri.strip()
    if "://" not in uri:
        raise ConfigError(option, redacted_uri(uri), f"no scheme; write vsphere://{uri} for ESXi/vCenter "
                                                     f"or qemu+ssh://{uri}/system for libvirt")
    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:
        raise ConfigError(option, HIDDEN, "not a valid URI") from None
    if password is not None:
        raise ConfigError(option, redacted_uri(uri), "a password in the URI is refused (it would be shown and "
                                                     "stored with the endpoint); use the password option")
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
        if parts.username is not None:
            raise ConfigError(option, uri, "a user in the URI is not used here; use the username option")
        if parts.path not in ("", "/") and family == "vsphere":
            raise ConfigError(option, uri, "a vSphere endpoint is vsphere://host[:port], with no path")
        if parts.query or parts.fragment:
            raise ConfigError(option, uri, f"a {family} endpoint takes no query or fragment")
        default_port = 80 if parts.scheme == "redfish+http" else 443
        return Endpoint(api=family, uri=uri, host=host, port=port or default_port)
    transport = parts.scheme.split("+", 1)[1] if "+" in parts.scheme else ""
    params = {key for key, _value in libvirt_uri_params(uri)}
    runs = sorted(params & set(LIBVIRT_COMMAND_PARAMS))
    if not allow_uri_commands and (transport in LIBVIRT_COMMAND_TRANSPORTS or runs):
        what = f"the parameter {runs[0]}=" if runs else f"the {transport} transport"
        raise ConfigError(option, uri, f"{what} makes libvirt run a program; refused unless "
                                       "allow_uri_commands is true")
    return Endpoint(api="libvirt", uri=uri, host=host or None, port=port)


def check_transport(endpoint: Endpoint, option: str = "uri") -> None:
    """Settings of ENDPOINT's URI that contradict its credentials, refused rather than silently winning over the
    checks validate_certs: true asks for: libvirt's no_verify=1 turns off the TLS certificate check (and, on the
    ssh transport, OpenSSH's strict host key check); known_hosts_verify=ignore or auto (libssh, libssh2) lets a
    host key through that is not in known_hosts."""
    if endpoint.api != "libvirt" or not endpoint.credentials.validate_certs:
        return
    scheme = urlsplit(endpoint.uri).scheme.lower()
    checks = "SSH host key checks" if scheme.endswith("+ssh") else "TLS certificate checks"
    for key, value in libvirt_uri_params(endpoint.uri):
        if key == "no_verify" and value.strip() not in ("", "0"):
            raise ConfigError(option, endpoint.uri, f"no_verify turns off {checks} while validate_certs is true; "
                                                    "remove it, or set validate_certs: false")
        mode = value.strip().lower()
        if key == "known_hosts_verify" and mode in UNCHECKED_HOST_KEY_MODES:
            raise ConfigError(option, endpoint.uri, f"known_hosts_verify={mode} {UNCHECKED_HOST_KEY_MODES[mode]} "
                                                    "while validate_certs is true; remove it (the default, normal, "
                                                    "checks the key against known_hosts), or set "
                                                    "validate_certs: false")


def check_bounds(option: str, value: Any, upper: float, integer: bool = False) -> None:
    """A timeout or worker count: a finite number greater than 0 and at most UPPER."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(option, value, "expected a number")
    if not math.isfinite(value) or value <= 0 or value > upper:
        raise ConfigError(option, value, f"must be greater than 0 and at most {upper:g}")
    if integer and int(value) != value:
        raise ConfigError(option, value, "expected a whole number")


@functools.lru_cache(maxsize=8)
def tls_context(validate: bool, ca_path: Optional[str] = None) -> ssl.SSLContext:
    """One TLS client context per process and setting, shared by every endpoint (loading the system CA
    store took ~45 ms per endpoint, profiled; a context is safe to share). With CA_PATH only its CAs
    are trusted; hostname and certificate are checked unless VALIDATE is false."""
    if validate:
        if ca_path and os.path.isdir(ca_path):
            return ssl.create_default_context(capath=ca_path)
        return ssl.create_default_context(cafile=ca_path or None)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # validate_certs: false, the user's explicit choice
    return ctx


def check_ca_path(option: str, value: Any) -> Optional[str]:
    """A CA bundle file or certificate directory that exists, or None."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not (os.path.isfile(value) or os.path.isdir(value)):
        raise ConfigError(option, value, "not a CA certificate file or directory on this machine")
    return value


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


# How much of a password file is read: its first line, at most this many characters.
MAX_PASSWORD_FILE = 4096


def env_password() -> Optional[str]:
    """The password the environment gives: VMWARE_PASSWORD, else the first line of the file VIRTFLEET_PASSWORD_FILE
    names (how the collection's AWX credential injects it: a password in a file stays out of the environment,
    which every child process inherits and ansible-runner records), else None."""
    if os.environ.get("VMWARE_PASSWORD"):
        return os.environ["VMWARE_PASSWORD"]
    path = os.environ.get("VIRTFLEET_PASSWORD_FILE")
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            first = handle.readline(MAX_PASSWORD_FILE).rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("VIRTFLEET_PASSWORD_FILE", path, f"cannot be read ({type(exc).__name__})") from None
    if not first:
        raise ConfigError("VIRTFLEET_PASSWORD_FILE", path, "is empty")
    return first


def env_credentials(username: Optional[str] = None, password: Optional[str] = None,
                    validate_certs: Optional[Any] = None, ca_path: Optional[str] = None,
                    option: str = "") -> Credentials:
    """Fill what was not given from VMWARE_USER / VMWARE_PASSWORD / VMWARE_VALIDATE_CERTS (AWX injects these),
    the file VIRTFLEET_PASSWORD_FILE names, and VIRTFLEET_CA_PATH / REQUESTS_CA_BUNDLE. OPTION prefixes the
    option names in errors."""
    if username is None:
        username = os.environ.get("VMWARE_USER") or None
    if password is None:
        password = env_password()
    if validate_certs is None:
        validate_certs = os.environ.get("VMWARE_VALIDATE_CERTS", True)
    if ca_path is None:
        ca_path = os.environ.get("VIRTFLEET_CA_PATH") or os.environ.get("REQUESTS_CA_BUNDLE") or None
    try:
        verify = boolean(validate_certs, strict=True)
    except TypeError:
        raise ConfigError(f"{option}validate_certs", validate_certs, "expected a boolean") from None
    for name, value in (("username", username), ("password", password)):
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{option}{name}", HIDDEN if name == "password" else value, "expected a string")
    return Credentials(username=username, password=password, validate_certs=verify,
                       ca_path=check_ca_path(f"{option}ca_path", ca_path))


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
        raise ConfigError(option, HIDDEN, "expected a list of {match, username, password, validate_certs, ca_path}")
    out = []
    allowed = {"match", "username", "password", "validate_certs", "ca_path"}
    for i, rule in enumerate(rules):
        where = f"{option}[{i}]"
        if not isinstance(rule, dict):
            raise ConfigError(where, HIDDEN, "expected a dict with match, username, password, validate_certs, "
                                             "ca_path")
        unknown = sorted(set(rule) - allowed, key=str)
        if unknown:  # the value of an unknown key is never shown: it may well be a misspelt password
            raise ConfigError(f"{where}.{unknown[0]}", HIDDEN,
                              f"unknown option; expected one of {', '.join(sorted(allowed))}")
        match = rule.get("match")
        if not isinstance(match, str) or not match:
            raise ConfigError(f"{where}.match", match, "expected a host name glob such as 'esx*.example.com'")
        verify, ca_path = rule.get("validate_certs"), rule.get("ca_path")
        if verify is None and default is not None:
            verify = default.validate_certs
        if ca_path is None and default is not None:
            ca_path = default.ca_path
        creds = env_credentials(rule.get("username"), rule.get("password"), verify, ca_path, option=f"{where}.")
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
