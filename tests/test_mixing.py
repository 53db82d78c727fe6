"""Weighted dataset mixing: each weight is its dataset's share of every epoch's
training examples (mixing.py); the summary counts what each one contributed."""
import collections
import json
from pathlib import Path

import numpy as np
import pytest

import train
from conftest import settings_args
from finetune.data.batches import length_grouped_batches, micro_batch_indices
from finetune.data.mixing import epoch_examples, epoch_shares, source_of_positions
from finetune.settings import read_settings
from workflow import copy_workflow, dry_run_jobs, snakemake

QUICK_TRAIN = dict(r=8, alpha=16, learning_rate=1e-2, batch_size=8, log_every=10, eval_every=0, precision="fp32")


def test_each_epoch_holds_every_source_in_proportion_to_its_weight():
    sizes = [900, 100]
    shares = epoch_shares(sizes, [0.7, 0.3])
    assert shares == [700, 300]
    assert epoch_shares(sizes, [7, 3]) == shares, "weights are normalized"
    assert sum(epoch_shares([333, 334, 335], [1, 1, 1])) == 1002, "rounding keeps the epoch's length"


def test_a_short_source_repeats_whole_and_a_long_one_is_seen_whole_before_it_repeats():
    sizes, shares = [900, 100], [700, 300]
    source = source_of_positions(sizes)
    long_drawn = []
    for epoch in range(4):
        positions = epoch_examples(sizes, shares, 0, epoch)
        assert np.bincount(source[positions]).tolist() == shares
        short = collections.Counter(positions[source[positions] == 1].tolist())
        assert set(short.values()) == {3} and len(short) == 100, "each of the 100 examples three times"
        long = positions[source[positions] == 0].tolist()
        assert len(set(long)) == 700, f"epoch {epoch} holds an example of the long source twice"
        long_drawn += long
    for start in range(0, len(long_drawn) - 900, 900):
        assert sorted(long_drawn[start:start + 900]) == list(range(900)), "the whole source before any repeat"
    assert epoch_examples(sizes, shares, 0, 1).tolist() != epoch_examples(sizes, shares, 1, 1).tolist()
    assert epoch_examples(sizes, shares, 0, 2).tolist() == epoch_examples(sizes, shares, 0, 2).tolist()


def test_an_upsampled_source_gives_each_example_whole_or_one_more_times_and_rotates_the_extras():
    sizes, shares = [100, 1000], [120, 980]
    extras = []
    for epoch in range(5):
        positions = epoch_examples(sizes, shares, 0, epoch)
        counts = np.bincount(positions[positions < 100], minlength=100)
        assert sorted(set(counts.tolist())) == [1, 2] and counts.sum() == 120
        extras += np.flatnonzero(counts == 2).tolist()
    assert sorted(extras) == list(range(100)), "5 epochs x 20 extra copies: each example once"


def test_mixed_batches_are_deterministic_for_the_seed_and_unweighted_ones_unchanged():
    lengths = [(i * 37) % 90 + 5 for i in range(300)]
    mix = ([200, 100], [0.2, 0.8])

    def first(seed, n=60, mix=mix):
        batches = micro_batch_indices(lengths, 4, seed, 0, 1, mix)
        return [next(batches)[1] for _ in range(n)]
    assert first(0) == first(0) and first(0) != first(1)
    assert length_grouped_batches(lengths, 4, 5) == length_grouped_batches(lengths, 4, 5, pool=range(300))
    drawn = np.bincount(source_of_positions([200, 100])[np.concatenate(first(0, n=75))])
    assert drawn.tolist() == [60, 240], "one epoch (300 examples, 75 batches of 4) in the weights' shares"


