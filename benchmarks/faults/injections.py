"""The faults: what each injection does, how many shards it should bring back and within what bound.

Each injection is `async (System) -> int`, the number of shards that must RESUME or IDENTIFY for the
system to count as recovered (0: none reconnect, recovery is the consumer seeing new events). Bounds come
from anchors gateway.md 6.3 (F1-F16), B5/B6, and ratelimit.md 5.3.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

import httpx
import trio

from benchmarks.faults.permit_holder import holder_ask
from benchmarks.faults.system import (
    CONSUMER_START_TIMEOUT_S,
    HEARTBEAT_INTERVAL_MS,
    INVALID_REQUEST_LIMIT,
    POLL_S,
    Observed,
    Settings,
    System,
)
from benchmarks.harness import (
    BenchmarkError,
    open_child,
    read_line,
)
from benchmarks.simulator.config import DEFAULT_TOKEN
from ratelimit.configured import engine_config, shm_segment_name
from ratelimit.model import EngineConfig, Outcome, Permit, Refusal
from ratelimit.shm import ShmBackend

EXIT_FATAL: Final = 3
#: The consumer's latency on top of a fault's bound (AMQP round trip, a snapshot every 0.2 s).
CONSUMER_SLACK_S: Final = 1.0
#: How long a killed supervisor's workers may take to exit after it (parent-death signal, F16).
WORKER_EXIT_TIMEOUT_S: Final = 10.0
#: Bad requests of each kind the REST mix sends (revoked token, dead webhook, webhook with a bad token).
BAD_REQUESTS_PER_KIND: Final = 300
GOOD_REQUESTS: Final = 300
REST_CONCURRENCY: Final = 16
#: A token the simulator accepts until the suite revokes it (another bot's: its own id, not the bot's).
REVOKED_TOKEN: Final = "MTExMTExMTExMTExMTExMTEx.Gfault.cmV2b2tlZC1ieS10aGUtZmF1bHQtc3VpdGU"
#: The supervisor's default DISCORD_GLOBAL_LIMIT: the shm segment refuses sharers whose tunables differ.
GLOBAL_LIMIT: Final = 50
#: How long a dead process's permit may block its bucket (EngineConfig.lease_s).
LEASE_S: Final = EngineConfig().lease_s
#: The permit holder's start: an interpreter, the engine's imports, the segment opened, the probe granted.
HOLDER_START_S: Final = 3.0
#: How much later than the lease's end the suite may see the grant: its poll (0.1 s) and the scheduler.
BLOCK_TOLERANCE_S: Final = 0.5
#: The supervisor's exit after a fatal close code: the shutdown deadline (SHUTDOWN_TIMEOUT 10 s) and more.
FATAL_EXIT_BOUND_S: Final = 15.0
#: Discord's fatal close codes (anchors gateway.md F): each stops the supervisor with EXIT_FATAL.
FATAL_CLOSE_CODES: Final = (4004, 4010, 4011, 4012, 4013, 4014)
#: F9: commands queued for one shard, and how long the suite watches them go out (a 60 s window and more).
COMMAND_FLOOD: Final = 1000
SEND_WATCH_S: Final = 65.0
SEND_LIMIT: Final = 120
#: F9: how much later than the interval a heartbeat may come while commands wait.
HEARTBEAT_LATE_S: Final = 1.0
MAX_PAYLOAD_BYTES: Final = 4096
#: F14: HELLO timeout 10 s (READY 15 s), the backoff's first delay (up to 2 s), the RESUME and the consumer.
HELLO_BOUND_S: Final = 10.0 + 2.0 + 2.0 + CONSUMER_SLACK_S
READY_BOUND_S: Final = 15.0 + 2.0 + 2.0 + CONSUMER_SLACK_S
#: B6: the zombie found within the interval and the ACK deadline (10 s), the socket aborted (0.5 s), RESUMED
#: within 2 s of that, and the consumer.
BLACKHOLE_BOUND_S: Final = HEARTBEAT_INTERVAL_MS / 1000 + 10.0 + 0.5 + 2.0 + CONSUMER_SLACK_S
#: F15: a stall the worker must ride out without a reconnect.
SHORT_STALL_S: Final = 5.0
#: F13: when the simulator's budget, left at 2, resets.
BUDGET_RESET_S: Final = 12.0
#: F12: how long a replaced worker must stay up while Redis is down (no crash loop).
CRASH_LOOP_WATCH_S: Final = 3.0
#: Recovery bound after an outage ends (RabbitMQ or Redis back): the outage itself is added.
OUTAGE_BOUND_S: Final = 15.0


#: The system a fault runs on: the single supervisor's `System` or the cluster's.
S = TypeVar("S", bound=Observed)


@dataclass(slots=True)
class Fault(Generic[S]):
    """One injection: what it does, how many shard reconnections recovery means, and its bound."""

    name: str
    inject: Callable[[S], Awaitable[int]]
    #: True when every affected shard could RESUME (then 0 identifies is the criterion).
    resumable: bool
    bound_s: float
    anchor: str
    #: True when the bound counts from the end of an outage (the outage's length is added).
    after_outage: bool = False
    #: A fatal close code (F5): the supervisor must stop everything with EXIT_FATAL and never reconnect.
    #: It runs last, since nothing runs after it.
    fatal: bool = False
    #: What the fault does once the system recovered, before the firehose settles and the consumer drains
    #: (heal a partition, wait for a node's exit): part of the fault, judged with it, not timed.
    finish: Callable[[S], Awaitable[None]] | None = None


# -- the faults --------------------------------------------------------------------------------


async def kill_worker(system: System) -> int:
    pids = await system.worker_pids()
    os.kill(pids[0], signal.SIGKILL)
    return system.settings.shards // len(pids)


async def stall_worker(system: System) -> int:
    """SIGSTOP a worker past the supervisor's heartbeat timeout (10 s); it replaces it. SIGCONT after, in
    case it still exists."""
    pids = await system.worker_pids()
    os.kill(pids[0], signal.SIGSTOP)
    await trio.sleep(12.0)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pids[0], signal.SIGCONT)
    return system.settings.shards // len(pids)


async def stall_worker_briefly(system: System) -> int:
    """F15: stop a worker's event loop for SHORT_STALL_S (SIGSTOP, then SIGCONT), under the supervisor's
    heartbeat timeout: its watchdog reports the stall (`worker.loop_stalled`), and the stall is not taken
    for a zombie: no shard reconnects, nothing is replaced."""
    pids = await system.worker_pids()
    reported_before = system.supervisor_log_count("worker.loop_stalled")
    os.kill(pids[0], signal.SIGSTOP)
    try:
        await trio.sleep(SHORT_STALL_S)
    finally:
        os.kill(pids[0], signal.SIGCONT)
    await trio.sleep(2.0)  # the watchdog's report, and any reconnect it might have caused
    reported = system.supervisor_log_count("worker.loop_stalled") - reported_before
    failures = []
    if reported != 1:
        failures.append(f"{reported} worker.loop_stalled reports, not 1")
    if await system.worker_pids() != pids:
        failures.append("a worker was replaced")
    system.notes.update(figures={"stall_reports": reported}, failures=failures)
    return 0


async def rolling_restart(system: System) -> int:
    system.supervisor.running().process.send_signal(signal.SIGHUP)
    return system.settings.shards


def gateway_action(action: str, **body: Any) -> Callable[[System], Awaitable[int]]:
    async def inject(system: System) -> int:
        await system.control(action, body)
        return system.settings.shards

    return inject


async def expire_then_close(system: System) -> int:
    await system.control("expire_sessions", {})
    await system.control("close", {"code": 4000})
    return system.settings.shards


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


async def kill_supervisor(system: System) -> int:
    """kill -9 the supervisor; its workers should go with it (F16); then start a new one, which RESUMEs
    every shard from the sessions in Redis."""
    pids = await system.worker_pids()
    system.supervisor.running().process.kill()
    await system.supervisor.close()
    with trio.move_on_after(WORKER_EXIT_TIMEOUT_S):
        while True:
            if not any(process_alive(pid) for pid in pids):
                break
            await trio.sleep(POLL_S)  # no exit notification for another process's children
    orphans = [pid for pid in pids if process_alive(pid)]
    if orphans:
        # Two live sessions per shard is what F16 forbids: make it visible, then clear the way.
        system.progress.say(f"  workers {orphans} outlived their supervisor by {WORKER_EXIT_TIMEOUT_S:g} s")
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    await system.supervisor.open()
    return system.settings.shards


def outage_s(system: System) -> float:
    return system.settings.outage_s


async def redis_outage(system: System) -> int:
    """Stop the suite's redis-server for `outage_s` and start it again on the same port (empty: no
    persistence, as after a failover to a cold replica)."""
    await system.redis.close()
    await trio.sleep(outage_s(system))
    await system.redis.open()
    return 0


async def rabbitmq_outage(system: System) -> int:
    """`rabbitmqctl stop_app` for `outage_s`, then `start_app` (F11)."""
    await trio.run_process(["rabbitmqctl", "stop_app"], capture_stdout=True, capture_stderr=True)
    try:
        await trio.sleep(outage_s(system))
    finally:
        with trio.CancelScope(shield=True):
            await trio.run_process(["rabbitmqctl", "start_app"], capture_stdout=True, capture_stderr=True)
    return 0


async def kill_permit_holder(system: System) -> int:
    """A process takes the probe permit of a fresh bucket on the supervisor's shm segment and is SIGKILLed
    while holding it; the suite then asks for the same bucket until it is granted, which must happen within
    the permit's lease (ratelimit.md 5.3 scenario 6). The block is judged from the holder's grant (its lease
    starts there) to the suite's grant: `blocked_s` at most the lease and BLOCK_TOLERANCE_S. The fault's
    recovery also counts the holder's start-up. Returns after the grant."""
    segment = shm_segment_name(DEFAULT_TOKEN)
    major = uuid.uuid4().hex
    argv = [sys.executable, "-m", "benchmarks.faults.permit_holder", system.shm_dir, segment]
    argv += [str(GLOBAL_LIMIT), major]
    config = engine_config(GLOBAL_LIMIT)
    ask = holder_ask(major)
    async with open_child("permit-holder", argv, log_dir=system.log_dir, capture_stdout=True) as holder:
        assert holder.process.stdout is not None
        with trio.fail_after(CONSUMER_START_TIMEOUT_S):
            line = await read_line(holder.process.stdout, bytearray())
        if line != b"granted":
            raise BenchmarkError(f"the permit holder was not granted ({line!r}):\n{holder.log_tail()}")
        granted_at = trio.current_time()  # the holder's lease started before it said so
        backend = ShmBackend.open(segment, config, directory=system.shm_dir)
        try:
            first = await backend.acquire(ask)
            if isinstance(first, Permit):
                await backend.release(first, Outcome("cancel"))
                raise BenchmarkError("a second request was granted while the holder's probe was in flight")
            holder.process.kill()
            await holder.process.wait()
            killed_at = trio.current_time()
            with trio.fail_after(3 * config.lease_s):
                while True:
                    result = await backend.acquire(ask)
                    if isinstance(result, Permit):
                        await backend.release(result, Outcome("cancel"))
                        break
                    if isinstance(result, Refusal):
                        raise BenchmarkError(f"refused after the holder's death: {result.reason}")
                    await trio.sleep(min(result.seconds, POLL_S))
            now = trio.current_time()
            blocked_s, after_kill_s = now - granted_at, now - killed_at
        finally:
            await backend.aclose()
    system.progress.say(
        f"  the bucket was granted {blocked_s:.2f} s after the holder's grant, {after_kill_s:.2f} s after"
        f" its kill (lease {config.lease_s:g} s)"
    )
    failures = []
    if blocked_s > config.lease_s + BLOCK_TOLERANCE_S:
        failures.append(f"the bucket stayed blocked {blocked_s:.2f} s > lease {config.lease_s:g} s")
    figures = {"blocked_s": round(blocked_s, 2), "lease_s": config.lease_s}
    system.notes.update(figures=figures, failures=failures)
    return 0


