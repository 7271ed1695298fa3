"""Cluster mode planning: shard groups, each node's share of them, and the next lease move (no I/O).

Groups: the cluster plan splits `shard_count` shards into at most `MAX_GROUPS` contiguous groups of
`group_size = ceil(shard_count / MAX_GROUPS)` shards (the last one may be shorter). A group is the unit of a
lease and of a worker process. The plan is stored once in Redis as the text `"shard_count:group_size"` and
every node reads it back, so all nodes agree on which shards a group holds even if they would have computed
another size themselves. Contiguous groups keep the IDENTIFY buckets (`shard_id % max_concurrency`) spread
across groups, as `supervisor.planning` does for workers.

Quotas: each live node should own a number of groups proportional to its weight (its `--workers`). The exact
shares `groups * workers / total` are rounded by the largest remainder method: every node gets the floor of
its share, and the groups left over go one each to the nodes with the largest fractional parts, ties broken by
node id ascending. The quotas always sum to `groups`, and every node computes the same ones.

Target (`assign`): the owner every group should have, reached with the fewest lease moves. A live node keeps
`min(owned, quota)` of the groups it holds now, so only a node above its quota gives groups away, and only
groups that are free (no lease, or the holder is no longer a live node) or in excess change owner. Which
groups a node keeps is fixed by a rule rather than chosen: its LOWEST group ids. A rule every node can apply
to the same snapshot makes the target deterministic, with no negotiation; keeping the lowest ids (and filling
free groups in ascending order, nodes in id order) also tends to leave each node a run of neighbouring groups.

Steps (`next_step`): a node only ever acquires free groups whose target is itself; a group still held by
another node is never taken, its holder releases it. Releasing means stopping the group's worker, so its
shards are down until the new owner resumes them: a node releases one group at a time, only a group whose
shards are all READY (never one still starting, which would leave the cluster with two groups down at once),
and the lowest such id. `next_step` is stateless: the caller waits for the released group to be taken by its
target before asking for the next step, so at most one of a node's groups is in transit at any time.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = ["MAX_GROUPS", "ClusterPlan", "Node", "Step", "assign", "next_step", "plan_cluster", "quotas"]

MAX_GROUPS: Final = 32

_PLAN_TEXT: Final = re.compile(r"(0|[1-9][0-9]*):(0|[1-9][0-9]*)", re.ASCII)


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


@dataclass(frozen=True, slots=True)
class ClusterPlan:
    """How the cluster's shards split into groups of `group_size` consecutive shards."""

    shard_count: int
    group_size: int

    def __post_init__(self) -> None:
        if self.shard_count < 1:
            raise ValueError(f"a cluster plan needs at least 1 shard, not {self.shard_count}")
        if self.group_size < 1:
            raise ValueError(f"a cluster plan's group size must be at least 1, not {self.group_size}")

    @property
    def groups(self) -> int:
        """The number of groups, `ceil(shard_count / group_size)`; groups are numbered 0 .. groups-1."""
        return _ceil_div(self.shard_count, self.group_size)

    def shards_of(self, group: int) -> tuple[int, ...]:
        """The shard ids of `group`, ascending and consecutive (the last group may hold fewer)."""
        if not 0 <= group < self.groups:
            raise ValueError(f"group {group} is not in this plan (groups 0-{self.groups - 1})")
        start = group * self.group_size
        return tuple(range(start, min(start + self.group_size, self.shard_count)))

    def group_of(self, shard: int) -> int:
        """The group that holds `shard`."""
        if not 0 <= shard < self.shard_count:
            raise ValueError(f"shard {shard} is not in this plan (shards 0-{self.shard_count - 1})")
        return shard // self.group_size

    def to_text(self) -> str:
        """The stored form, `"shard_count:group_size"`."""
        return f"{self.shard_count}:{self.group_size}"

    @classmethod
    def from_text(cls, text: str) -> ClusterPlan:
        """Parse the stored form written by `to_text`; anything else is a ValueError naming the text."""
        match = _PLAN_TEXT.fullmatch(text)
        if match is None:
            raise ValueError(
                f"cluster plan {text!r} is not of the form 'shard_count:group_size' (two whole numbers, "
                "e.g. '1000:32')"
            )
        try:
            return cls(int(match[1]), int(match[2]))
        except ValueError as error:
            raise ValueError(f"cluster plan {text!r} is invalid: {error}") from None


