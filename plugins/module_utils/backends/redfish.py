# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Redfish BMC backend: the service root answers without credentials (vendor, product, version)."""

from __future__ import annotations

import json
from typing import Any, Dict

from ansible.module_utils.urls import open_url

from .._errors import EndpointError, one_line
from .._model import Discovery, Identity
from .base import HypervisorBackend


class RedfishBackend(HypervisorBackend):
    api = "redfish"

    @property
    def base_url(self) -> str:
        scheme = "http" if self.endpoint.uri.startswith("redfish+http://") else "https"
        return f"{scheme}://{self.endpoint.host}:{self.endpoint.port}"

    def _get(self, path: str, auth: bool = False) -> Dict[str, Any]:
        creds = self.endpoint.credentials
        try:
            resp = open_url(self.base_url + path, method="GET", timeout=self.timeout,
                            validate_certs=creds.validate_certs, headers={"Accept": "application/json"},
                            url_username=creds.username if auth else None,
                            url_password=creds.password if auth else None,
                            force_basic_auth=bool(auth and creds.username))
            self.calls += 1
            data = json.loads(resp.read())
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