async def rest_invalid_mix(system: System) -> int:
    """The REST mix through the HTTP proxy with a revoked token, dead webhooks (404 10015) and webhooks whose
    token is invalid (401 50027) beside good requests (ratelimit.md 5.3 scenario 7): the simulated IP's
    invalid-request peak stays at or below half of its ban threshold, no ban, and every good request with
    the bot token succeeds (a 50027 does not disable the bot token). 429s are reported by category."""
    control = system.sim.control_url + "/rest"
    await system.http.post(control + "/revoke_token", json={"token": REVOKED_TOKEN})
    dead = [str(9_000_000_000_000_000_000 + n) for n in range(20)]
    bad_token = [str(9_100_000_000_000_000_000 + n) for n in range(5)]
    for webhook_id in dead:
        await system.http.post(control + "/webhook", json={"id": webhook_id, "state": "dead"})
    for webhook_id in bad_token:
        await system.http.post(control + "/webhook", json={"id": webhook_id, "state": "invalid_token"})
    bot = {"Authorization": f"Bot {DEFAULT_TOKEN}"}
    requests: list[tuple[str, str, dict[str, str], str]] = []
    for n in range(max(BAD_REQUESTS_PER_KIND, GOOD_REQUESTS)):
        if n < GOOD_REQUESTS:
            requests.append(("good", "GET", bot, "/users/@me"))
        if n < BAD_REQUESTS_PER_KIND:
            requests.append(("revoked", "GET", {"Authorization": f"Bot {REVOKED_TOKEN}"}, "/users/@me"))
            requests.append(("dead_webhook", "POST", {}, f"/webhooks/{dead[n % len(dead)]}/tok"))
            requests.append(("webhook_401", "POST", {}, f"/webhooks/{bad_token[n % len(bad_token)]}/tok"))
    statuses: dict[str, dict[str, int]] = {}
    send, receive = trio.open_memory_channel[tuple[str, str, dict[str, str], str]](len(requests))
    for request in requests:
        send.send_nowait(request)
    send.close()

    async def caller(client: httpx.AsyncClient) -> None:
        async for kind, method, headers, path in receive:
            try:
                response = await client.request(method, system.proxy_url + path, headers=headers, json=None)
                status = str(response.status_code)
            except httpx.HTTPError as exc:
                status = exc.__class__.__name__
            counts = statuses.setdefault(kind, {})
            counts[status] = counts.get(status, 0) + 1

    async with httpx.AsyncClient(timeout=30.0) as client, trio.open_nursery() as nursery:
        for _ in range(REST_CONCURRENCY):
            nursery.start_soon(caller, client)
    rest = (await system.http.get(system.sim.control_url + "/ledger")).json()["rest"]
    peak = max((int(ip["peak"]) for ip in rest["invalid"].values()), default=0)
    figures = {
        "invalid_peak": peak,
        "invalid_limit": INVALID_REQUEST_LIMIT,
        "invalid_peak_fraction": round(peak / INVALID_REQUEST_LIMIT, 3),
        "bans": len(rest["bans"]),
        "429s": dict(rest["by_category"]),
        "simulator_by_status": rest["by_status"],
        "proxy_answers": statuses,
    }
    failures = []
    if peak > INVALID_REQUEST_LIMIT / 2:
        failures.append(f"invalid-request peak {peak} > half of {INVALID_REQUEST_LIMIT}")
    if rest["bans"]:
        failures.append(f"{len(rest['bans'])} bans")
    good = statuses.get("good", {})
    if good.get("200", 0) != GOOD_REQUESTS:
        failures.append(f"good requests answered {good}")
    system.notes.update(figures=figures, failures=failures)
    system.progress.say(f"  invalid peak {peak}/{INVALID_REQUEST_LIMIT}, proxy answers {statuses}")
    return 0


