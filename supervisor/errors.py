"""The supervisor's exception hierarchy: `SupervisorError` is the root, and carries the exit status to use.

Configuration errors are `workers.errors.ConfigError` (the settings table lives below both packages) and
exit with status 2 before the supervisor runs.
"""

from __future__ import annotations

from workers.exit_status import ExitStatus

__all__ = ["SupervisorError"]


class SupervisorError(Exception):
    """A failure that stops the supervisor; `status` is the exit status to use."""

    def __init__(self, message: str, status: ExitStatus = ExitStatus.ERROR) -> None:
        super().__init__(message)
        self.status = status
