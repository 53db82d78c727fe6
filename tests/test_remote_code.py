"""A model whose code is not in transformers (an auto_map to Python files it ships)
runs only when its base model sets trust_remote_code: true; the choice is recorded."""
import json
import shutil

import pytest

import evaluate
import merge
import train
from conftest import settings_args
from finetune.export.model_card import render
from workflow import copy_workflow, snakemake

CONFIGURATION = '''from transformers import LlamaConfig


class ShippedConfig(LlamaConfig):
    model_type = "shipped-llama"
'''
MODELING = '''from transformers import LlamaForCausalLM

from .configuration_shipped import ShippedConfig


class ShippedForCausalLM(LlamaForCausalLM):
    config_class = ShippedConfig
'''


@pytest.fixture(scope="module")
def shipped_model(tmp_path_factory, tiny_model):
    """The tiny model, declared as a model type transformers does not know, with its code beside it."""
    folder = tmp_path_factory.mktemp("remote") / "shipped"
    shutil.copytree(tiny_model, folder)
    (folder / "configuration_shipped.py").write_text(CONFIGURATION)
    (folder / "modeling_shipped.py").write_text(MODELING)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="shipped-llama", architectures=["ShippedForCausalLM"],
                  auto_map={"AutoConfig": "configuration_shipped.ShippedConfig",
                            "AutoModelForCausalLM": "modeling_shipped.ShippedForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def train_args(model, shards, out, **settings):
    return ["--base-model", str(model), "--shards", *map(str, shards), "--output-dir", str(out / "trained"),
            "--metrics", str(out / "metrics.jsonl"), "--summary", str(out / "summary.json"),
            *settings_args(out / "settings", "train", max_steps=3, checkpoint_every=0, **settings)]


def test_shipped_code_is_refused_unless_trusted(tmp_path, shipped_model, shards):
    with pytest.raises(SystemExit, match=r"shipped runs its own code \(configuration_shipped.py, modeling_shipped.py\)"
                                         r".*set trust_remote_code: true"):
        train.main(train_args(shipped_model, shards, tmp_path))
    assert not tmp_path.joinpath("trained").exists()


def test_trusted_shipped_code_trains_evaluates_merges_and_is_recorded(tmp_path, shipped_model, shards):
    train.main(train_args(shipped_model, shards, tmp_path, trust_remote_code=True))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["trust_remote_code"] is True
    evaluate.main(["--base-model", str(shipped_model), "--trained-dir", str(tmp_path / "trained"),
                   "--shards", *map(str, shards), "--records", *[str(s.with_suffix(".jsonl")) for s in shards],
                   "--eval-json", str(tmp_path / "eval.json"), "--generations", str(tmp_path / "g.jsonl"),
                   *settings_args(tmp_path / "settings", "evaluate", num_samples=2, max_new_tokens=2,
                                  trust_remote_code=True)])
    merge.main(["--base-model", str(shipped_model), "--adapter-dir", str(tmp_path / "trained"),
                "--output-dir", str(tmp_path / "merged"),
                *settings_args(tmp_path / "settings", "merge", trust_remote_code=True)])
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "shipped-llama"
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    card = render("adapter", "r", str(shipped_model), {"method": "lora"}, summary, evaluation, [])
    assert "| trust_remote_code | true |" in card
    assert f"AutoModelForCausalLM.from_pretrained({str(shipped_model)!r}, trust_remote_code=True)" in card


CONFIG = """
base_models:
  shipped: {name_or_path: ./models/shipped%s}
datasets:
  word_tasks: {path: data/word_tasks.jsonl, format: alpaca}
runs:
  lora: {max_steps: 2}
"""


def test_the_workflow_refuses_shipped_code_before_any_job(tmp_path, shipped_model):
    workdir = copy_workflow(tmp_path / "wf")
    shutil.copytree(shipped_model, workdir / "models" / "shipped")
    args = ["-n", "--configfile", "override.yaml", "--replace-workflow-config"]
    (workdir / "override.yaml").write_text(CONFIG % "")
    result = snakemake(workdir, *args, check=False)
    assert result.returncode != 0
    assert ("base model 'shipped': ./models/shipped runs its own Python code (auto_map in config.json)"
            in result.stdout + result.stderr)
    (workdir / "override.yaml").write_text(CONFIG % ", trust_remote_code: true")
    assert "train" in snakemake(workdir, *args).stdout
