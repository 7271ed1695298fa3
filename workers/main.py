"""`python -m workers`: the shards of one range, their publisher, session store and command source.

Standalone (tests, benchmarks) it is its own identify gate and session store; under the supervisor the
same process gets those over its control channel (the supervisor issue). Exit status: 0 clean stop, 2 bad
configuration (the message names the key), 3 a fatal close code or a refused token, 1 anything else.

Lifetimes, outermost first: the session store, the
publisher, the REST proxy's limiter, the publish pump, then one nursery with a `ShardRunner` per shard, the
command source and the REST proxy fronts (`workers.rest_proxy`). SIGTERM/SIGINT stop the shards with a
resumable close and drain the REST proxy (its requests in flight finish, or go back to the queue when never
sent) in parallel, then drain the pump (so committed seqs are final) and flush the store before the process
exits.

The stop takes at most `GRACEFUL_STOP_S`, whatever the broker or Redis do: the shards, the REST proxy and the
pump share its first `GRACEFUL_STOP_S - SESSION_SAVE_S`, and the store gets the rest to save the committed
seqs. What cannot be published or saved by then is logged and left behind; that is safe (the next RESUME
starts from an older seq and Discord replays the rest; consumers dedupe), while waiting on an outage would
only get the worker killed. An error escaping everything is logged (redacted) before exit status 1.

Live resharding (`workers.reshard`): a `shadow` worker starts its command source only at the supervisor's
`GoLive` (until which an `Uncovered` has its shadow buffers keep the events of the old generation's stopped
shards); a `Retire` stops the command source, has the `Cutover` drain and report, then stops the shards
like a signal does but with close code 1000 and their sessions deleted (exit 0). With
`ShardAssignment.reshard`, close 4011 stops only its shard, which is reported (`ShardingRequired`); the
worker runs on, also once every shard of it has stopped so, until the supervisor stops or retires it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Final

import trio

from . import logs
from .amqp_bridge import Amqp, AmqpConnectError, open_amqp
from .command_consumer import consume_amqp_commands
from .commands import GatewayCommand, read_stdin_commands
from .config import WorkerConfig, standalone_config
from .control import SupervisorGone, SupervisorLink, control_fd_from_env, open_supervisor_link
from .control_messages import GoLive, Retire, ShardingRequired, ShardStatistics, Uncovered
from .dependencies import open_when_up
from .errors import CommandRejected, ConfigError, FatalCloseCode
from .exit_status import ExitStatus
from .gateway_bot import GatewayBotError, fetch_gateway_bot
from .identify import IDENTIFY_INTERVAL_S, IDENTIFY_MARGIN_S, IdentifyGate, InMemoryIdentifyGate
from .publish.amqp import AmqpPublisher
from .publish.base import OutboundEvent, Publisher
from .publish.null import NullPublisher
from .publish.pump import PublishPump, open_publish_pump
from .publish.stdio import StdioPublisher
from .reshard import SHARDING_REQUIRED_CLOSE_CODE, Cutover
from .rest_proxy import WorkerRestProxy, open_worker_rest_proxy
from .sessions import CLOSE_FLUSH_TIMEOUT_S, InMemorySessionStore, SessionStore, open_redis_session_store
from .setting_formats import parse_int, parse_shard_count, parse_shard_ids
from .shard import CommandAck, ShardRunner
from .telemetry import (
    ShardMetricsFeed,
    count_stall,
    feed_rest_metrics,
    metrics_enabled,
    observe_confirmed,
    watch_event_loop,
)

LOGGER: Final = logging.getLogger("workers")
#: Events the publish pump may hold per shard before shards stop reading (bounded memory).
PUMP_EVENTS_PER_SHARD: Final = 2048
PUMP_MIN_CAPACITY: Final = 8192
#: From SIGTERM/SIGINT to the end of `run_worker`, at most.
GRACEFUL_STOP_S: Final = 10.0
#: The last part of GRACEFUL_STOP_S: saving the committed seqs once the pump has drained (the Redis store's
#: own close flush takes this long at most).
SESSION_SAVE_S: Final = CLOSE_FLUSH_TIMEOUT_S
#: Of GRACEFUL_STOP_S, how long REST proxy requests in flight get to finish before they are settled
#: (requeued when not yet sent, else answered); settling itself takes at most a few seconds more.
PROXY_GRACE_S: Final = 4.0


@contextlib.asynccontextmanager
async def _open_store(config: WorkerConfig, link: SupervisorLink | None) -> AsyncIterator[SessionStore]:
    """The configured session store, which saves what is pending on a normal exit, within SESSION_SAVE_S."""
    if config.settings.shard_store_type == "redis":
        # It flushes on close, within CLOSE_FLUSH_TIMEOUT_S, and logs which sessions it could not save.
        async with open_redis_session_store(
            config.settings.redis_url,
            prefix=config.settings.shard_store_prefix,
            pool_size=config.settings.redis_pool_size,
            shard_count=config.shard_count,
        ) as store:
            yield store
    elif link is not None:
        yield link  # the supervisor holds the sessions, so a replaced worker RESUMEs
        with trio.move_on_after(SESSION_SAVE_S) as scope:
            await link.flush()
        if scope.cancelled_caught:
            LOGGER.error("worker.sessions_unsaved", extra={"timeout_s": SESSION_SAVE_S})
    else:
        yield InMemorySessionStore()


@contextlib.asynccontextmanager
async def _open_broker(config: WorkerConfig) -> AsyncIterator[tuple[Publisher, Amqp | None]]:
    """The configured event sink, and the AMQP connection when there is one (commands use it too)."""
    if config.settings.broker_type == "amqp":
        url = config.settings.amqp_url
        # A broker that is not up yet is waited for, not a crash (workers.dependencies).
        async with open_when_up("amqp", url, lambda: open_amqp(url), (AmqpConnectError,)) as amqp:
            yield (
                AmqpPublisher(
                    amqp,
                    group=config.settings.broker_group,
                    encoding=config.settings.broker_encoding,
                    message_ttl_s=config.settings.broker_message_timeout_s,
                ),
                amqp,
            )
    elif config.settings.broker_type == "null":
        yield NullPublisher(), None
    else:
        yield StdioPublisher(), None


def _ignore_stall(_seconds: float) -> None:
    """Without metrics a stall is only logged."""


async def run_worker(
    config: WorkerConfig,
    *,
    link: SupervisorLink | None = None,
    publisher: Publisher | None = None,
    pump_capacity: int | None = None,
    task_status: trio.TaskStatus[dict[int, ShardRunner]] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Run every shard of `config` until a signal or a fatal close code; returns the exit status.

    `link` is the control channel when the supervisor started this worker (its identify gate, its
    session book with `memory`, and where heartbeats go). `publisher` replaces the configured sink and
    `pump_capacity` the pump's size (tests and benchmarks); `task_status` reports the shard runners once they
    are starting.
    """
    _register_secrets(config)
    gateway_url, max_concurrency = config.assignment.gateway_url, config.assignment.max_concurrency
    if not gateway_url or not max_concurrency:
        info = await fetch_gateway_bot(config.settings.api_url, config.settings.token)
        gateway_url = gateway_url or info.url
        max_concurrency = max_concurrency or info.max_concurrency
    runners: dict[int, ShardRunner] = {}
    cutover: Cutover | None = None

    metrics = metrics_enabled()
    feed = ShardMetricsFeed(runners) if metrics else None

    def on_confirmed(batch: Sequence[OutboundEvent]) -> None:
        for event in batch:
            runner = runners.get(event.shard_id)
            if runner is not None:
                runner.on_confirmed(event)
        if cutover is not None:
            cutover.on_confirmed(batch)
        if metrics:
            observe_confirmed(batch)

    def shard_stats() -> dict[int, ShardStatistics]:
        return {shard: runner.statistics() for shard, runner in runners.items()}

    if link is not None:
        link.stats = shard_stats
    status: int = ExitStatus.ERROR  # unless the shards run and stop (the supervisor may vanish first)
    capacity = pump_capacity or max(PUMP_MIN_CAPACITY, PUMP_EVENTS_PER_SHARD * len(config.shard_ids))
    async with _open_stop_request() as stop:
        with stop.startup:
            async with (
                _open_store(config, link) as store,
                _open_broker(config) as (sink, amqp),
                open_worker_rest_proxy(config, amqp, supervised=link is not None) as rest,
            ):
                gate: IdentifyGate = (
                    link
                    if link is not None
                    else InMemoryIdentifyGate(max_concurrency, IDENTIFY_INTERVAL_S + IDENTIFY_MARGIN_S)
                )
                async with open_publish_pump(
                    publisher or sink, capacity=capacity, on_confirmed=on_confirmed
                ) as pump:
                    lease = link.wait_for_lease if link is not None and config.assignment.leased else None
                    for shard_id in config.shard_ids:
                        runners[shard_id] = ShardRunner(
                            config,
                            shard_id,
                            gate=gate,
                            store=store,
                            pump=pump,
                            gateway_url=gateway_url,
                            lease=lease,
                        )
                    cutover = Cutover(
                        {shard: runner.outlet for shard, runner in runners.items()},
                        pump,
                        role=config.assignment.role,
                        reshard=config.assignment.reshard,
                        send=link.send if link is not None else None,
                    )
                    status = await _run_shards(
                        config, runners, pump, amqp, rest, stop, task_status, cutover, link, feed
                    )
        if stop.startup.cancelled_caught:
            status = ExitStatus.OK  # stopped while waiting for the broker: nothing ran, nothing to drain
    if feed is not None:
        feed.update()  # the events the pump confirmed while it drained
    return status


