"""The run manifest's parts that need no training: the workflow's git commit,
the base model's hashes, a Hub model that is not in the cache (offline)."""
import hashlib
import json
import subprocess

import manifest as manifest_script
from finetune.export.manifest import (build_manifest, describe_base_model, git_commit, safetensors_header_sha256,
                                      summary_rows)


def git(folder, *args):
    return subprocess.run(["git", "-C", str(folder), "-c", "user.email=t@t", "-c", "user.name=t", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def test_the_commit_of_a_git_checkout_and_whether_it_has_edits(tmp_path):
    assert git_commit(tmp_path) is None
    git(tmp_path, "init", "-q")
    (tmp_path / "Snakefile").write_text("# rules\n")
    git(tmp_path, "add", "Snakefile")
    git(tmp_path, "commit", "-qm", "first")
    assert git_commit(tmp_path) == {"commit": git(tmp_path, "rev-parse", "HEAD"), "dirty": False}
    (tmp_path / "results.txt").write_text("untracked outputs are no edit\n")
    assert git_commit(tmp_path)["dirty"] is False
    (tmp_path / "Snakefile").write_text("# rules, edited\n")
    assert git_commit(tmp_path)["dirty"] is True


def test_the_base_model_is_described_by_hashes_of_its_files_and_weights_headers(tiny_model):
    description = describe_base_model(str(tiny_model))
    assert set(description["files_sha256"]) >= {"config.json", "tokenizer.json"}
    weights = description["weights"]["model.safetensors"]
    assert weights["bytes"] == (tiny_model / "model.safetensors").stat().st_size
    assert weights["header_sha256"] == safetensors_header_sha256(tiny_model / "model.safetensors")


def test_a_hub_model_is_described_from_the_local_cache_with_its_revision(monkeypatch, tmp_path):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert describe_base_model("meta-llama/Llama-3.2-1B") == {"name_or_path": "meta-llama/Llama-3.2-1B",
                                                              "resolved": False}, "not cached: named, not fetched"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text(commit)
    description = describe_base_model("org/tiny")
    assert description["hub_revision"] == commit
    assert description["files_sha256"]["config.json"] == hashlib.sha256(b'{"model_type": "llama"}').hexdigest()


def test_the_manifest_carries_what_training_recorded(tmp_path, tiny_model, shards):
    summary = {"environment": {"libraries": {"torch": "2.x"}, "device": {"type": "cuda", "name": "NVIDIA H100",
                                                                         "count": 2, "processes": 2}},
               "steps": 10}
    settings = {"seed": 3, "r": 8, "datasets": {"words": 0.7, "numbers": 0.3}}
    manifest = build_manifest("r8", settings, summary, shards, str(tiny_model), tmp_path)
    assert manifest["seed"] == 3 and manifest["settings"] == settings
    assert list(manifest["settings"]["datasets"]) == ["words", "numbers"], "the order of the shards is kept"
    assert manifest["libraries"]["torch"] == "2.x" and manifest["libraries"]["snakemake"]
    assert list(manifest["shards"]) == ["words", "numbers"]
    rows = dict(summary_rows(json.loads(json.dumps(manifest))))
    assert rows["device"] == "2 x NVIDIA H100, 2 process(es)" and rows["workflow commit"] == "not a git checkout"


def test_the_manifest_script_takes_the_run_settings_from_its_settings_file(tmp_path, tiny_model, shards):
    """scripts/manifest.py: --settings is the run's settings.json (every setting of the run), carried whole."""
    settings = {"seed": 5, "method": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"],
                "datasets": {"words": 0.9, "numbers": 0.1}}
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 10, "processes": 1}))
    manifest_script.main(["--run-name", "r8", "--settings", str(tmp_path / "settings.json"),
                          "--summary", str(tmp_path / "summary.json"), "--shards", *map(str, shards),
                          "--base-model", str(tiny_model), "--workflow-dir", str(tmp_path),
                          "--output", str(tmp_path / "manifest.json")])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["settings"] == settings and manifest["seed"] == 5 and manifest["run"] == "r8"
    assert manifest["trained"]["steps"] == 10 and list(manifest["shards"]) == ["words", "numbers"]