async def identify_budget_low(system: System) -> int:
    """Leave fewer daily session starts than shards, then send op 7 to every shard: RESUMEs do not spend
    the budget (C3), so every shard must come back with 0 IDENTIFYs. The budget is restored afterwards."""
    await system.control("session_start", {"remaining": 1})
    try:
        await system.control("reconnect", {})
        await trio.sleep(1.0)
    finally:
        await system.control("session_start", {"remaining": 1000})
    return system.settings.shards


async def ledger_counters(system: System) -> dict[str, int]:
    counters: dict[str, int] = (await system.sim.gateway_ledger())["counters"]
    return counters


def counter_delta(before: dict[str, int], after: dict[str, int], name: str) -> int:
    return int(after.get(name, 0)) - int(before.get(name, 0))


async def wait_counter(system: System, name: str, before: dict[str, int], more: int, within_s: float) -> None:
    """Poll the simulator's ledger until counter `name` is `more` above its value in `before`
    (BenchmarkError after `within_s`)."""
    at_least = int(before.get(name, 0)) + more
    with trio.move_on_after(within_s):
        while int((await ledger_counters(system)).get(name, 0)) < at_least:
            system.check_alive()
            await trio.sleep(POLL_S)
        return
    raise BenchmarkError(f"the simulator's {name} did not reach {at_least} within {within_s:g} s")