def test_training_reports_how_many_examples_each_dataset_contributed(tmp_path, tiny_model, shards):
    """shards: 'words' and 'numbers', 179 and 177 training examples; weights 0.9 / 0.1."""
    out = tmp_path / "run"
    train.main(["--base-model", str(tiny_model), "--shards", *map(str, shards),
                "--output-dir", str(out / "trained"), "--metrics", str(out / "metrics.jsonl"),
                "--summary", str(out / "summary.json"),
                *settings_args(tmp_path, "train", datasets={"words": 0.9, "numbers": 0.1}, max_steps=45,
                               **QUICK_TRAIN)])
    sources = json.loads((out / "summary.json").read_text())["sources"]
    assert list(sources) == ["words", "numbers"]
    words, numbers = sources["words"], sources["numbers"]
    assert (words["weight"], numbers["weight"]) == (0.9, 0.1)
    assert words["per_epoch"] + numbers["per_epoch"] == words["train_records"] + numbers["train_records"]
    assert words["per_epoch"] == 320 and numbers["per_epoch"] == 36, "0.9 and 0.1 of the 356 training examples"
    # 45 steps of 8 are one epoch: 44 full batches and one of 4.
    assert (words["examples_trained"], numbers["examples_trained"]) == (320, 36)


@pytest.mark.parametrize("weights", [{"words": 1.0}, {"words": 0.5, "numbers": 0.3, "letters": 0.2}],
                         ids=["too-few", "not-a-shard"])
def test_training_refuses_weights_that_do_not_match_the_shards(tmp_path, tiny_model, shards, weights):
    settings = settings_args(tmp_path, "train", datasets=weights)
    with pytest.raises(SystemExit) as refused:
        train.main(["--base-model", str(tiny_model), "--shards", *map(str, shards), "--output-dir", str(tmp_path / "t"),
                    "--metrics", str(tmp_path / "m"), "--summary", str(tmp_path / "s"), *settings])
    assert (f"the weighted datasets {sorted(weights)} are not the shards' ['numbers', 'words']"
            in str(refused.value.code))
    assert not (tmp_path / "t").exists() and not (tmp_path / "m").exists()


@pytest.mark.parametrize("weights", [{"words": 0, "numbers": 1.0}, {"words": -0.5, "numbers": 1.0}],
                         ids=["zero", "negative"])
def test_a_weight_that_is_not_positive_is_refused(tmp_path, tiny_model, shards, weights):
    with pytest.raises(ValueError, match=r"settings of train: 'datasets': .* is not valid"):
        settings_args(tmp_path, "train", datasets=weights)
    _, path = settings_args(tmp_path, "train")
    Path(path).write_text(json.dumps({**json.loads(Path(path).read_text()), "datasets": weights}))
    with pytest.raises(SystemExit) as refused:
        train.main(["--base-model", str(tiny_model), "--shards", *map(str, shards), "--output-dir", str(tmp_path / "t"),
                    "--metrics", str(tmp_path / "m"), "--summary", str(tmp_path / "s"), "--settings", path])
    assert f"{path}: not the settings of train: 'datasets': {weights}" in str(refused.value.code)
    assert not (tmp_path / "t").exists()


@pytest.fixture
def workdir(tmp_path):
    return copy_workflow(tmp_path / "wf")


def configure(workdir, runs):
    with open(workdir / "config" / "config.yaml", "a") as f:
        f.write(runs)


def test_a_weighted_run_trains_on_its_datasets_with_their_weights(workdir):
    configure(workdir, "  mixed:\n    datasets: {word_tasks: 0.7, number_tasks: 0.3}\n")
    commands = [shell for rule, _, shell in dry_run_jobs(workdir, "results/runs/mixed/trained") if rule == "train"]
    assert len(commands) == 1
    assert "word_tasks.arrow" in commands[0] and "number_tasks.arrow" in commands[0]
    assert "--settings results/runs/mixed/settings/train.json" in commands[0]
    files = [f"results/runs/{run}/settings/train.json" for run in ("mixed", "lora-r16")]
    snakemake(workdir, *files, "--cores", "1")
    mixed, listed = (read_settings(workdir / file, "train") for file in files)
    assert mixed.datasets == {"word_tasks": 0.7, "number_tasks": 0.3}
    assert isinstance(listed.datasets, list), "a list of datasets trains on every example once per epoch"
