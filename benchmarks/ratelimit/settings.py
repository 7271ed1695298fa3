"""The ratelimit benchmark's sizes and targets: `Settings` per size (`smoke`, `quick`, `full`), the
figure -> target table (issue 5 item 6; the interaction wait from anchors/ratelimit.md 5.5) and the
figures a run attempts for its chosen variants, workloads and capacity run (`attempted_figures`), so a
measurement that failed leaves None (its targets ERROR) instead of no key."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from benchmarks.simulator.routes import RouteCatalogue
from benchmarks.targets import Target
from ratelimit import SharedBackendKind

Backend = SharedBackendKind
Peer = Literal["discordpy", "hikari"]
BACKENDS: Final[tuple[Backend, ...]] = ("shm", "redis")
PEERS: Final[tuple[Peer, ...]] = ("discordpy", "hikari")
#: Every variant's figure prefix, in the order tables show them.
VARIANTS: Final = (*BACKENDS, *(f"peer.{peer}" for peer in PEERS))
#: The simulator's counter of workloads (a) and (b): `POST /channels/{channel_id}/messages`.
MESSAGE_GROUP: Final = "message-create"
SIMULATOR_SEED: Final = 0

#: Issue 17: 98 % of Discord's limits, with 0 global and 0 avoidable 429s.
TARGET_GLOBAL_UTILIZATION: Final = 0.98
TARGET_HOT_UTILIZATION: Final = 0.98
TARGET_INTERACTION_WAIT_P99_MS: Final = 1.0
TARGET_SHM_ACQUIRE_P50_US: Final = 50.0
TARGET_REDIS_ACQUIRE_P50_US: Final = 1000.0
TARGET_SHM_GRANTS_PER_S: Final = 20_000.0
TARGET_REDIS_GRANTS_PER_S: Final = 5_000.0


def _targets() -> dict[str, Target]:
    out: dict[str, Target] = {}
    for variant in VARIANTS:
        out[f"{variant}.avoidable_429_per_10k"] = Target("<=", 0.0)
        out[f"{variant}.first_contact_429"] = Target("<=", 0.0)
        out[f"{variant}.global_utilization"] = Target(">=", TARGET_GLOBAL_UTILIZATION)
        out[f"{variant}.hot_bucket_utilization"] = Target(">=", TARGET_HOT_UTILIZATION)
    for backend in BACKENDS:
        out[f"{backend}.interaction_wait_p99_ms"] = Target("<=", TARGET_INTERACTION_WAIT_P99_MS)
    out["shm.acquire_p50_us"] = Target("<=", TARGET_SHM_ACQUIRE_P50_US)
    out["redis.acquire_p50_us"] = Target("<=", TARGET_REDIS_ACQUIRE_P50_US)
    out["shm.grants_per_s"] = Target(">=", TARGET_SHM_GRANTS_PER_S)
    out["redis.grants_per_s"] = Target(">=", TARGET_REDIS_GRANTS_PER_S)
    return out


#: Figure -> target. Peers are held to the same 429 and utilization targets as ours.
TARGETS: Final = _targets()

#: A variant's figures from its HTTP workloads (figures.analyse_http and measure.measure_http), when any
#: workload runs; then those of workload (a) `hot`, of (b) `zipf`, and our engine's own.
HTTP_FIGURES: Final = (
    "avoidable_429_per_10k",
    "first_contact_429",
    "global_429",
    "shared_429",
    "sublimit_429",
    "ban_429",
    "requests",
    "bans",
)
HOT_FIGURES: Final = ("hot_bucket_utilization",)
ZIPF_FIGURES: Final = ("global_utilization", "interaction_latency_p50_ms", "interaction_latency_p99_ms")
ENGINE_ZIPF_FIGURES: Final = ("interaction_wait_p50_ms", "interaction_wait_p99_ms")
ENGINE_HTTP_FIGURES: Final = ("fallback_grants",)
#: A backend's figures from the capacity run (measure.measure_capacity), its one-process acquire latency
#: (with `latency_samples`), and its concurrent run (with `capacity_concurrent_tasks`).
CAPACITY_FIGURES: Final = ("grants_per_s", "loaded_acquire_p50_us", "loaded_acquire_p99_us")
LATENCY_FIGURES: Final = ("acquire_p50_us", "acquire_p99_us")
CONCURRENT_FIGURES: Final = (
    "concurrent_grants_per_s",
    "concurrent_loaded_acquire_p50_us",
    "concurrent_loaded_acquire_p99_us",
)


@dataclass(frozen=True, slots=True)
class Settings:
    """The size of one run: `smoke` for tests (its figures mean little), `quick` about 3 minutes."""

    name: str
    processes: int
    hot_s: float
    zipf_s: float
    storm_rounds: int
    storm_round_s: float
    capacity_s: float
    latency_samples: int
    latency_ms: float = 40.0
    latency_sigma: float = 0.5
    bucket_time_scale: float = 0.5
    global_rate: int = 50
    hot_factor: float = 10.0
    zipf_factor: float = 4.0
    zipf_channels: int = 10_000
    zipf_exponent: float = 1.0
    #: Interaction callbacks per second, all processes together, during workload (b).
    interaction_rate: float = 16.0
    #: Calls of one workload one process keeps outstanding before it sheds arrivals.
    max_outstanding: int = 32
    storm_per_route: int = 2
    gap_s: float = 1.0
    global_warmup_s: float = 1.0
    global_cooldown_s: float = 0.5
    capacity_keys: int = 64
    #: Tasks per process of the capacity run, and of its second, concurrent run (0: no second run).
    capacity_tasks: int = 1
    capacity_concurrent_tasks: int = 4
    capacity_global_rate: int = 1_000_000
    ready_timeout_s: float = 60.0
    seed: int = 1


SETTINGS: Final = {
    "smoke": Settings(
        "smoke",
        processes=2,
        hot_s=2.0,
        zipf_s=2.0,
        storm_rounds=1,
        storm_round_s=1.5,
        capacity_s=1.0,
        latency_samples=300,
        capacity_concurrent_tasks=0,
        bucket_time_scale=0.2,  # a 1 s message bucket: the hot workload sees a few windows
        gap_s=0.5,
        global_warmup_s=0.5,
        global_cooldown_s=0.25,
    ),
    "quick": Settings(
        "quick",
        processes=8,
        hot_s=9.0,
        zipf_s=9.0,
        storm_rounds=2,
        storm_round_s=2.7,
        capacity_s=2.5,
        latency_samples=3000,
    ),
    "full": Settings(
        "full",
        processes=8,
        hot_s=40.0,
        zipf_s=30.0,
        storm_rounds=5,
        storm_round_s=3.0,
        capacity_s=10.0,
        latency_samples=20_000,
    ),
}


def attempted_figures(
    settings: Settings,
    backends: Sequence[str],
    peers: Sequence[str],
    workloads: Sequence[str],
    capacity: bool,
) -> list[str]:
    """Every flat figure (`shm.grants_per_s`) a run of these options measures, from the options alone
    (not from what came back: a variant that failed, or Redis that did not start, still attempted)."""

    def http(engine: bool) -> list[str]:
        if not workloads:
            return []
        names = [*HTTP_FIGURES]
        names += HOT_FIGURES if "hot" in workloads else ()
        if "zipf" in workloads:
            names += [*ZIPF_FIGURES, *(ENGINE_ZIPF_FIGURES if engine else ())]
        return [*names, *(ENGINE_HTTP_FIGURES if engine else ())]

    out: list[str] = []
    for backend in backends:
        names = http(engine=True)
        if capacity:
            names += [*CAPACITY_FIGURES, *(LATENCY_FIGURES if settings.latency_samples else ())]
            names += CONCURRENT_FIGURES if settings.capacity_concurrent_tasks else ()
        out += [f"{backend}.{name}" for name in names]
    for peer in peers:
        out += [f"peer.{peer}.{name}" for name in http(engine=False)]
    return out


def message_shape(settings: Settings) -> tuple[int, float]:
    """(limit, window seconds) of the simulator's message-create counter under the run's time scale."""
    catalogue = RouteCatalogue(SIMULATOR_SEED, time_scale=settings.bucket_time_scale)
    shape = catalogue.groups[MESSAGE_GROUP].shape
    return shape.limit, shape.window_s