async def send_limiter(system: System) -> int:
    """F9: COMMAND_FLOOD presence updates queued for shard 0 on the broker; for SEND_WATCH_S (a full 60 s
    window and more) the simulator must never see more than 120 payloads per connection per 60 s (no 4008),
    and heartbeats must keep their interval (the largest gap between two stays under the interval plus
    HEARTBEAT_LATE_S). What is still queued afterwards is purged."""
    await system.control("reset_maxima")
    ledger_before = await system.sim.gateway_ledger()
    before = ledger_before["counters"]
    body = {"op": 3, "d": {"since": None, "activities": [], "status": "online", "afk": False}}
    await system.publish_commands("0", COMMAND_FLOOD, body)
    await trio.sleep(SEND_WATCH_S)
    ledger_after = await system.sim.gateway_ledger()
    after = ledger_after["counters"]
    await trio.run_process(
        ["rabbitmqctl", "purge_queue", f"{system.group}:0"], capture_stdout=True, capture_stderr=True
    )
    window_max = int(after.get("send_window_max", 0))
    gap_ms = int(after.get("heartbeat_gap_max_ms", 0))
    sent = counter_delta(before, after, "op3_received")
    failures = []
    if window_max > SEND_LIMIT:
        failures.append(f"{window_max} payloads in one 60 s window > {SEND_LIMIT}")
    closes_4008 = counter_delta(ledger_before["closes_sent"], ledger_after["closes_sent"], "4008")
    if closes_4008:
        failures.append(f"{closes_4008} closes with 4008")
    if gap_ms > HEARTBEAT_INTERVAL_MS + HEARTBEAT_LATE_S * 1000:
        failures.append(f"a heartbeat gap of {gap_ms} ms (interval {HEARTBEAT_INTERVAL_MS} ms)")
    if sent < SEND_LIMIT // 2:
        failures.append(f"only {sent} of {COMMAND_FLOOD} commands sent in {SEND_WATCH_S:g} s")
    system.notes.update(
        figures={
            "commands_queued": COMMAND_FLOOD,
            "commands_sent": sent,
            "send_window_max": window_max,
            "heartbeat_gap_max_ms": gap_ms,
            "closes_4008": closes_4008,
        },
        failures=failures,
    )
    system.progress.say(
        f"  {sent} commands sent in {SEND_WATCH_S:g} s, at most {window_max} payloads per 60 s, "
        f"largest heartbeat gap {gap_ms} ms"
    )
    return 0


