"""Fault suite: `python -m benchmarks faults [--quick] [--smoke] [--json PATH] [--only NAMES]`.

The whole system under a steady firehose: the simulator (a process), a redis-server of the suite's own
(`SHARD_STORE_TYPE=redis`, so a killed supervisor's successor can RESUME), the supervisor with 2 workers
publishing to RabbitMQ (`BROKER_TYPE=amqp`, an exchange of its own per run) and serving the REST proxy on
`PROXY_HTTP_ADDRESS`, and a consumer process (`benchmarks.faults.consumer`, aio-pika) bound to every
dispatch, deduplicating on `(shard_id, session_id, seq)`. Faults are injected one at a time (anchors
gateway.md 6.3, F1-F16; ratelimit.md 5.3); for each the suite waits for recovery, lets the firehose run a
little longer, stops it, waits for the consumer to drain, and compares what the consumer holds with the
simulator's ledger.

Faults: worker_kill9 (F1), rolling_restart (SIGHUP, F2), op7_storm (F3), op9_resumable and
op9_not_resumable (F4), corrupt (zlib, F7), corrupt_zstd (a restart onto zstd-stream, then corrupt bytes;
F8, the faults after it run on zstd-stream), close_1000, close_1001, close_4000..4009 and drop (F5),
blackhole (B6), expire_sessions (F6), loop_stall_5s (SIGSTOP for 5 s, F15), worker_stall (SIGSTOP past
the supervisor's heartbeat timeout, F15), supervisor_kill9 (F16), ratelimit_holder_kill9 (ratelimit
5.3-6), rest_invalid_mix (5.3-7), identify_budget_low and identify_budget_exhausted (F13),
oversized_command (F10), send_limiter (1000 queued commands, F9), timeout_hello and timeout_ready (F14),
redis_outage and redis_outage_worker_kill (F12), rabbitmq_outage (`rabbitmqctl stop_app`/`start_app`,
F11; both outages last 30 s, 5 s in the smoke settings), and last the fatal codes close_4004_fatal ..
close_4014_fatal (the supervisor must exit 3; the suite starts a new one after each but the last).
`--smoke` runs worker_kill9, op7_storm, corrupt, oversized_command and close_4010_fatal. `--soak MINUTES`
is a different run: see `benchmarks.faults.soak`.

Cluster phase (`benchmarks.faults.cluster`), after the faults above, on a system of its own: the simulator,
another redis-server of the suite's own, a TCP forwarder in front of it, the consumer on another exchange,
and 3 cluster nodes (`CLUSTER_MODE=redis` supervisors in process groups of their own, `--workers 1` each,
`BROKER_TYPE=amqp`) with `CLUSTER_LEASE_TTL=5s` (not the default 10 s: a failover waits one TTL, and a node
watches Redis one TTL before it takes a group, so the TTL sets most of the phase's run time). Before each
fault the suite restores the population (3 nodes; 2 for node_join) and waits until every shard runs exactly
once, READY, with every node at its quota of groups (not measured). The faults, each with 0 lost and 0
IDENTIFYs: node_kill9 (SIGKILL of a node's whole process group; its shards RESUME on the others: the
ledger's `failover_s`, from the first close of its connections to the last of their RESUMEs, at most TTL
+ 5 s), node_sigterm (the node hands its groups over and exits 0: `handover_s`, `exit_status`), node_join
(a new node takes its share by RESUME), redis_outage_cluster (the suite's Redis stopped, 30 s; 10 s with
`--quick`, 5 s with `--smoke`, and restarted empty: no shard reconnects, no shard moves, no shard on two
nodes in any node's `/healthz` meanwhile), node_partitioned_from_redis (the forwarder cuts one node's Redis
connections while the others reach Redis: they take its shards by RESUME within TTL + 5 s; then the
partition heals and the node gets its share back). `--only` selects from both phases; a phase with no
fault selected does not start. `--smoke` runs no cluster fault unless `--only` names one.

Figures per fault (`faults.<name>.*`):
- `lost`: dispatches the simulator produced that the consumer never received. For the session a shard is
  on at the end (the one it resumed or identified last), every seq 1..last_seq counts; for a session that
  ended or was given up (op 9 false, 4003-4009, expiry) only the holes below the highest seq received
  count, since what the gateway queued after the session died is not deliverable by design (E3, F).
- `duplicates`: deliveries of a `(shard, session, seq)` the consumer already had (at least once is the
  contract; reported, not judged).
- `identifies`: IDENTIFYs the simulator accepted during the fault, beyond the initial ones.
- `resumes`: successful RESUMEs during the fault.
- `recover_s`: wall seconds from the injection until the simulator saw every affected shard come back
  (RESUMED or READY, counted from its ledger) *and* the consumer had received a new event from every shard
  after that. For the outages it counts from the start of the outage; for the fatal code it is the time
  to the supervisor's exit; for the permit holder it includes the wait for the bucket.
- `overlaps`: times a connection began to serve a shard that another connection still served (the
  simulator's `shard_overlaps`, rule `shard_served_twice`): two hosts running one shard. Bound 0, every
  fault.
- rest_invalid_mix adds `invalid_peak`, `invalid_limit`, `invalid_peak_fraction`, `bans`, `429s` (by
  the simulator's category), `simulator_by_status` and `proxy_answers`.

Pass: 0 lost; 0 identifies where a resume was possible (at most one per affected shard where it was not);
0 overlaps; `recover_s` within the fault's bound (F1: 3 s for the resume plus 1 s for the consumer; the
others are in `faults_for` and `cluster_faults_for`); plus the REST, fatal and cluster criteria above.
`faults.passed` / `faults.total`; the exit status is 1 on any FAIL. The RabbitMQ outage stops the machine's
shared broker: do not run it beside other users.
"""

from benchmarks.faults.suite import DESCRIPTION, add_arguments, run

__all__ = ["DESCRIPTION", "add_arguments", "run"]
