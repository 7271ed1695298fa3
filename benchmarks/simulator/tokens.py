"""Which bot tokens the simulator accepts, shared by its REST API and gateway.

A token can be revoked at run time (the daily identify budget running out resets the token at Discord, and
the fault suite revokes tokens on purpose); from then on REST answers 401 and IDENTIFY closes with 4004.
Tokens are kept only in memory and never written to the ledger: the ledger names them by `token_id`.
"""

from __future__ import annotations

import hashlib

from .config import SimulatorConfig


def token_id(token: str) -> str:
    """A short stable name for a token, safe to show in ledgers and logs."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:12]


class TokenRegistry:
    def __init__(self, config: SimulatorConfig) -> None:
        self._accept_any = config.accept_any_token
        self._valid = set(config.tokens)
        self._revoked: set[str] = set()

    def is_valid(self, token: str) -> bool:
        if not token or token in self._revoked:
            return False
        return self._accept_any or token in self._valid

    def revoke(self, token: str) -> None:
        self._revoked.add(token)

    def revoke_all(self) -> None:
        """Revoke every token seen so far or configured (a simulated token reset)."""
        self._revoked |= self._valid
        self._accept_any = False

    def restore(self) -> None:
        """Undo every revocation (for tests that reset the simulator between phases)."""
        self._revoked.clear()