async def oversized_command(system: System) -> int:
    """F10: a command whose JSON is over 4096 bytes is rejected by the worker (logged, not sent, the
    delivery rejected without requeue), and a normal command after it still goes out on the same, still
    open connection."""
    await system.control("reset_maxima")
    ledger_before = await system.sim.gateway_ledger()
    before = ledger_before["counters"]
    rejections_before = system.supervisor_log_count("command.rejected")
    big = {"op": 3, "d": {"since": None, "activities": [], "status": "online", "afk": False}}
    big["d"]["padding"] = "x" * 5000  # type: ignore[index]
    await system.publish_commands("0", 1, big)
    small = {"op": 3, "d": {"since": None, "activities": [], "status": "idle", "afk": False}}
    await system.publish_commands("0", 1, small)
    await wait_counter(system, "op3_received", before, 1, 10.0)
    ledger = await system.sim.gateway_ledger()
    after = ledger["counters"]
    rejections = system.supervisor_log_count("command.rejected") - rejections_before
    largest = int(after.get("payload_max_bytes", 0))
    failures = []
    if largest > MAX_PAYLOAD_BYTES:
        failures.append(f"the simulator received a {largest}-byte payload")
    if rejections != 1:
        failures.append(f"{rejections} command.rejected log lines, not 1")
    sent = counter_delta(before, after, "op3_received")
    if sent != 1:
        failures.append(f"{sent} commands sent, not 1")
    if counter_delta(ledger_before["closes_sent"], ledger["closes_sent"], "4002"):
        failures.append("the simulator closed a connection with 4002")
    system.notes.update(
        figures={"largest_payload_bytes": largest, "rejections_logged": rejections}, failures=failures
    )
    return 0


