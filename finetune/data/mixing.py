"""Weighted dataset mixing: which training examples of each source an epoch holds.

A run's datasets given as weights, e.g. {word_tasks: 0.7, number_tasks: 0.3}, mean:
each weight is its source's share of every epoch's training examples. An epoch
holds as many examples as all sources together (N, the sum of their training
examples), so the same data mixed with other weights trains the same number of
steps per epoch. The weights are normalized to sum to 1; source i then gives
round(w_i * N) examples (largest remainders, so the counts sum to N):

- no more than it holds: the next that many of an endless run of shuffled passes
  over the source (downsampling: no epoch holds an example twice, and the whole
  source is seen before any example repeats);
- more than it holds: every example as many whole times as fit, and the rest the
  same way (upsampling: each example whole or whole + 1 times per epoch, the extra
  copies rotating over the epochs; repetition, never a made-up example).

Without weights (a list of datasets) every example is in every epoch once.
The sampling is deterministic for the seed and the epoch.
"""
import numpy as np


def epoch_shares(sizes, weights):
    """The examples each source gives to one epoch: round(w_i * N), summing to N."""
    total, weights = sum(sizes), np.asarray(weights, dtype=float)
    exact = weights / weights.sum() * total
    shares = np.floor(exact).astype(int)
    by_remainder = np.argsort(-(exact - shares), kind="stable")
    shares[by_remainder[:total - shares.sum()]] += 1
    return shares.tolist()


# Per source, the last pass whose order was worked out: epochs ask for their passes in order.
LAST_PASS = {}


def pass_order(size, share, seed, source, number):
    """The order of pass `number` over a source of `size` examples that gives `share` to each epoch."""
    key = (size, share, seed, source)
    known, order = LAST_PASS.get(key, (-1, None))
    if known > number:
        known, order = -1, None
    while known < number:
        known += 1
        order = shuffled_pass(size, share, seed, source, known, order)
    LAST_PASS[key] = (known, order)
    return order


def shuffled_pass(size, share, seed, source, number, previous):
    """A seeded shuffle. When a pass begins inside an epoch, the examples that epoch took from the
    end of the previous pass go last (share < size: they are fewer than the pass holds), so no
    epoch takes an example twice from the passes."""
    order = np.random.default_rng([seed, source, number]).permutation(size)
    begin = number * size
    epoch_start = begin // share * share
    if previous is None or epoch_start == begin:
        return order
    taken = np.zeros(size, dtype=bool)
    taken[previous[epoch_start - (number - 1) * size:]] = True
    return np.concatenate([order[~taken[order]], order[taken[order]]])


def epoch_examples(sizes, shares, seed, epoch):
    """Positions (into the sources laid end to end) of one epoch's examples, in source order.
    A source whose share is `whole` times its size plus `rest` gives every example `whole` times
    and the next `rest` of an endless run of shuffled passes over it: the extra examples rotate
    over the epochs, no epoch takes one twice, and none repeats before the whole source was."""
    chosen, start = [], 0
    for source, (size, share) in enumerate(zip(sizes, shares)):
        whole, rest = divmod(share, size) if size else (0, 0)
        chosen.append(np.tile(np.arange(start, start + size), whole))
        first, end = epoch * rest, (epoch + 1) * rest
        for number in range(first // size, -(-end // size)) if rest else []:
            order = pass_order(size, rest, seed, source, number)
            begin = number * size
            chosen.append(start + order[max(first - begin, 0):min(end - begin, size)])
        start += size
    return np.concatenate(chosen).astype(np.int64) if chosen else np.zeros(0, np.int64)


def source_of_positions(sizes):
    """The source index of each position of the sources laid end to end."""
    return np.repeat(np.arange(len(sizes)), sizes)


def describe_mix(names, sizes, weights):
    """{source: {weight, train_records, per_epoch}}: what the summary and the log report."""
    shares = epoch_shares(sizes, weights)
    total_weight = float(sum(weights))
    return {name: {"weight": round(weight / total_weight, 6), "train_records": int(size), "per_epoch": int(share)}
            for name, size, weight, share in zip(names, sizes, weights, shares)}
