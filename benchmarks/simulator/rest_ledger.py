"""The REST ledger: every request the simulated API answered, and why each 429 happened.

A 429 is put in exactly one category (`CATEGORIES`): `global` (the per-token or per-IP global limit),
`ban` (a Cloudflare-style ban page), `shared` (a per-resource limit caused by "other users"), `sublimit` (a
hidden limit, answered with `Remaining > 0`), `first-contact` (a bucket 429 before the token had received
any answer with that counter's headers: no client could have known) and `avoidable` (a bucket 429 the
client had been told enough to prevent). Counters are exact; the list of request records is bounded.
Tokens never appear: records name them by `token_id`.
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

Category = Literal["global", "ban", "shared", "sublimit", "first-contact", "avoidable"]
CATEGORIES: Final[tuple[Category, ...]] = (
    "global",
    "ban",
    "shared",
    "sublimit",
    "first-contact",
    "avoidable",
)
#: Request records kept for `snapshot()["requests"]` (the oldest are dropped; counters stay exact).
MAX_REQUEST_RECORDS: Final = 10_000


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One answered request. `arrival` is the simulator's monotonic time when it was counted."""

    arrival: float
    token_id: str | None
    source_ip: str
    method: str
    template: str | None
    major: str | None
    bucket: str | None
    status: int
    category: Category | None


@dataclass(frozen=True, slots=True)
class BanRecord:
    source_ip: str
    at: float
    until: float
    invalid_count: int


class RestLedger:
    """Counters and records of the REST API. `snapshot()` is JSON-ready; `reset()` clears it."""

    def __init__(
        self,
        max_records: int = MAX_REQUEST_RECORDS,
        current_invalid: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        """`current_invalid` reads each source IP's invalid-request count in the window ending now."""
        self._max_records = max_records
        self._current_invalid = current_invalid
        self.reset()

    def reset(self) -> None:
        """Clear counters and records (the simulator's bucket and ban state is kept elsewhere)."""
        self.total = 0
        self.by_status: Counter[int] = Counter()
        self.by_category: Counter[str] = Counter(dict.fromkeys(CATEGORIES, 0))
        self.routes: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.invalid_peak: dict[str, int] = {}
        self.bans: list[BanRecord] = []
        self.records: deque[RequestRecord] = deque(maxlen=self._max_records)

    def record(self, record: RequestRecord) -> None:
        self.total += 1
        self.by_status[record.status] += 1
        if record.category is not None:
            self.by_category[record.category] += 1
        route = self.routes[record.template or "unmatched"]
        route["total"] += 1
        route[str(record.status)] += 1
        if record.category is not None:
            route[record.category] += 1
        self.records.append(record)

    def note_invalid(self, source_ip: str, count_in_window: int) -> None:
        """Track the peak invalid-request count of `source_ip` in its sliding window (just incremented)."""
        if count_in_window > self.invalid_peak.get(source_ip, 0):
            self.invalid_peak[source_ip] = count_in_window

    def note_ban(self, ban: BanRecord) -> None:
        self.bans.append(ban)

    def count_429(self, category: Category) -> int:
        return self.by_category[category]

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy: `total`, `by_status`, `by_category`, `routes`, `invalid`, `bans`, `requests`."""
        current = self._current_invalid() if self._current_invalid is not None else {}
        return {
            "total": self.total,
            "by_status": {str(status): count for status, count in sorted(self.by_status.items())},
            "by_category": dict(self.by_category),
            "routes": {template: dict(counts) for template, counts in self.routes.items()},
            "invalid": {
                ip: {"current": current.get(ip, 0), "peak": peak} for ip, peak in self.invalid_peak.items()
            },
            "bans": [asdict(ban) for ban in self.bans],
            "requests": [asdict(record) for record in self.records],
            "requests_dropped": self.total - len(self.records),
        }
