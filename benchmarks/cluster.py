"""Cluster failover benchmark: `python -m benchmarks cluster [--quick] [--smoke] [--json PATH] [--logs DIR]`.

How long a cluster (`CLUSTER_MODE=redis`) takes to bring back the shards of a node that dies. The simulator,
a redis-server of the suite's own, and `nodes` cluster nodes (`benchmarks.cluster_nodes`: supervisors in
process groups of their own, `--workers 1` each, null broker, `CLUSTER_LEASE_TTL=5s`) share `shards` shards.
Once every shard runs exactly once, READY, and every node owns its quota of groups, the node with the most
shards is SIGKILLed with its workers (its whole process group, as a host dies); its leases expire after the
TTL, the other nodes take its groups and RESUME their sessions. A new node then joins (its share handed
over by RESUME) and the cluster balances again before the next sample; that is not measured.

- `failover_s`: from the kill to the last of the dead node's shards RESUMED, both in the simulator's ledger
  (its clock): the first close of one of those shards' connections (the kernel closes a killed process's
  sockets at once) to the last of their first successful RESUMEs. Median of the samples (3; 1 in
  `--smoke`); each sample is under `runs`. Target: at most the TTL + 5 s (the lease runs out at most one
  TTL after its last renewal; the others' next sync, a worker's start and the RESUME take the rest).
- `identifies_per_failover`: IDENTIFYs the simulator accepted from each kill until the cluster is balanced
  without the dead node, per failover. Target 0: every session is resumed, none started anew.
- `resumes_per_failover`: successful RESUMEs in the same windows, per failover (the dead node's shards).
- `overlaps`: the simulator's `shard_overlaps` over the whole run (a connection that began to serve a shard
  another connection still served). Target 0.
- `lease_ttl_s`, `nodes`, `shards`: the configuration.

Results: `cluster.{failover_s, identifies_per_failover, resumes_per_failover, overlaps, lease_ttl_s, nodes,
shards}`, plus `targets`, `verdicts`, `errors`, the samples under `runs` and the machine; a figure not
measured is None (its target ERROR). Targets are informational: the exit status is 0 unless no sample was
measured (with `--strict`, 3 when a verdict is FAIL or ERROR).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from benchmarks.children import free_port
from benchmarks.cluster_nodes import Cluster, NodeProcess, open_cluster
from benchmarks.faults.cluster import failover_s, ledger_marks, wait_balanced
from benchmarks.faults.system import redis_server
from benchmarks.harness import (
    BenchmarkError,
    Progress,
    SimulatorProcess,
    add_common_arguments,
    machine_info,
    open_simulator_process,
    run_or_error,
    write_results,
)
from benchmarks.targets import Target, format_figures, nest, strict_status, verdict_summary, verdicts

DESCRIPTION: Final = "cluster mode: a dead node's shards resumed elsewhere (failover time, identifies)"
LEASE_TTL_S: Final = 5.0
#: After the lease ran out: the others' next sync, a worker's start and the RESUME.
TAKEOVER_S: Final = 5.0
#: How long a failover may take before the sample fails (it is judged against the target afterwards).
FAILOVER_TIMEOUT_S: Final = 60.0
POLL_S: Final = 0.1


@dataclass(frozen=True, slots=True)
class Settings:
    name: str
    shards: int
    nodes: int
    samples: int


SETTINGS: Final = {
    "smoke": Settings("smoke", 4, 3, 1),
    "quick": Settings("quick", 8, 3, 3),
    "full": Settings("full", 16, 3, 3),
}


@dataclass(frozen=True, slots=True)
class Failover:
    """One sample: the node killed, its shards, and what the simulator saw."""

    node: str
    shards: list[int]
    failover_s: float
    identifies: int
    resumes: int
    #: Wall seconds from the kill until the cluster was balanced without the node (nodes' own view).
    balanced_after_s: float


@dataclass(slots=True)
class Bench:
    settings: Settings
    log_dir: Path
    progress: Progress
    errors: dict[str, str] = field(default_factory=dict)
    overlaps: int | None = None


def simulator_args(settings: Settings) -> list[str]:
    return [
        *("--shard-count", str(settings.shards), "--max-concurrency", str(settings.shards)),
        *("--session-start-total", "1000", "--session-start-remaining", "1000"),
        *("--guilds-per-shard", "1", "--event-rate", "10", "--heartbeat-interval-ms", "41250"),
    ]


def counter(ledger: dict[str, Any], name: str) -> int:
    return int(ledger["counters"].get(name, 0))


async def sample(
    bench: Bench, sim: SimulatorProcess, cluster: Cluster, running: list[NodeProcess], index: int
) -> Failover:
    """Kill the node with the most shards; measure until its shards are resumed and the cluster balanced."""
    settings = bench.settings
    owned = {node.node_id: await node.health() for node in running}
    node = max(running, key=lambda n: (len(h.serving) if (h := owned[n.node_id]) else 0, n.node_id))
    health = owned[node.node_id]
    shards = list(health.serving) if health is not None else []
    if not shards:
        raise BenchmarkError(f"no node holds a shard ({owned})")
    before = await sim.gateway_ledger()
    marks = ledger_marks(before)
    killed_at = time.monotonic()
    await node.kill9()
    running.remove(node)
    value: float | None = None
    with trio.move_on_after(FAILOVER_TIMEOUT_S):
        while True:  # polling: the ledger has no change notification
            value = failover_s(await sim.gateway_ledger(), shards, marks)
            if value is not None:
                break
            await trio.sleep(POLL_S)
    if value is None:
        raise BenchmarkError(
            f"sample {index}: the shards {shards} of {node.node_id} were not all resumed within "
            f"{FAILOVER_TIMEOUT_S:g} s of its kill"
        )
    await wait_balanced(cluster, running, settings.shards)
    balanced_after_s = time.monotonic() - killed_at
    after = await sim.gateway_ledger()
    result = Failover(
        node.node_id,
        shards,
        value,
        counter(after, "identifies_accepted") - counter(before, "identifies_accepted"),
        counter(after, "resumes_ok") - counter(before, "resumes_ok"),
        round(balanced_after_s, 3),
    )
    bench.progress.say(
        f"  sample {index}: killed {node.node_id} (shards {shards}): failover {result.failover_s:.2f} s, "
        f"{result.identifies} identifies, {result.resumes} resumes; balanced after {balanced_after_s:.1f} s"
    )
    return result


async def run_samples(bench: Bench) -> list[Failover]:
    settings = bench.settings
    bench.log_dir.mkdir(parents=True, exist_ok=True)
    redis_port = free_port()
    redis = redis_server(redis_port, bench.log_dir)
    samples: list[Failover] = []
    async with open_simulator_process(simulator_args(settings), log_dir=bench.log_dir) as sim:
        await redis.open()
        try:
            async with open_cluster(
                sim.rest_url,
                bench.log_dir / "nodes",
                redis_url=f"redis://127.0.0.1:{redis_port}",
                lease_ttl_s=LEASE_TTL_S,
                cleanup=False,  # the redis-server is the benchmark's own
            ) as cluster:
                running: list[NodeProcess] = []
                starts = 0

                async def start_node() -> None:
                    nonlocal starts
                    starts += 1
                    running.append(
                        await cluster.start(f"node-{starts:02d}", "--shards", str(settings.shards))
                    )

                for _ in range(settings.nodes):
                    await start_node()
                await wait_balanced(cluster, running, settings.shards)
                for index in range(1, settings.samples + 1):
                    result = await run_or_error(
                        f"sample{index}",
                        bench.errors,
                        bench.progress,
                        sample,
                        bench,
                        sim,
                        cluster,
                        running,
                        index,
                    )
                    if result is None:
                        break
                    samples.append(result)
                    if index < settings.samples:
                        await start_node()
                        await wait_balanced(cluster, running, settings.shards)
                ledger = await sim.gateway_ledger()
                bench.overlaps = counter(ledger, "shard_overlaps") or int(
                    ledger.get("rules_broken", {}).get("shard_served_twice", 0)
                )
        finally:
            await redis.close()
    return samples


def targets_for() -> dict[str, Target]:
    return {
        "cluster.failover_s": Target("<=", LEASE_TTL_S + TAKEOVER_S),
        "cluster.identifies_per_failover": Target("==", 0),
        "cluster.overlaps": Target("==", 0),
    }


def target_keys(size: str) -> tuple[str, ...]:
    """The figures this suite judges at `size` (the same at every size), without running it."""
    return tuple(targets_for())


def figures_of(settings: Settings, samples: list[Failover], overlaps: int | None) -> dict[str, float | None]:
    count = len(samples)
    return {
        "cluster.failover_s": round(statistics.median(s.failover_s for s in samples), 3) if samples else None,
        "cluster.identifies_per_failover": sum(s.identifies for s in samples) / count if count else None,
        "cluster.resumes_per_failover": sum(s.resumes for s in samples) / count if count else None,
        "cluster.overlaps": overlaps,
        "cluster.lease_ttl_s": LEASE_TTL_S,
        "cluster.nodes": settings.nodes,
        "cluster.shards": settings.shards,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "cluster", "8 shards on 3 nodes, 3 failovers (about 2 minutes)")


def run(args: argparse.Namespace) -> int:
    settings = SETTINGS["smoke" if args.smoke else "quick" if args.quick else "full"]
    json_path: Path = args.json
    progress = Progress()
    bench = Bench(settings, args.logs or json_path.parent / "cluster-logs", progress)
    machine = machine_info()
    progress.say(
        f"cluster benchmark ({settings.name}): {settings.shards} shards on {settings.nodes} nodes, "
        f"{settings.samples} failovers, lease TTL {LEASE_TTL_S:g} s; logs in {bench.log_dir}"
    )
    samples: list[Failover] = []
    try:
        samples = trio.run(run_samples, bench)
    except BenchmarkError as exc:
        bench.errors["cluster"] = f"{exc.__class__.__name__}: {exc}"
        progress.say(f"  FAILED: {str(exc).splitlines()[0] if str(exc) else exc!r}")
    figures = figures_of(settings, samples, bench.overlaps)
    targets = targets_for()
    judged = verdicts(figures, targets)
    results: dict[str, Any] = {
        "suite": "cluster",
        "settings": asdict(settings),
        **nest(figures),
        "targets": {key: str(target) for key, target in targets.items()},
        "verdicts": judged,
        "errors": bench.errors,
        "runs": {
            "failover_samples_s": [s.failover_s for s in samples],
            "samples": [asdict(s) for s in samples],
        },
        "notes": {
            "failover_s": "the first close of the killed node's shards to the last of their first successful "
            "RESUMEs after it, in the simulator's ledger; median of the samples",
            "kill": "SIGKILL of the node's whole process group (supervisor and workers)",
            "broker": "null",
        },
        "elapsed_s": round(progress.elapsed_s(), 1),
        "machine": machine,
    }
    write_results(json_path, results)
    print(format_figures(figures, targets, bench.errors))
    print(f"\nwrote {json_path} in {results['elapsed_s']:.0f} s", file=sys.stderr)
    print(verdict_summary(judged), file=sys.stderr)
    return strict_status(0 if samples else 1, judged, args.strict)
