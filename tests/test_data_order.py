"""dpo_dist.data.order.DataOrder: each epoch every pair once (the last global batch filled by wrapping around),
the same blocks however a step is split, and with groups (the pairs of one ranked row) each group's pairs together."""

import pytest

from dpo_dist.data.order import DataOrder


def epoch(order, steps, processes=1, accumulation=1, start=0):
    return [i for step in range(start, start + steps) for rank in range(processes)
            for micro in order.micro_batches(step, rank) for i in micro]


def step_blocks(order, steps, processes, accumulation):
    """Each step's pairs, in the order of the global batch (micro-step a of rank r is run a * P + r)."""
    blocks = []
    for step in range(steps):
        micro = {rank: order.micro_batches(step, rank) for rank in range(processes)}
        blocks.append([i for a in range(accumulation) for rank in range(processes) for i in micro[rank][a]])
    return blocks


def test_every_pair_once_an_epoch_and_the_same_blocks_on_any_split():
    one = DataOrder(13, per_device=4, accumulation=1, processes=1, seed=3)
    assert one.steps_per_epoch == 4 and one.repeated_per_epoch == 3
    first = epoch(one, 4)
    assert sorted(set(first)) == list(range(13)) and len(first) == 16
    split = DataOrder(13, per_device=1, accumulation=2, processes=2, seed=3)
    assert step_blocks(split, 4, 2, 2) == step_blocks(one, 4, 1, 1)
    assert epoch(one, 4, start=4) != first  # the next epoch is another permutation


def test_pairs_that_are_their_own_groups_keep_the_plain_order():
    plain = DataOrder(10, per_device=2, accumulation=1, processes=1, seed=0)
    grouped = DataOrder(10, per_device=2, accumulation=1, processes=1, seed=0, groups=list(range(10)))
    assert epoch(grouped, 10) == epoch(plain, 10)


def test_the_pairs_of_a_group_stay_together_in_their_order():
    groups = [0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 4, 5, 5]
    order = DataOrder(len(groups), per_device=3, accumulation=1, processes=1, seed=1, groups=groups)
    taken = epoch(order, order.steps_per_epoch)[:len(groups)]
    assert sorted(taken) == list(range(len(groups)))
    runs = []
    for i in taken:
        if runs and groups[runs[-1][-1]] == groups[i]:
            runs[-1].append(i)
        else:
            runs.append([i])
    assert len(runs) == len(set(groups)) and all(run == sorted(run) for run in runs)
    assert [groups[run[0]] for run in runs] != sorted(set(groups))  # shuffled by group


def test_a_group_id_per_pair_is_required():
    with pytest.raises(ValueError, match="3 group ids for 4 pairs"):
        DataOrder(4, per_device=1, accumulation=1, processes=1, seed=0, groups=[0, 1, 2])


def test_a_datasets_groups_are_read_only_where_a_group_holds_several_pairs():
    import datasets

    from dpo_dist.data.order import pair_groups

    assert pair_groups(datasets.Dataset.from_dict({"prompt_input_ids": [[1], [2]]})) is None
    assert pair_groups(datasets.Dataset.from_dict({"group": [4, 2, 9]})) is None  # pairs: the plain order
    assert pair_groups(datasets.Dataset.from_dict({"group": [4, 4, 9]})) == [4, 4, 9]