class _StopRequest:
    """SIGTERM or SIGINT, received for the whole life of `run_worker`.

    The first signal stops the worker: before its shards run it cancels `startup` (a worker still waiting for
    the broker just exits), afterwards it sets `requested` and `_run_shards` drains. Later signals are only
    noted: a terminal's Ctrl-C reaches every process of the group, so a worker that is already draining on
    SIGINT then gets the supervisor's SIGTERM, which must not kill it half-way (code -15). The supervisor's
    own deadline (SIGKILL after `SHUTDOWN_TIMEOUT`) still bounds the drain.
    """

    def __init__(self) -> None:
        self.startup = trio.CancelScope()
        self.requested = trio.Event()
        self.running = False
        #: The stop is a live reshard's Retire: shards close with 1000 and their sessions are deleted.
        self.retiring = False

    def retire(self) -> None:
        """Stop for a Retire (after the cut-over reported); ignored when a stop is already under way."""
        if self.requested.is_set():
            LOGGER.warning("worker.already_stopping", extra={"reason": "retire"})
            return
        LOGGER.info("worker.stopping", extra={"reason": "retire"})
        self.retiring = True
        self.requested.set()

    async def listen(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if self.requested.is_set():
                LOGGER.debug("worker.already_stopping", extra={"signal": name})
                continue
            LOGGER.info("worker.stopping", extra={"signal": name})
            self.requested.set()
            if not self.running:
                self.startup.cancel()


@contextlib.asynccontextmanager
async def _open_stop_request() -> AsyncIterator[_StopRequest]:
    """SIGTERM and SIGINT go to a `_StopRequest` for the duration of the block."""
    failure: Exception | None = None
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as listener:
            stop = _StopRequest()
            listener.start_soon(stop.listen, signals)
            try:
                yield stop
            except Exception as exc:
                failure = exc  # re-raised below, outside the nursery, bare (not in an ExceptionGroup)
            listener.cancel_scope.cancel()
    if stop.requested.is_set() and _late_sigterm.ignored:
        # The worker is on its way out, its drain done. A terminal's Ctrl-C reaches the whole process
        # group, and the supervisor's SIGTERM that follows may come only now: with the default action
        # restored it would turn this clean exit into -15. The process is exiting; nothing is left to stop.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if failure is not None:
        raise failure


class _LateSigterm:
    """Whether a SIGTERM after the drain is ignored: in the worker process (`main`), not in a test that
    runs `run_worker` in its own process."""

    ignored = False


_late_sigterm: Final = _LateSigterm()


def _register_secrets(config: WorkerConfig) -> None:
    """What the redaction filter removes from every log line; idempotent."""
    logs.SECRETS.add(config.settings.token)
    if config.settings.proxy_http_secret:
        logs.SECRETS.add(config.settings.proxy_http_secret)
    logs.SECRETS.add_url(config.settings.amqp_url)
    logs.SECRETS.add_url(config.settings.redis_url)


async def _run_shards(
    config: WorkerConfig,
    runners: dict[int, ShardRunner],
    pump: PublishPump,
    amqp: Amqp | None,
    rest: WorkerRestProxy,
    stop: _StopRequest,
    task_status: trio.TaskStatus[dict[int, ShardRunner]],
    cutover: Cutover,
    link: SupervisorLink | None = None,
    feed: ShardMetricsFeed | None = None,
) -> int:
    """Run the shards, the command source and the REST proxy until `stop` or a fatal close code.

    On a stop: stop the shards and drain the REST proxy, and give the pump until the same deadline
    (`GRACEFUL_STOP_S - SESSION_SAVE_S` after the signal) to drain once this returns.
    """
    status: int = ExitStatus.OK
    stopping = False
    stop.running = True  # from here on a signal drains (below) instead of cancelling the start-up
    #: Shards stopped by close 4011 under `reshard` (the worker runs on without them).
    sharding_required: list[int] = []
    async with trio.open_nursery() as nursery:
        shards_done = trio.Event()
        rest_done = trio.Event()
        commands = trio.CancelScope()  # cancelled by a Retire

        async def run_shard(runner: ShardRunner) -> None:
            try:
                await runner.run()
            except FatalCloseCode as exc:
                if exc.code != SHARDING_REQUIRED_CLOSE_CODE:
                    raise
                if not config.assignment.reshard:
                    LOGGER.error(
                        "shard.sharding_required",
                        extra={
                            "shard": runner.shard_id,
                            "shard_count": config.shard_count,
                            "hint": f"Discord wants more than {config.shard_count} shards: raise --shards "
                            "(DISCORD_SHARD_COUNT), or run --shards auto, where RESHARD=auto reshards live",
                        },
                    )
                    raise
                sharding_required.append(runner.shard_id)
                LOGGER.error("shard.sharding_required", extra={"shard": runner.shard_id})
                if link is not None:
                    with contextlib.suppress(SupervisorGone):
                        await link.send(ShardingRequired(runner.shard_id))

        async def run_shards() -> None:
            nonlocal status
            try:
                async with trio.open_nursery() as shards:
                    for runner in runners.values():
                        shards.start_soon(run_shard, runner)
            except* FatalCloseCode as group:
                codes = [exc.code for exc in group.exceptions if isinstance(exc, FatalCloseCode)]
                LOGGER.error("worker.fatal_close_code", extra={"codes": codes})
                status = ExitStatus.FATAL
            shards_done.set()
            if not stopping and (status != ExitStatus.OK or not sharding_required):
                nursery.cancel_scope.cancel()  # a fatal close code: no drain

        async def consume_commands(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with commands:
                if amqp is not None:
                    await consume_amqp_commands(amqp, config, runners, task_status=task_status)
                else:
                    task_status.started()
                    await _consume_stdin(config, runners, link)

        async def consume_commands_once_live() -> None:
            await cutover.live.wait()
            await consume_commands()

        async def follow_cutover(link: SupervisorLink) -> None:
            async for message in link.cutover_messages():
                if isinstance(message, Uncovered):
                    cutover.uncover(message.shard_count, message.shards)
                elif isinstance(message, GoLive):
                    await cutover.go_live(message.digests)
                elif isinstance(message, Retire):
                    commands.cancel()
                    with contextlib.suppress(SupervisorGone):
                        await cutover.retire()
                    stop.retire()
                    return

        async def run_rest_proxy(
            *, task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            try:
                await rest.serve(task_status=task_status)
            finally:
                rest_done.set()

        nursery.start_soon(run_shards)
        nursery.start_soon(watch_event_loop, count_stall if metrics_enabled() else _ignore_stall)
        if feed is not None:
            nursery.start_soon(feed.run)
        if metrics_enabled() and rest.limiter is not None and rest.proxy is not None:
            nursery.start_soon(feed_rest_metrics, rest.limiter, rest.proxy)
        nursery.start_soon(cutover.age_out)
        if link is not None:
            nursery.start_soon(follow_cutover, link)
        if amqp is not None or config.settings.broker_type == "stdio":
            if cutover.live.is_set():
                await nursery.start(consume_commands)
            else:
                nursery.start_soon(consume_commands_once_live)  # a shadow: from its GoLive on
        port = await nursery.start(run_rest_proxy)
        if port is not None:
            LOGGER.info("worker.proxy_http", extra={"port": port})
        task_status.started(runners)
        await stop.requested.wait()
        stopping = True
        drain_deadline = trio.current_time() + GRACEFUL_STOP_S - SESSION_SAVE_S
        pump.limit_drain(drain_deadline)
        rest.stop(PROXY_GRACE_S)
        with trio.move_on_at(drain_deadline) as drain:
            async with trio.open_nursery() as stoppers:
                for runner in runners.values():
                    stoppers.start_soon(runner.retire if stop.retiring else runner.stop)
            await shards_done.wait()
            await rest_done.wait()
        if drain.cancelled_caught:
            LOGGER.warning(
                "worker.stop_timeout",
                extra={"shards_stopped": shards_done.is_set(), "proxy_drained": rest_done.is_set()},
            )
        nursery.cancel_scope.cancel()
    return status


async def _consume_stdin(
    config: WorkerConfig, runners: dict[int, ShardRunner], link: SupervisorLink | None = None
) -> None:
    """Commands from stdin, one JSON line each (DESIGN 3.3); bad lines are logged and skipped. Under the
    supervisor (`link`) stdin is /dev/null: the supervisor reads its own stdin and forwards this worker's
    commands over the control channel, already validated."""

    async def log_outcome(rejection: CommandRejected | None) -> None:
        if rejection is not None:
            LOGGER.warning("command.rejected", extra={"reason": rejection.reason})

    if link is not None:
        async for command in link.commands():
            await _route(command, runners, log_outcome)
        return
    stream = trio.lowlevel.FdStream(_dup_stdin())
    async with stream:
        async for item in read_stdin_commands(stream, config.shard_count):
            if isinstance(item, CommandRejected):
                LOGGER.warning("command.rejected", extra={"reason": item.reason})
                continue
            await _route(item, runners, log_outcome)


async def _route(command: GatewayCommand, runners: dict[int, ShardRunner], ack: CommandAck) -> None:
    runner = runners.get(command.shard_id)
    if runner is None:
        LOGGER.warning("command.not_here", extra={"shard": command.shard_id})
        return
    rejection = runner.submit_command(command, ack)
    if rejection is not None:
        LOGGER.warning("command.rejected", extra={"reason": rejection.reason})


def _dup_stdin() -> int:
    return os.dup(sys.stdin.fileno())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m workers",
        description="Run the gateway shards of one range (started by the supervisor; standalone for tests "
        "and benchmarks). Settings come from the environment (see README); flags override.",
    )
    parser.add_argument("--shard-ids", help="shard ids to run, e.g. 0-15 or 0-7,16-23 (default: all)")
    parser.add_argument("--shard-count", help="total shards of the bot (default: DISCORD_SHARD_COUNT)")
    parser.add_argument("--gateway-url", default="", help="gateway URL (default: from GET /gateway/bot)")
    parser.add_argument(
        "--max-concurrency", default="0", help="identify buckets (default: from /gateway/bot)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m workers`: configured by the supervisor over the control channel when it started this
    process, else by the environment and the command line (standalone: tests, benchmarks)."""
    args = build_parser().parse_args(argv)
    _late_sigterm.ignored = True
    fd = control_fd_from_env()
    if fd is not None:
        return _guarded(_run_supervised, fd)
    try:
        config = standalone_config(
            os.environ,
            shard_ids=parse_shard_ids("--shard-ids", args.shard_ids) if args.shard_ids else None,
            shard_count=parse_shard_count("--shard-count", args.shard_count) if args.shard_count else None,
            gateway_url=args.gateway_url,
            max_concurrency=parse_int("--max-concurrency", args.max_concurrency),
        )
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return ExitStatus.CONFIG
    _configure_process(config)
    return _guarded(run_worker, config)


async def _run_supervised(fd: int) -> int:
    """Take the settings from the supervisor (its first message), then run with its gate and sessions."""
    async with open_supervisor_link(fd) as link:
        try:
            config = await link.config()
        except SupervisorGone:
            LOGGER.error("worker.not_configured")
            return ExitStatus.ERROR
        _configure_process(config)
        return await run_worker(config, link=link)


def _configure_process(config: WorkerConfig) -> None:
    logs.configure_logging(config.settings.log_level, config.settings.log_format)
    _register_secrets(config)


def _guarded(run: Callable[..., Awaitable[int]], *args: object) -> int:
    """`trio.run(run, *args)`, with a failure logged (redacted) and turned into an exit status."""
    try:
        return trio.run(run, *args)
    except GatewayBotError as exc:
        LOGGER.error("worker.gateway_info_failed", extra={"error": str(exc)})
        return ExitStatus.FATAL if exc.refused else ExitStatus.ERROR
    except Exception:
        # Through the logger, not Python's traceback printer: one JSON line, with secrets redacted (an
        # exception's message may hold a URL with its password).
        LOGGER.exception("worker.crashed")
        return ExitStatus.ERROR