def withhold_then_drop(what: str) -> Callable[[System], Awaitable[int]]:
    """F14: the next connection of every shard gets no HELLO (`what` = "hello") or no READY/RESUMED
    ("ready"); every connection is then dropped. Each shard must time out (10 s, 15 s), reconnect with
    backoff, never more than one attempt per second, and RESUME."""

    async def inject(system: System) -> int:
        shards = system.settings.shards
        before = await ledger_counters(system)
        await system.control(f"withhold_{what}", {"count": shards})
        started = time.monotonic()
        await system.control("drop")
        await wait_counter(system, f"{what}_withheld", before, shards, 10.0)
        await wait_counter(system, "resumes_ok", before, shards, 60.0)
        elapsed = time.monotonic() - started
        attempts = counter_delta(before, await ledger_counters(system), "connections")
        failures = []
        # Per shard: the withheld attempt and the one that resumed, at least 1 s apart (B, F14).
        if attempts > shards * (math.floor(elapsed) + 1):
            failures.append(f"{attempts} connection attempts by {shards} shards in {elapsed:.1f} s")
        system.notes.update(figures={"connection_attempts": attempts, "withheld": shards}, failures=failures)
        return 0

    return inject


async def switch_to_zstd_then_corrupt(system: System) -> int:
    """F8: restart the supervisor with `GATEWAY_COMPRESSION=zstd-stream` (a graceful restart: every shard
    RESUMEs, now over zstd-stream), then send every shard a corrupt zstd message: close non-1000, RESUME.
    The faults after this one run on zstd-stream."""
    before = await ledger_counters(system)
    system.supervisor_env["GATEWAY_COMPRESSION"] = "zstd-stream"
    await system.restart_supervisor()
    shards = system.settings.shards
    await wait_counter(system, "resumes_ok", before, shards, 60.0)
    zstd = counter_delta(before, await ledger_counters(system), "connections.zstd-stream")
    if zstd < shards:
        raise BenchmarkError(f"{zstd} zstd-stream connections after the restart, not {shards}")
    await system.control("corrupt")
    return 2 * shards


async def redis_outage_worker_kill(system: System) -> int:
    """F12 with a worker killed while Redis is down: its successor cannot read the sessions, so it
    IDENTIFYs through the supervisor's queue (at most one per shard); no crash loop (the new worker is
    still the same process a while after). Redis comes back once the shards are READY."""
    before = await ledger_counters(system)
    await system.redis.close()
    try:
        pids = await system.worker_pids()
        os.kill(pids[0], signal.SIGKILL)
        affected = system.settings.shards // len(pids)
        await wait_counter(system, "identifies_accepted", before, affected, 30.0)
        replaced = await system.worker_pids()
        await trio.sleep(CRASH_LOOP_WATCH_S)
        if await system.worker_pids() != replaced:
            system.notes.setdefault("failures", []).append("a worker restarted again while Redis was down")
    finally:
        await system.redis.open()
    return affected


async def identify_budget_exhausted(system: System) -> int:
    """F13: with 2 IDENTIFYs left of the day (below SESSION_START_RESERVE) a restarted supervisor still
    starts, since every shard RESUMEs; then every session is invalidated. The gate spends the 2, alerts
    (`supervisor.identify_budget_exhausted`) and holds the other shards until the budget resets
    (BUDGET_RESET_S later) instead of exceeding it, which would reset the token: no IDENTIFY refused."""
    shards = system.settings.shards
    before = await ledger_counters(system)
    await system.control("session_start", {"remaining": 2, "reset_after_ms": int(BUDGET_RESET_S * 1000)})
    await system.restart_supervisor()
    await wait_counter(system, "resumes_ok", before, shards, 30.0)
    await system.control("invalidate", {"resumable": False})
    await wait_counter(system, "identifies_accepted", before, shards, 3 * BUDGET_RESET_S)
    after = await ledger_counters(system)
    alerts = system.supervisor_log_count("supervisor.identify_budget_exhausted")
    failures = []
    refused = counter_delta(before, after, "identifies_refused")
    if refused:
        failures.append(f"{refused} IDENTIFYs refused")
    if alerts < 1:
        failures.append("no supervisor.identify_budget_exhausted alert")
    system.notes.update(figures={"budget_alerts": alerts}, failures=failures)
    return shards


