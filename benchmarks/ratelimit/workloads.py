"""The ratelimit benchmark's workloads as data: what each client process sends, and when. Pure: no I/O.

One `Plan` (written to a JSON file by the suite) drives every variant: our engine's client
(`benchmarks/ratelimit/client.py`, trio and httpx) and the peers (`benchmarks/peers/rest_bench.py`, asyncio
and discord.py or hikari). `timeline(plan, index)` turns it into the exact list of calls process `index`
makes, each with its offset from the common start signal, so every variant offers the simulator the same
traffic and a run can be reproduced from the plan alone (the seeds are in it).

Each workload window (`Plan.windows`: hot, zipf with its interaction callbacks, storm) runs on a client
opened for it: a call cancelled at the end of one window must not leave state that holds up the next
(discord.py leaves its global lock closed when a request sleeping on a global 429 is cancelled).

Offered load is open-loop: calls arrive by a Poisson process whatever became of the earlier ones, as
requests reach a bot from its users. A process keeps at most `max_outstanding` calls of a workload
outstanding (waiting for a permit, in flight, or being retried); an arrival that finds it full is shed and
counted, as a bounded request queue would. A call still outstanding when its workload ends is cancelled.
"""

from __future__ import annotations

import base64
import bisect
import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from ratelimit.model import EngineConfig

Kind = Literal["message", "reaction", "typing", "role", "interaction"]
WorkloadName = Literal["hot", "zipf", "interactions", "storm"]
WORKLOADS: Final[tuple[WorkloadName, ...]] = ("hot", "zipf", "interactions", "storm")
#: The routes of the first-contact storm, one new counter each. In the simulator's catalogue: a reaction
#: (limit 1, sliding), typing (5, sliding), a member's role (10, fixed window).
STORM_KINDS: Final[tuple[Kind, ...]] = ("reaction", "typing", "role")
#: The emoji of the storm's reactions, percent-encoded as every client sends it.
REACTION_EMOJI: Final = "%F0%9F%91%8D"
#: Channel ids of each workload (snowflake-sized, disjoint ranges: the ledger tells workloads apart by them).
HOT_CHANNEL: Final = 1_200_000_000_000_000_001
ZIPF_FIRST_CHANNEL: Final = 1_210_000_000_000_000_000
STORM_FIRST_CHANNEL: Final = 1_220_000_000_000_000_000
STORM_MESSAGE: Final = 1_230_000_000_000_000_000
STORM_USER: Final = 1_231_000_000_000_000_000
STORM_ROLE: Final = 1_232_000_000_000_000_000
INTERACTION_FIRST_ID: Final = 1_240_000_000_000_000_000
#: Environment variables that carry a client's secrets: the bot token and the Redis URL.
TOKEN_ENV: Final = "DISCORD_TOKEN"
REDIS_URL_ENV: Final = "REDIS_URL"
#: Interaction ids per process: process `i` uses ids from `INTERACTION_FIRST_ID + i * INTERACTION_ID_STRIDE`.
INTERACTION_ID_STRIDE: Final = 1_000_000


@dataclass(frozen=True, slots=True)
class Call:
    """One request, in terms every client can make with its own API."""

    kind: Kind
    channel: int = 0  # the channel, or the guild of a role call
    message: int = 0
    interaction: int = 0
    token: str = ""  # the interaction token of an interaction callback


@dataclass(frozen=True, slots=True)
class Scheduled:
    """A call of workload `workload` at `at_s` after the start signal, cancelled if still outstanding at
    `cancel_at_s`; shed when `max_outstanding` calls of its workload are outstanding."""

    at_s: float
    workload: WorkloadName
    call: Call
    cancel_at_s: float
    max_outstanding: int


@dataclass(frozen=True, slots=True)
class HotPlan:
    """(a) Every process posts to one channel; together they offer `rate_total` requests per second."""

    start_s: float
    duration_s: float
    rate_total: float
    max_outstanding: int


@dataclass(frozen=True, slots=True)
class ZipfPlan:
    """(b) Message creates over `channels` channels, rank `k` (1-based) chosen with weight
    `1 / k**exponent`, offered at `rate_total` per second in all; and (d) interaction callbacks at
    `interaction_rate_total` per second during it, each with a new interaction id."""

    start_s: float
    duration_s: float
    channels: int
    exponent: float
    rate_total: float
    max_outstanding: int
    interaction_rate_total: float


