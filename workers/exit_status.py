"""The exit statuses of `python -m supervisor` and `python -m workers` (DESIGN 3.1), one definition for both.

The supervisor reads its workers' statuses (3 stops everything: no restart can succeed) and systemd reads
the supervisor's (`RestartPreventExitStatus=2 3`), so both ends of each boundary use this enum.
"""

from __future__ import annotations

import enum

__all__ = ["ExitStatus"]


class ExitStatus(enum.IntEnum):
    #: A clean stop (a signal, or `--check-config` / `--print-config` done).
    OK = 0
    #: Anything else: a crash, a crash loop, an unreachable dependency.
    ERROR = 1
    #: Bad configuration; the message names the key.
    CONFIG = 2
    #: Discord refused the token or closed with a fatal code (4004, 4010-4014): restarting cannot help.
    FATAL = 3
