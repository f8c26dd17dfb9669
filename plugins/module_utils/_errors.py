# Copyright: virtfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Domain exceptions. Code below the modules raises these; modules and plugins turn them into one line."""

from __future__ import annotations


class VirtfleetError(Exception):
    """Base of every error this collection raises on purpose. ``str(err)`` is one line for the user."""


class ConfigError(VirtfleetError):
    """Bad input, found before anything is contacted: names the option and the value."""

    def __init__(self, option: str, value: object, problem: str) -> None:
        self.option = option
        self.value = value
        self.problem = problem
        super().__init__(f"{option}={one_line(repr(value), 120)}: {problem}")


class EndpointError(VirtfleetError):
    """An endpoint that is down, refuses login, times out or answers something unknown."""

    def __init__(self, endpoint: str, reason: str) -> None:
        self.endpoint = endpoint
        self.reason = reason
        super().__init__(f"{endpoint}: {reason}")


class ConcurrentRunError(EndpointError):
    """Another run changed the same guest meanwhile. What is there stays: it may be that run's to finish."""


class MissingLibraryError(VirtfleetError):
    """A Python library that a backend needs is not installed where the code runs."""

    def __init__(self, library: str, purpose: str) -> None:
        super().__init__(f"the Python library '{library}' is required for {purpose}; install it (see requirements.txt)")


def one_line(text: object, limit: int = 300) -> str:
    """Collapse an exception or message from a library into one bounded line."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