@dataclass(frozen=True, slots=True)
class StormPlan:
    """(c) `rounds` times, every process sends `per_route` requests to each of `STORM_KINDS` at the same
    moment, on a channel (or guild) no request has used before; round 0 is also each route's first use."""

    start_s: float
    rounds: int
    round_s: float
    per_route: int


@dataclass(frozen=True, slots=True)
class CapacityPlan:
    """Engine capacity without HTTP. First process 0 alone times `latency_samples` sequential acquires
    with capacity available; then every process acquires and releases as fast as it can for
    `duration_s` over `keys_per_process` buckets of its own, with `tasks_per_process` tasks."""

    latency_samples: int
    keys_per_process: int
    tasks_per_process: int
    duration_s: float


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """How a client process opens the shared engine (`ratelimit.configured.BackendSpec` fields). The Redis URL
    (it may hold a password) comes in the environment, `REDIS_URL_ENV`."""

    kind: str
    global_rate: int
    shm_name: str = ""
    shm_dir: str = "/dev/shm"
    redis_prefix: str = ""


def engine_config(engine: EngineSpec) -> EngineConfig:
    """The EngineConfig every sharer of the engine uses (the shm segment refuses any other)."""
    return EngineConfig(global_rate=engine.global_rate)


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything a client process needs but its secrets (the bot token, the Redis URL: in the environment,
    `TOKEN_ENV` and `REDIS_URL_ENV`, never in the plan file). Times are seconds after the start signal."""

    rest_url: str
    processes: int
    seed: int
    engine: EngineSpec | None = None
    hot: HotPlan | None = None
    zipf: ZipfPlan | None = None
    storm: StormPlan | None = None
    capacity: CapacityPlan | None = None

    @property
    def end_s(self) -> float:
        """When the last workload ends."""
        return max((end for _, end in self.windows().values()), default=0.0)

    def windows(self) -> dict[str, tuple[float, float]]:
        """Each workload's (start, end) in seconds after the start signal; `zipf` includes (d)."""
        out: dict[str, tuple[float, float]] = {}
        if self.hot is not None:
            out["hot"] = (self.hot.start_s, self.hot.start_s + self.hot.duration_s)
        if self.zipf is not None:
            out["zipf"] = (self.zipf.start_s, self.zipf.start_s + self.zipf.duration_s)
        if self.storm is not None:
            out["storm"] = (self.storm.start_s, self.storm.start_s + self.storm.rounds * self.storm.round_s)
        return out

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def read(cls, path: Path) -> Plan:
        raw: dict[str, Any] = json.loads(path.read_text())
        parts: dict[str, type[Any]] = {
            "engine": EngineSpec,
            "hot": HotPlan,
            "zipf": ZipfPlan,
            "storm": StormPlan,
            "capacity": CapacityPlan,
        }
        for name, kind in parts.items():
            if raw.get(name) is not None:
                raw[name] = kind(**raw[name])
        return cls(**raw)


def hot_channel() -> int:
    return HOT_CHANNEL


def zipf_channel(rank: int) -> int:
    """The channel id of Zipf rank `rank` (1-based)."""
    return ZIPF_FIRST_CHANNEL + rank


def storm_channel(round_index: int, kind_index: int) -> int:
    return STORM_FIRST_CHANNEL + round_index * len(STORM_KINDS) + kind_index


def interaction_token(interaction: int) -> str:
    """A token shaped like Discord's (base64 of `interaction:<id>:<secret>`); the simulator accepts any."""
    return base64.urlsafe_b64encode(f"interaction:{interaction}:benchmark".encode()).decode().rstrip("=")


class ZipfSampler:
    """Draws ranks 1..n with probability proportional to `1 / rank**exponent` (inverse CDF, bisect)."""

    def __init__(self, n: int, exponent: float) -> None:
        total = 0.0
        self._cdf: list[float] = []
        for rank in range(1, n + 1):
            total += rank**-exponent
            self._cdf.append(total)
        self._total = total

    def rank(self, rng: random.Random) -> int:
        return bisect.bisect_left(self._cdf, rng.random() * self._total) + 1

    def share(self, rank: int) -> float:
        """The probability of `rank`."""
        previous = self._cdf[rank - 2] if rank > 1 else 0.0
        return (self._cdf[rank - 1] - previous) / self._total