def plan_cluster(shard_count: int, max_groups: int = MAX_GROUPS) -> ClusterPlan:
    """The plan for `shard_count` shards in at most `max_groups` groups, each as small as that allows."""
    if shard_count < 1:
        raise ValueError(f"a cluster needs at least 1 shard, not {shard_count}")
    if max_groups < 1:
        raise ValueError(f"max_groups must be at least 1, not {max_groups}")
    return ClusterPlan(shard_count, _ceil_div(shard_count, max_groups))


@dataclass(frozen=True, slots=True)
class Node:
    """A live node of the cluster and its weight (its `--workers`)."""

    node_id: str
    workers: int

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ValueError("a node id must not be empty")
        if self.workers < 1:
            raise ValueError(f"node {self.node_id!r} must have at least 1 worker, not {self.workers}")


def _by_id(nodes: Sequence[Node]) -> list[Node]:
    ordered = sorted(nodes, key=lambda node: node.node_id)
    for before, after in itertools.pairwise(ordered):
        if before.node_id == after.node_id:
            raise ValueError(f"node id {before.node_id!r} appears more than once")
    return ordered


def quotas(nodes: Sequence[Node], groups: int) -> dict[str, int]:
    """How many of `groups` groups each node should own: proportional to its workers, summing to `groups`.

    Largest remainder method, ties by node id ascending (see the module docstring). No nodes, `{}`.
    """
    if groups < 0:
        raise ValueError(f"groups must not be negative, not {groups}")
    ordered = _by_id(nodes)
    if not ordered:
        return {}
    total = sum(node.workers for node in ordered)
    shares = {node.node_id: divmod(groups * node.workers, total) for node in ordered}
    result = {node_id: whole for node_id, (whole, _) in shares.items()}
    left_over = groups - sum(result.values())
    # sorted() is stable and `ordered` is by id, so equal remainders keep id order.
    by_remainder = sorted(ordered, key=lambda node: shares[node.node_id][1], reverse=True)
    for node in by_remainder[:left_over]:
        result[node.node_id] += 1
    return result


def assign(nodes: Sequence[Node], owners: Mapping[int, str], groups: int) -> dict[int, str]:
    """The target owner of every group 0 .. groups-1, reached from `owners` with the fewest moves.

    `owners` maps a group to its current lease holder (a group absent is free; a holder not among `nodes`
    counts as free; group ids outside 0 .. groups-1 are ignored). Each node keeps its lowest
    `min(owned, quota)` groups; the rest go, ascending, to the nodes below quota in node id order. No nodes,
    `{}`.
    """
    quota = quotas(nodes, groups)
    if not quota:
        return {}
    target: dict[int, str] = {}
    for group in range(groups):
        owner = owners.get(group)
        if owner in quota and quota[owner] > 0:
            target[group] = owner
            quota[owner] -= 1  # now the node's remaining room: groups it keeps are counted off, lowest first
    unassigned = (group for group in range(groups) if group not in target)
    for node_id in sorted(quota):
        for _ in range(quota[node_id]):
            target[next(unassigned)] = node_id
    return dict(sorted(target.items()))


@dataclass(frozen=True, slots=True)
class Step:
    """What one node should do now: acquire these free groups, and release at most one group it holds."""

    acquire: tuple[int, ...]
    release: int | None


def next_step(
    me: str, nodes: Sequence[Node], owners: Mapping[int, str], groups: int, ready: Collection[int]
) -> Step:
    """The next lease moves of node `me`, from the same snapshot every node sees.

    `acquire`: the free groups (absent from `owners`, or held by a node not among `nodes`) whose target is
    `me`, ascending. `release`: the lowest group `me` holds whose target is another node and that is in
    `ready` (all its shards READY), or None. `me` need not be among `nodes`: a node that has left the
    cluster acquires nothing and releases its groups one by one to the nodes that remain. The caller waits
    for a released group to be taken before asking again.
    """
    target = assign(nodes, owners, groups)
    live = {node.node_id for node in nodes}
    acquire = tuple(
        group for group in range(groups) if target.get(group) == me and owners.get(group) not in live
    )
    release = next(
        (
            group
            for group in range(groups)
            if owners.get(group) == me and target.get(group, me) != me and group in ready
        ),
        None,
    )
    return Step(acquire=acquire, release=release)
