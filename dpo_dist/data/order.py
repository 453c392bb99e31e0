"""The order pairs are taken in: each process's micro-batches at each optimizer step, a pure function of (seed, epoch).

The position in the data is the optimizer step, which is what a resumed run restores; with the global batch, which a
resume keeps whatever its process count (:mod:`dpo_dist.train.shape`), it is the pairs seen. Step ``g``'s block of
pairs does not depend on how it is split over processes and micro-batches.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from dpo_dist.data.tokenization import GROUP


def pair_groups(pairs: Any) -> list[int] | None:
    """The group id of each pair of the dataset ``pairs`` (its ``group`` column: the pairs made from one ranked row
    share it), or None where every pair is its own group (pair data: the plain order, as before groups)."""
    if GROUP not in pairs.column_names:
        return None
    groups = pairs[GROUP]
    return None if len(set(groups)) == len(groups) else list(groups)


class DataOrder:
    """Which pairs each process takes at each optimizer step.

    Each epoch is a seeded permutation of the pairs, wrapped around to fill its last global batch (so no pair is
    left out; the few repeated ones are logged). Global step ``g`` takes the ``g``-th block of ``P x B x A`` pairs;
    micro-step ``a`` of process ``r`` takes its ``(a * P + r)``-th run of ``B``.

    ``groups`` (one id per pair: the pairs made from one ranked row share it) permutes the groups instead, each
    group's pairs kept together in their order, so that pairs of one prompt tend to meet in a micro-batch, where the
    packing computes their prompt once. With every pair its own group, in index order, the order is the plain one.

    ``first_step``: pairs that are trained from a later optimizer step on (an iterative-DPO round's) take their epoch
    0 from that step.
    """

    def __init__(self, num_pairs: int, *, per_device: int, accumulation: int, processes: int, seed: int,
                 groups: Sequence[int] | None = None, first_step: int = 0):
        self.n, self.b, self.a, self.p, self.seed = num_pairs, per_device, accumulation, processes, seed
        self.first_step = first_step
        self.global_batch = per_device * accumulation * processes
        self.steps_per_epoch = math.ceil(num_pairs / self.global_batch)
        self.repeated_per_epoch = self.steps_per_epoch * self.global_batch - num_pairs
        self._members: list[list[int]] | None = None
        if groups is not None:
            if len(groups) != num_pairs:
                raise ValueError(f"{len(groups)} group ids for {num_pairs} pairs")
            members: dict[int, list[int]] = {}
            for index, group in enumerate(groups):
                members.setdefault(group, []).append(index)
            self._members = list(members.values())  # in order of first appearance
        self._epoch, self._order = -1, []

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        if step < self.first_step:
            raise ValueError(f"step {step} comes before this order's first step {self.first_step}")
        epoch, within = divmod(step - self.first_step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            if self._members is None:
                order = torch.randperm(self.n, generator=generator).tolist()
            else:
                order = [i for g in torch.randperm(len(self._members), generator=generator).tolist()
                         for i in self._members[g]]
            length = self.steps_per_epoch * self.global_batch
            self._order = (order * math.ceil(length / self.n))[:length]
            self._epoch = epoch
        block = self._order[within * self.global_batch : (within + 1) * self.global_batch]
        return [block[(a * self.p + rank) * self.b : (a * self.p + rank + 1) * self.b] for a in range(self.a)]