def poisson_arrivals(rng: random.Random, rate: float, start_s: float, duration_s: float) -> list[float]:
    """Arrival offsets of a Poisson process of `rate` per second in `[start_s, start_s + duration_s)`."""
    times: list[float] = []
    if rate <= 0:
        return times
    at = start_s + rng.expovariate(rate)
    while at < start_s + duration_s:
        times.append(at)
        at += rng.expovariate(rate)
    return times


def timeline(plan: Plan, index: int) -> list[Scheduled]:
    """Every call process `index` of `plan.processes` makes, in time order."""
    rng = random.Random(f"{plan.seed}:{index}")
    items: list[Scheduled] = []
    share = 1.0 / plan.processes
    if plan.hot is not None:
        hot = plan.hot
        end = hot.start_s + hot.duration_s
        call = Call("message", channel=HOT_CHANNEL)
        arrivals = poisson_arrivals(rng, hot.rate_total * share, hot.start_s, hot.duration_s)
        items += [Scheduled(at, "hot", call, end, hot.max_outstanding) for at in arrivals]
    if plan.zipf is not None:
        zipf = plan.zipf
        end = zipf.start_s + zipf.duration_s
        sampler = ZipfSampler(zipf.channels, zipf.exponent)
        for at in poisson_arrivals(rng, zipf.rate_total * share, zipf.start_s, zipf.duration_s):
            call = Call("message", channel=zipf_channel(sampler.rank(rng)))
            items.append(Scheduled(at, "zipf", call, end, zipf.max_outstanding))
        first_id = INTERACTION_FIRST_ID + index * INTERACTION_ID_STRIDE
        arrivals = poisson_arrivals(rng, zipf.interaction_rate_total * share, zipf.start_s, zipf.duration_s)
        for number, at in enumerate(arrivals):
            interaction = first_id + number
            call = Call("interaction", interaction=interaction, token=interaction_token(interaction))
            items.append(Scheduled(at, "interactions", call, end, zipf.max_outstanding))
    if plan.storm is not None:
        storm = plan.storm
        for round_index in range(storm.rounds):
            at = storm.start_s + round_index * storm.round_s
            # Room for a round's calls beside the previous round's, cancelled at this same moment.
            cap = 2 * len(STORM_KINDS) * storm.per_route
            for kind_index, kind in enumerate(STORM_KINDS):
                call = Call(kind, channel=storm_channel(round_index, kind_index), message=STORM_MESSAGE)
                items += [Scheduled(at, "storm", call, at + storm.round_s, cap)] * storm.per_route
    items.sort(key=lambda item: item.at_s)
    return items


@dataclass(frozen=True, slots=True)
class Phase:
    """The calls of one workload window (`Plan.windows`), for one process."""

    name: str
    start_s: float
    end_s: float
    items: list[Scheduled]


#: The window each workload's calls belong to.
WINDOW_OF: Final[dict[WorkloadName, str]] = {
    "hot": "hot",
    "zipf": "zipf",
    "interactions": "zipf",
    "storm": "storm",
}


def phases(plan: Plan, index: int) -> list[Phase]:
    """`timeline(plan, index)` split by workload window, in time order."""
    items = timeline(plan, index)
    windows = plan.windows()
    out = [
        Phase(name, start, end, [item for item in items if WINDOW_OF[item.workload] == name])
        for name, (start, end) in windows.items()
    ]
    return sorted(out, key=lambda phase: phase.start_s)


@dataclass
class Tally:
    """What one process saw of one workload (the simulator's ledger is the authority on 429s)."""

    scheduled: int = 0
    shed: int = 0
    completed: int = 0
    cancelled: int = 0
    outstanding: int = 0
    statuses: dict[str, int] = dataclasses.field(default_factory=dict)
    errors: dict[str, int] = dataclasses.field(default_factory=dict)
    #: Seconds from the call to its answer (interaction callbacks only, to keep the report small).
    latencies_s: list[float] = dataclasses.field(default_factory=list)

    def status(self, status: int) -> None:
        self.completed += 1
        self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1

    def error(self, exc: BaseException) -> None:
        name = type(exc).__name__
        self.errors[name] = self.errors.get(name, 0) + 1

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        del out["outstanding"]
        out["latencies_s"] = [round(value, 6) for value in self.latencies_s]
        return out


def new_tallies() -> dict[WorkloadName, Tally]:
    return {name: Tally() for name in WORKLOADS}