def faults_for(settings: Settings) -> list[Fault[System]]:
    everything: list[Fault[System]] = [
        Fault("worker_kill9", kill_worker, True, 3.0 + CONSUMER_SLACK_S, "F1"),
        Fault("rolling_restart", rolling_restart, True, 60.0, "F2"),
        Fault("op7_storm", gateway_action("reconnect"), True, 10.0, "F3"),
        Fault("op9_resumable", gateway_action("invalidate", resumable=True), True, 10.0, "F4"),
        # B5 bound with max_concurrency = shards: 2 s, plus the 1-5 s jitter of E3.
        Fault("op9_not_resumable", gateway_action("invalidate", resumable=False), False, 10.0, "F4"),
        Fault("corrupt", gateway_action("corrupt"), True, 5.0, "F7"),
        Fault("corrupt_zstd", switch_to_zstd_then_corrupt, True, 20.0, "F8"),
        *(
            Fault(f"close_{code}", gateway_action("close", code=code), True, 5.0, "F5")
            for code in (1000, 1001, 4000, 4001, 4002)
        ),
        *(
            Fault(f"close_{code}", gateway_action("close", code=code), False, 10.0, "F5")
            for code in (4003, 4005, 4007, 4008, 4009)
        ),
        Fault("drop", gateway_action("drop"), True, 5.0, "F5 RST"),
        # B6: detection within I + 10 s, RESUMED within 2 s more.
        Fault("blackhole", gateway_action("blackhole"), True, BLACKHOLE_BOUND_S, "B6"),
        Fault("expire_sessions", expire_then_close, False, 10.0, "F6"),
        Fault("loop_stall_5s", stall_worker_briefly, True, SHORT_STALL_S + 2.0 + 3.0, "F15"),
        Fault("worker_stall", stall_worker, True, 12.0 + 3.0 + CONSUMER_SLACK_S, "F15"),
        Fault("supervisor_kill9", kill_supervisor, True, 10.0, "F16"),
        Fault(
            "ratelimit_holder_kill9",
            kill_permit_holder,
            True,
            HOLDER_START_S + LEASE_S + CONSUMER_SLACK_S,
            "RL 5.3-6",
        ),
        Fault("rest_invalid_mix", rest_invalid_mix, True, 30.0, "RL 5.3-7"),
        Fault("identify_budget_low", identify_budget_low, True, 10.0, "F13"),
        Fault("identify_budget_exhausted", identify_budget_exhausted, False, BUDGET_RESET_S + 15.0, "F13"),
        # Before send_limiter, whose leftover commands keep shard 0's send window full for a minute.
        Fault("oversized_command", oversized_command, True, 10.0, "F10"),
        Fault("send_limiter", send_limiter, True, SEND_WATCH_S + 5.0, "F9"),
        Fault("timeout_hello", withhold_then_drop("hello"), True, HELLO_BOUND_S, "F14"),
        Fault("timeout_ready", withhold_then_drop("ready"), True, READY_BOUND_S, "F14"),
        Fault("redis_outage", redis_outage, True, OUTAGE_BOUND_S, "F12", after_outage=True),
        Fault("redis_outage_worker_kill", redis_outage_worker_kill, False, 20.0, "F12"),
        Fault("rabbitmq_outage", rabbitmq_outage, True, OUTAGE_BOUND_S, "F11", after_outage=True),
        *(
            Fault(
                f"close_{code}_fatal",
                gateway_action("close", code=code),
                False,
                FATAL_EXIT_BOUND_S,
                "F5",
                fatal=True,
            )
            for code in FATAL_CLOSE_CODES
        ),
    ]
    if settings.faults is None:
        return everything
    return [fault for fault in everything if fault.name in settings.faults]


def in_running_order(faults: list[Fault[S]]) -> list[Fault[S]]:
    """Fatal faults last (stable otherwise): nothing runs after one."""
    return sorted(faults, key=lambda fault: fault.fatal)
