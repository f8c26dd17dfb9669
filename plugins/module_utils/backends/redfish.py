# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Redfish BMC backend: the service root answers without credentials (vendor, product, version).

Requests go over http.client, not ansible's open_url: open_url installs a process-wide opener (so parallel
discoveries could use each other's TLS settings), reads ~/.netrc, and its redirect handler carries the
Authorization header to wherever a redirect points. Here a redirect is followed only within the endpoint's own
origin (scheme, host and port), a few times at most; anything else is refused, so credentials go nowhere else.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Dict, Optional, Tuple
from urllib.parse import urljoin, urlsplit

from .._endpoints import tls_context
from .._errors import EndpointError, one_line
from .._model import Discovery, Identity
from ._vsphere_raw import CALL_DEADLINE_FACTOR, BoundedHTTPConnection, BoundedHTTPSConnection, read_bounded
from .base import HypervisorBackend

MAX_REDIRECTS = 3
MAX_ANSWER_BYTES = 8 << 20
_DEFAULT_PORTS = {"http": 80, "https": 443}


class RedirectRefused(Exception):
    """A redirect to another origin: not followed, so no credentials are sent there."""


class RedfishBackend(HypervisorBackend):
    api = "redfish"

    @property
    def base_url(self) -> str:
        scheme = "http" if self.endpoint.uri.startswith("redfish+http://") else "https"
        host = f"[{self.endpoint.host}]" if ":" in (self.endpoint.host or "") else self.endpoint.host
        return f"{scheme}://{host}:{self.endpoint.port}"

    def _origin(self, url: str) -> Tuple[str, str, int]:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme, 0)

    def _connection(self, scheme: str) -> Any:
        creds = self.endpoint.credentials
        host, port = self.endpoint.host or "", int(self.endpoint.port or _DEFAULT_PORTS[scheme])
        if scheme == "https":
            return BoundedHTTPSConnection(host, port, tls_context(bool(creds.validate_certs), creds.ca_path),
                                          self.timeout)
        return BoundedHTTPConnection(host, port, self.timeout)

    def _request(self, path: str, auth: bool) -> Tuple[int, bytes]:
        """GET PATH, following same-origin redirects only; (status, body)."""
        creds = self.endpoint.credentials
        headers = {"Accept": "application/json"}
        if auth and creds.username:
            token = base64.b64encode(f"{creds.username}:{creds.password or ''}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        url = self.base_url + path
        origin = self._origin(url)
        for _hop in range(MAX_REDIRECTS + 1):
            conn = self._connection(origin[0])
            conn.start(CALL_DEADLINE_FACTOR * self.timeout)
            try:
                target = urlsplit(url)
                conn.request("GET", (target.path or "/") + (f"?{target.query}" if target.query else ""),
                             headers=headers)
                response = conn.getresponse()
                location: Optional[str] = response.getheader("Location")
                if response.status in (301, 302, 303, 307, 308) and location:
                    response.read(1 << 16)
                    url = urljoin(url, location)
                    if self._origin(url) != origin:
                        raise RedirectRefused(f"redirected to another origin ({one_line(url, 120)}); not followed, "
                                              "no credentials sent there")
                    continue
                body = bytearray()
                read_bounded(response, MAX_ANSWER_BYTES, body.extend)
                self.calls += 1
                return response.status, bytes(body)
            finally:
                conn.close()
        raise RedirectRefused(f"more than {MAX_REDIRECTS} redirects")

    def _get(self, path: str, auth: bool = False) -> Dict[str, Any]:
        try:
            status, body = self._request(path, auth)
            if status != 200:
                raise ValueError(f"HTTP Error {status}")
            data = json.loads(body)
        except Exception as exc:  # noqa: BLE001 - HTTP, TLS, socket and JSON errors all become one line
            raise EndpointError(self.endpoint.label, f"Redfish {path}: {one_line(exc)}") from None
        if not isinstance(data, dict):
            raise EndpointError(self.endpoint.label, f"Redfish {path}: not a JSON object")
        return data

    def identify(self) -> Identity:
        root = self._get("/redfish/v1")
        if "RedfishVersion" not in root and "Systems" not in root:
            raise EndpointError(self.endpoint.label, "answers HTTP but is not a Redfish service root")
        return Identity(api="redfish", type="bmc", product=root.get("Product") or root.get("Name"),
                        version=root.get("RedfishVersion"), vendor=root.get("Vendor"),
                        instance_uuid=root.get("UUID"))

    def discover(self, guests: bool = True) -> Discovery:
        identity = self.identify()
        systems = self._get("/redfish/v1/Systems", auth=True)
        members = [m.get("@odata.id", "").rsplit("/", 1)[-1] for m in systems.get("Members", [])]
        bmc = {"vendor": identity.vendor, "product": identity.product, "redfish_version": identity.version,
               "endpoint": self.endpoint.uri, "systems": sorted(members)}
        return Discovery(identity=identity, bmc=bmc, calls=self.calls)
