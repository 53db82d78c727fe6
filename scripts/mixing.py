"""Weighted dataset mixing: which training examples of each source an epoch holds.

A run's datasets given as weights, e.g. {word_tasks: 0.7, number_tasks: 0.3}, mean:
each weight is its source's share of every epoch's training examples. An epoch
holds as many examples as all sources together (N, the sum of their training
examples), so the same data mixed with other weights trains the same number of
steps per epoch. The weights are normalized to sum to 1; source i then gives
round(w_i * N) examples (largest remainders, so the counts sum to N):

- no more than it holds: the next that many of a shuffled pass over the source
  (downsampling; the whole source is seen before any example repeats, though an
  epoch that spans the end of one pass and the start of the next can hold an
  example twice);
- more than it holds: every example as many whole times as fit, and the rest from
  the next shuffled pass (upsampling: repetition, never a made-up example).

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


def epoch_examples(sizes, shares, seed, epoch):
    """Positions (into the sources laid end to end) of one epoch's examples, in source order.
    Each source is an endless run of passes over its examples, each pass in its own shuffled
    order; epoch e takes the next `share` of them. So no example repeats before the whole
    source was seen, and an epoch of a short source holds each example equally often (+-1)."""
    chosen, start = [], 0
    for source, (size, share) in enumerate(zip(sizes, shares)):
        first, end = epoch * share, (epoch + 1) * share
        for one_pass in range(first // size, -(-end // size)) if size and share else []:
            order = np.random.default_rng([seed, source, one_pass]).permutation(size)
            begin = one_pass * size
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
