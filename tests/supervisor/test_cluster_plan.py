"""Cluster mode planning (supervisor.cluster_plan): groups, quotas, the fewest-moves target, next steps."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.cluster_plan import (
    MAX_GROUPS,
    ClusterPlan,
    Node,
    Step,
    assign,
    next_step,
    plan_cluster,
    quotas,
)

# --- plan ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shard_count", "group_size", "groups"),
    [(1, 1, 1), (4, 1, 4), (32, 1, 32), (33, 2, 17), (64, 2, 32), (1000, 32, 32), (10000, 313, 32)],
)
def test_plan_cluster_examples(shard_count: int, group_size: int, groups: int) -> None:
    plan = plan_cluster(shard_count)
    assert plan == ClusterPlan(shard_count, group_size)
    assert plan.groups == groups


@pytest.mark.parametrize("shard_count", [1, 4, 31, 32, 33, 1000, 10000])
def test_every_shard_is_in_exactly_one_contiguous_group(shard_count: int) -> None:
    plan = plan_cluster(shard_count)
    assert plan.groups <= MAX_GROUPS
    flattened = [shard for group in range(plan.groups) for shard in plan.shards_of(group)]
    assert flattened == list(range(shard_count))
    for group in range(plan.groups):
        shards = plan.shards_of(group)
        assert shards, "no group is empty"
        assert shards[0] == group * plan.group_size
        assert all(plan.group_of(shard) == group for shard in shards)


@given(
    shard_count=st.integers(min_value=1, max_value=20_000),
    max_groups=st.integers(min_value=1, max_value=100),
)
def test_plan_cluster_uses_at_most_max_groups_of_the_smallest_size(shard_count: int, max_groups: int) -> None:
    plan = plan_cluster(shard_count, max_groups)
    assert plan.groups <= max_groups
    assert plan.group_size == 1 or (plan.group_size - 1) * max_groups < shard_count  # one less would not fit
    assert sum(len(plan.shards_of(group)) for group in range(plan.groups)) == shard_count


def test_shards_of_and_group_of_refuse_what_is_not_in_the_plan() -> None:
    plan = ClusterPlan(33, 2)
    assert plan.shards_of(16) == (32,)  # the last group is shorter
    for group in (-1, 17):
        with pytest.raises(ValueError, match=f"group {group} is not in this plan"):
            plan.shards_of(group)
    for shard in (-1, 33):
        with pytest.raises(ValueError, match=f"shard {shard} is not in this plan"):
            plan.group_of(shard)


@pytest.mark.parametrize(("shard_count", "group_size"), [(0, 1), (-3, 1), (10, 0), (10, -1)])
def test_a_plan_needs_shards_and_a_group_size(shard_count: int, group_size: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ClusterPlan(shard_count, group_size)


def test_plan_cluster_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least 1 shard"):
        plan_cluster(0)
    with pytest.raises(ValueError, match="max_groups"):
        plan_cluster(10, 0)


@given(shard_count=st.integers(min_value=1, max_value=10**9), group_size=st.integers(min_value=1))
def test_plan_text_round_trip(shard_count: int, group_size: int) -> None:
    plan = ClusterPlan(shard_count, group_size)
    text = plan.to_text()
    assert text == f"{shard_count}:{group_size}"
    assert ClusterPlan.from_text(text) == plan


def test_plan_text_example() -> None:
    assert ClusterPlan.from_text("1000:32") == ClusterPlan(1000, 32)
    assert plan_cluster(1000).to_text() == "1000:32"


@pytest.mark.parametrize(
    "text",
    ["", "1000", "1000:", ":32", "1000:32:1", " 1000:32", "1000:32\n", "1000 :32", "+1000:32", "-1:1",
     "1.0:1", "a:b", "0x10:1", "01000:32", "1000:032", "\u0661\u0660:1"],
)  # fmt: skip
def test_bad_plan_text_is_refused_naming_the_form(text: str) -> None:
    with pytest.raises(ValueError, match="shard_count:group_size") as raised:
        ClusterPlan.from_text(text)
    assert repr(text) in str(raised.value)


@pytest.mark.parametrize("text", ["0:32", "1000:0", "0:0"])
def test_plan_text_with_a_zero_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=rf"cluster plan '{text}' is invalid: .*at least 1"):
        ClusterPlan.from_text(text)


# --- quotas --------------------------------------------------------------------------------------------


def test_quotas_are_proportional_to_workers() -> None:
    assert quotas([Node("a", 8), Node("b", 2)], 10) == {"a": 8, "b": 2}
    assert quotas([Node("a", 1), Node("b", 3)], 32) == {"a": 8, "b": 24}


def test_quotas_of_equal_nodes_give_the_left_over_groups_by_id() -> None:
    assert quotas([Node("c", 4), Node("a", 4), Node("b", 4)], 32) == {"a": 11, "b": 11, "c": 10}
    assert quotas([Node("b", 1), Node("a", 1)], 1) == {"a": 1, "b": 0}


def test_quotas_give_the_left_over_groups_to_the_largest_remainders() -> None:
    # Shares of 10 groups for weights 1, 2, 4: 1.43, 2.86, 5.71 -> floors 1, 2, 5 and one group left over,
    # which goes to the largest remainder (b: .86), not to the first id nor to the largest node.
    assert quotas([Node("a", 1), Node("b", 2), Node("c", 4)], 10) == {"a": 1, "b": 3, "c": 6}


def test_quotas_edge_cases() -> None:
    assert quotas([], 32) == {}
    assert quotas([Node("a", 3), Node("b", 1)], 0) == {"a": 0, "b": 0}
    with pytest.raises(ValueError, match="'a' appears more than once"):
        quotas([Node("a", 1), Node("b", 1), Node("a", 2)], 4)
    with pytest.raises(ValueError, match="negative"):
        quotas([Node("a", 1)], -1)


def test_a_node_needs_an_id_and_a_worker() -> None:
    with pytest.raises(ValueError, match="at least 1 worker"):
        Node("a", 0)
    with pytest.raises(ValueError, match="empty"):
        Node("", 1)


node_ids = st.text(alphabet="abcdefgh", min_size=1, max_size=3)
node_lists = st.lists(
    st.builds(Node, node_ids, st.integers(min_value=1, max_value=64)),
    unique_by=lambda node: node.node_id,
    max_size=8,
)


@given(nodes=node_lists, groups=st.integers(min_value=0, max_value=200))
def test_quotas_sum_to_the_groups_and_stay_within_one_of_the_exact_share(
    nodes: list[Node], groups: int
) -> None:
    result = quotas(nodes, groups)
    assert set(result) == {node.node_id for node in nodes}
    if not nodes:
        return
    assert sum(result.values()) == groups
    total = sum(node.workers for node in nodes)
    for node in nodes:
        exact = groups * node.workers / total
        assert exact - 1 < result[node.node_id] < exact + 1
    # Proportional: a heavier node never gets fewer groups than a lighter one.
    for heavy in nodes:
        for light in nodes:
            if heavy.workers > light.workers:
                assert result[heavy.node_id] >= result[light.node_id]


# --- assign --------------------------------------------------------------------------------------------


def _owned(owners: dict[int, str]) -> Counter[str]:
    return Counter(owners.values())


def _moves(before: dict[int, str], after: dict[int, str]) -> set[int]:
    return {group for group, owner in after.items() if before.get(group) != owner}


def test_assign_from_nothing_fills_nodes_in_id_order() -> None:
    nodes = [Node("b", 1), Node("a", 1), Node("c", 1)]
    target = assign(nodes, {}, 32)
    assert target == dict.fromkeys(range(11), "a") | dict.fromkeys(range(11, 22), "b") | dict.fromkeys(
        range(22, 32), "c"
    )


def test_a_joining_node_takes_its_quota_and_only_from_over_quota_nodes() -> None:
    before = dict.fromkeys(range(16), "a") | dict.fromkeys(range(16, 32), "b")
    nodes = [Node("a", 4), Node("b", 4), Node("c", 4)]
    after = assign(nodes, before, 32)
    assert _owned(after) == {"a": 11, "b": 11, "c": 10}
    moved = _moves(before, after)
    assert len(moved) == 10  # exactly the newcomer's quota: the fewest moves possible
    assert all(after[group] == "c" for group in moved)
    assert {before[group] for group in moved} == {"a", "b"}
    # Each old node keeps its lowest groups and gives up its highest.
    assert [g for g in range(32) if after[g] == "a"] == list(range(11))
    assert [g for g in range(32) if after[g] == "b"] == list(range(16, 27))
    assert sorted(moved) == [11, 12, 13, 14, 15, 27, 28, 29, 30, 31]


def test_a_joining_node_takes_nothing_from_a_node_at_or_below_its_quota() -> None:
    # a (weight 1) owns 2 of 12 groups, b (weight 1) owns 10; c (weight 1) joins: quotas 4/4/4.
    before = {0: "a", 1: "a"} | dict.fromkeys(range(2, 12), "b")
    after = assign([Node("a", 1), Node("b", 1), Node("c", 1)], before, 12)
    assert _owned(after) == {"a": 4, "b": 4, "c": 4}
    assert after[0] == after[1] == "a"
    assert all(before[group] == "b" for group in _moves(before, after))
    assert len(_moves(before, after)) == 6  # b's 6 excess groups: 2 to a, 4 to c


def test_a_leaving_node_s_groups_go_to_the_others_and_nothing_else_moves() -> None:
    nodes = [Node("a", 1), Node("b", 1), Node("c", 1)]
    before = assign(nodes, {}, 32)
    after = assign(nodes[:2], before, 32)  # c is gone (its leases still name it, or have expired: same thing)
    assert _owned(after) == {"a": 16, "b": 16}
    moved = _moves(before, after)
    assert moved == {g for g, owner in before.items() if owner == "c"}
    assert after == assign(nodes[:2], {g: o for g, o in before.items() if o != "c"}, 32)


def test_assign_ignores_owners_of_groups_outside_the_plan() -> None:
    assert assign([Node("a", 1)], {5: "a", -1: "a"}, 2) == {0: "a", 1: "a"}


def test_assign_without_nodes_is_empty() -> None:
    assert assign([], {0: "a"}, 4) == {}


def test_assign_is_deterministic_whatever_the_input_order() -> None:
    rng = random.Random(15)
    nodes = [Node(f"n{i}", rng.randint(1, 8)) for i in range(5)]
    owners = {g: rng.choice(["n0", "n1", "n3", "gone"]) for g in range(32) if rng.random() < 0.8}
    expected = assign(nodes, owners, 32)
    for _ in range(20):
        shuffled_nodes = rng.sample(nodes, len(nodes))
        shuffled_owners = dict(rng.sample(list(owners.items()), len(owners)))
        assert assign(shuffled_nodes, shuffled_owners, 32) == expected
        for node in nodes:
            step = next_step(node.node_id, shuffled_nodes, shuffled_owners, 32, range(32))
            assert step == next_step(node.node_id, nodes, owners, 32, range(32))


@st.composite
def snapshots(draw: st.DrawFn) -> tuple[list[Node], dict[int, str], int]:
    """Live nodes, lease owners (some dead nodes among them, some groups free) and a group count."""
    nodes = draw(node_lists)
    groups = draw(st.integers(min_value=1, max_value=MAX_GROUPS))
    holders = [node.node_id for node in nodes] + ["dead-1", "dead-2"]
    owners = draw(st.dictionaries(st.integers(min_value=0, max_value=groups - 1), st.sampled_from(holders)))
    return nodes, owners, groups


@given(snapshot=snapshots())
def test_assign_covers_every_group_at_quota_with_the_fewest_moves(
    snapshot: tuple[list[Node], dict[int, str], int],
) -> None:
    nodes, owners, groups = snapshot
    target = assign(nodes, owners, groups)
    if not nodes:
        assert target == {}
        return
    quota = quotas(nodes, groups)
    assert sorted(target) == list(range(groups))
    assert _owned(target) == +Counter(quota)
    live = set(quota)
    owned_live = Counter(owner for owner in owners.values() if owner in live)
    free = sum(1 for group in range(groups) if owners.get(group) not in live)
    excess = sum(max(0, owned_live[node_id] - quota[node_id]) for node_id in live)
    assert len(_moves(owners, target)) == excess + free
    for node_id in live:
        held = sorted(group for group, owner in owners.items() if owner == node_id)
        kept = sorted(group for group in held if target[group] == node_id)
        assert kept == held[: quota[node_id]]  # keeps its lowest ids, as many as its quota allows
        if owned_live[node_id] <= quota[node_id]:
            assert kept == held  # a node at or under quota loses nothing


# --- next_step -----------------------------------------------------------------------------------------


def test_next_step_acquires_the_free_groups_targeted_at_me() -> None:
    nodes = [Node("a", 1), Node("b", 1)]
    owners = {0: "a", 1: "gone", 5: "b"}
    assert assign(nodes, owners, 6) == {0: "a", 1: "a", 2: "a", 3: "b", 4: "b", 5: "b"}
    assert next_step("a", nodes, owners, 6, ready=range(6)) == Step(acquire=(1, 2), release=None)
    assert next_step("b", nodes, owners, 6, ready=range(6)) == Step(acquire=(3, 4), release=None)


def test_next_step_releases_at_most_one_ready_group_the_lowest() -> None:
    before = dict.fromkeys(range(16), "a") | dict.fromkeys(range(16, 32), "b")
    nodes = [Node("a", 1), Node("b", 1), Node("c", 1)]
    # a must give up 11..15 and b 27..31; c must wait: it acquires nothing still held.
    assert next_step("c", nodes, before, 32, ready=range(32)) == Step(acquire=(), release=None)
    assert next_step("a", nodes, before, 32, ready=range(32)) == Step(acquire=(), release=11)
    assert next_step("b", nodes, before, 32, ready=range(32)) == Step(acquire=(), release=27)
    # Only groups whose shards are all READY are released.
    assert next_step("a", nodes, before, 32, ready={0, 1, 13, 15}) == Step(acquire=(), release=13)
    assert next_step("a", nodes, before, 32, ready=set(range(11))) == Step(acquire=(), release=None)
    assert next_step("a", nodes, before, 32, ready=()) == Step(acquire=(), release=None)
    # Once a released it, the group is free and targeted at c, who acquires it.
    released = {g: o for g, o in before.items() if g != 11}
    assert next_step("c", nodes, released, 32, ready=()) == Step(acquire=(11,), release=None)


def test_a_node_that_left_releases_its_groups_one_by_one() -> None:
    owners = {0: "a", 1: "a", 2: "b", 3: "b"}
    remaining = [Node("b", 1)]  # a left the cluster (ZREM) and hands over
    assert next_step("a", remaining, owners, 4, ready=range(4)) == Step(acquire=(), release=0)
    assert next_step("a", [], owners, 4, ready=range(4)) == Step(
        acquire=(), release=None
    )  # nobody to take it


@given(snapshot=snapshots(), data=st.data())
def test_next_step_agrees_with_the_target(
    snapshot: tuple[list[Node], dict[int, str], int], data: st.DataObject
) -> None:
    nodes, owners, groups = snapshot
    me = data.draw(st.sampled_from([node.node_id for node in nodes] + ["dead-1"]))
    ready = data.draw(st.sets(st.integers(min_value=0, max_value=groups - 1)))
    step = next_step(me, nodes, owners, groups, ready)
    target = assign(nodes, owners, groups)
    live = {node.node_id for node in nodes}
    assert list(step.acquire) == sorted(set(step.acquire))
    assert set(step.acquire) == {
        g for g, owner in target.items() if owner == me and owners.get(g) not in live
    }
    releasable = sorted(g for g in ready if owners.get(g) == me and g in target and target[g] != me)
    assert step.release == (releasable[0] if releasable else None)
