# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""fleet_guests on the controller: the same run_fleet as the module, without shipping a module, starting a Python
and moving the targets and results through JSON (for a 500-guest fleet about 1.5 s of a run)."""

from __future__ import annotations

from typing import Any, Dict, Optional

from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
from ansible.module_utils.common.parameters import remove_values
from ansible.plugins.action import ActionBase

from ansible_collections.virtfleet.core.plugins.module_utils._argspec import plain_data
from ansible_collections.virtfleet.core.plugins.module_utils._errors import ConfigError, VirtfleetError, one_line
from ansible_collections.virtfleet.core.plugins.module_utils._fleet_run import (
    fleet_guests_argument_spec,
    run_fleet,
    secrets_of,
    user_data_from,
)


class ActionModule(ActionBase):
    TRANSFERS_FILES = False

    def run(self, tmp: Optional[str] = None, task_vars: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        result = super().run(tmp, task_vars)
        # Plain data (Ansible's tagged strings cost time in validation and in pickling to the worker processes).
        args = plain_data(dict(self._task.args))
        validated = ArgumentSpecValidator(fleet_guests_argument_spec()).validate(args)
        params = validated.validated_parameters
        try:
            user_data = self._user_data(params.get("fleet_file"))
        except VirtfleetError as exc:
            return dict(result, failed=True, msg=str(exc))
        hidden = set(validated._no_log_values) | set(secrets_of(params, user_data))
        if validated.error_messages:
            # Messages name options, never values; masked all the same.
            return dict(result, failed=True, msg=remove_values(validated.error_messages[0], hidden))
        try:
            outcome = run_fleet(params, bool(self._task.check_mode), user_data,
                                mask=lambda text: str(remove_values(text, hidden)))
        except VirtfleetError as exc:
            return dict(result, failed=True, msg=remove_values(str(exc), hidden))
        except Exception as exc:  # noqa: BLE001 - one line, as the module would fail
            return dict(result, failed=True, msg=remove_values(f"unexpected {type(exc).__name__}: {one_line(exc)}",
                                                               hidden))
        # Names, changes and the plan hold no secret (cloud-init is a digest there); masking them would rewrite a
        # name that happens to be a user_data string and break the plan's digest. Messages were masked above.
        result.update(outcome)
        return result

    def _user_data(self, path: Optional[str]) -> Dict[str, Any]:
        """The fleet file's user_data, read as the role's placement read it (Ansible's loader: vault-encrypted files
        and !vault values are decrypted)."""
        if not path:
            return {}
        try:
            raw = self._loader.load_from_file(path)
        except Exception as exc:  # noqa: BLE001 - Ansible's parse and vault errors, one line
            raise ConfigError("fleet_file", path, f"cannot be read: {one_line(exc)}") from None
        return user_data_from(plain_data(raw))
