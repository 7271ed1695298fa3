"""Ratelimit benchmark (anchors/ratelimit.md 5, issue 5 item 6): `python -m benchmarks ratelimit [--quick]`.

Setup. For each variant a fresh simulator in its own process (Discord's rules; a lognormal answer latency,
median `latency_ms`, sigma `latency_sigma`; bucket windows scaled by `bucket_time_scale`; `global_rate`
requests per second per token) and `processes` client processes that share one limiter:

- `shm`, `redis`: our engine, `ratelimit.RatelimitedTransport` over httpx (benchmarks/ratelimit/client.py).
  The suite creates the shm segment (its owner; the clients open it by name) and removes it at the end.
  Redis is a redis-server the suite starts on a free port (`--redis-url` to use another); each variant
  gets its own key prefix, deleted at the end.
- `peer.discordpy`, `peer.hikari`: each library's own REST client (benchmarks/peers/rest_bench.py), one
  per process, each process limiting itself (neither library shares limits between processes).

Every variant runs the same seeded plan (benchmarks/ratelimit/workloads.py: the same calls at the same
offsets after one start signal, open-loop Poisson arrivals, at most `max_outstanding` calls per workload
per process, the rest shed), one workload window after another, each on a client of its own:

- (a) hot bucket: every process posts to one channel (`POST /channels/{id}/messages`); together they offer
  `hot_factor` times the rate that counter allows;
- (b) Zipf: message creates over `zipf_channels` channels (exponent `zipf_exponent`) offered at
  `zipf_factor` times the global rate, so the global limit binds;
- (d) interaction callbacks (`POST /interactions/{id}/{token}/callback`, global-exempt, a new interaction
  each) at `interaction_rate` per second during (b);
- (c) first-contact storm: `storm_rounds` times, every process sends `storm_per_route` requests at once to
  each of three routes (limits 1, 5 and 10) on resources nobody has touched (round 0: routes never seen).

Capacity (our engine only; no HTTP, no simulator): the processes acquire and release as fast as they can
over buckets of their own (limits too large to run out, global rate `capacity_global_rate`) with
`capacity_tasks` tasks each, then one process alone times sequential acquires; a second run repeats the
first part with `capacity_concurrent_tasks` tasks per process.

Figures (per variant: `shm.*`, `redis.*`, `peer.discordpy.*`, `peer.hikari.*`):

- `avoidable_429_per_10k`: the simulator ledger's `avoidable` 429s per 10,000 requests it answered in the
  variant's run (a 429 on a counter whose state the token had already been told). `first_contact_429`,
  `global_429`, `shared_429`, `sublimit_429`, `ban_429`: counts of the other categories; `requests`.
  `bans`: Cloudflare-style bans of the client's IP (10,000 invalid requests, 401/403/non-shared 429, in
  10 minutes). A ban is lifted after the workload window it happened in, so the next one is measured.
- `global_utilization`: successful global-counted requests (every route but interaction callbacks)
  arriving during the steady part of workload (b) (from `global_warmup_s` after its first request to
  `global_cooldown_s` before its end), per second, divided by the configured global rate. The details
  add the gaps between those arrivals and, for our engine, its pacing interval and the utilization that
  interval allows (its ceiling: `1 / (1 + M)` for its margin `M` of about 44 ms per second, the jitter
  margin plus the GCRA tolerance; ratelimit/global_limit.py explains both), and `window_headroom_ms`:
  the shortest span of `global_rate + 1` consecutive arrivals the simulator counted toward the global
  limit, less 1 s, i.e. how close the busiest window came to a global 429 (0 for a client that sends at
  exactly the limit; our engine's margin less the compression its requests met between grant and arrival).
  Measured on a loaded 2-core VM, margins of 15 and 30 ms (ceilings 98.5 % and 97.1 %) met 1-9 global
  429s per run, so the default keeps 44 ms (95.8 %) and the 0.98 targets of issue 17 are not met there.
- `hot_bucket_utilization`: for workload (a)'s successes, with the simulator's shape of that counter
  (`L` requests per `W` seconds, scaled): `((N - L) / (t_N - t_1)) / (L / W)`, where `t_1`, `t_N` are
  the arrivals of the first and last success. A counter starts full (`L` at once), then admits at most
  `L / W` per second, so this is the sustained fraction of the allowed rate, 1.0 at best, independent
  of where the run's start and end fall in a window.
- `interaction_wait_p50_ms`, `interaction_wait_p99_ms` (our engine): the `acquire` of each interaction
  callback during (b), timed inside the client; `interaction_latency_p50_ms`/`_p99_ms` (every variant):
  the call from start to answer (the simulator's latency included). `fallback_grants` (our engine):
  grants made by the conservative local limits while the shared backend did not answer (each process
  then keeps `1 / processes` of the global rate).
- `acquire_p50_us`, `acquire_p99_us`: one process alone, sequential `Ratelimiter.acquire` calls on known
  buckets with capacity available (no waiting: the latency the engine adds to every request);
  `loaded_acquire_p50_us`/`_p99_us`: the same timing during the capacity run. `grants_per_s`: grants of
  all processes of the capacity run per second (each grant also released). `concurrent_*`: the same with
  `capacity_concurrent_tasks` tasks per process.

Per variant, `runs` holds each workload's ledger counts, the clients' own counts (scheduled, shed,
completed, cancelled at the window's end), the cores the clients and the simulator used, and our engine's
wait and backend counters. Every figure the options chose (`--backends`, `--peers`, `--workloads`,
`--no-capacity`) that a failed measurement did not produce is None, so its target is ERROR; figures not
chosen have no verdict. Targets (issue 5; informational: the exit status is 0 unless every figure failed;
with `--strict`, 3 when a verdict is FAIL or ERROR): 0 avoidable and 0 first-contact 429s, global and
hot-bucket utilization >= 0.98 (issue 17), interaction wait p99 <= 1 ms (anchors 5.5), shm acquire p50
<= 50 us, Redis acquire p50 <= 1 ms, >= 20,000 grants/s on shm and >= 5,000/s on Redis. Other work on
the machine moves every timing figure: the load average is in `machine`.
"""

from benchmarks.ratelimit.settings import SETTINGS, TARGETS
from benchmarks.ratelimit.suite import DESCRIPTION, add_arguments, run, target_keys

__all__ = ["DESCRIPTION", "SETTINGS", "TARGETS", "add_arguments", "run", "target_keys"]
