"""Export: merged models equal to base+adapter, model cards from the run's files, and uploads."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

import export
import upload as upload_script
from conftest import REPO, settings_args
from finetune.export.model_card import render
from merge import merge


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_model, shards):
    import train
    out = tmp_path_factory.mktemp("qlora")
    train.main(["--base-model", str(tiny_model), "--shards", *map(str, shards), "--output-dir", str(out / "trained"),
                "--metrics", str(out / "metrics.jsonl"), "--summary", str(out / "summary.json"),
                *settings_args(out, "train", method="qlora", max_steps=20, learning_rate=1e-2,
                               target_modules="all-linear", precision="fp32")])
    return out


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


@pytest.mark.parametrize("run", ["trained_run", "qlora_run"])
def test_merged_logits_match_base_plus_adapter(request, tmp_path, tiny_model, run):
    """Within 1e-4 (fp32) for LoRA and for a QLoRA-trained adapter, which is merged
    into the unquantized base, never into 4-bit weights."""
    adapter = request.getfixturevalue(run) / "trained"
    merged = AutoModelForCausalLM.from_pretrained(merge(tiny_model, adapter, tmp_path / "merged"))
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter)
    assert "Linear4bit" not in {type(m).__name__ for m in merged.modules()}
    ids = [1, 300, 200, 150, 42, 7, 99]
    torch.testing.assert_close(logits_of(merged, ids), logits_of(adapted, ids), atol=1e-4, rtol=1e-4)
    assert (logits_of(merged, ids) - logits_of(AutoModelForCausalLM.from_pretrained(tiny_model), ids)).abs().max() > 1e-3


def test_merged_model_loads_and_generates_without_peft(tmp_path, tiny_model, trained_run):
    merged = merge(tiny_model, trained_run / "trained", tmp_path / "merged", merge_dtype="bf16")
    code = ("import sys; sys.modules['peft'] = None\n"
            "import torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"model = AutoModelForCausalLM.from_pretrained({str(merged)!r})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({str(merged)!r})\n"
            "assert model.dtype == torch.bfloat16, model.dtype\n"
            "ids = tokenizer('Add the two numbers.', return_tensors='pt')\n"
            "print(model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > ids['input_ids'].shape[1])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.stdout.strip().endswith("True"), result.stderr[-2000:]
    assert sorted(p.name for p in merged.glob("*.safetensors")) and (merged / "generation_config.json").exists()


EVALUATION = {"eval_records": 40, "eval_tokens": 110,
              "base": {"loss": 7.3, "perplexity": 1480.3, "exact_match": 0.0, "rouge_l": 0.0, "bleu": 0.0, "chrf": 5.3},
              "tuned": {"loss": 4.1, "perplexity": 60.3, "exact_match": 0.25, "rouge_l": 0.4, "bleu": 1.2, "chrf": 9.9}}
SUMMARY = {"trainable_parameters": 7168, "total_parameters": 758400, "steps": 600, "wall_time_s": 4.2, "processes": 1}
STATS = [{"file": "data/word_tasks.jsonl", "records": 200, "rejected": 3, "duplicates": 1}]
SETTINGS = {"method": "qlora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"], "learning_rate": 0.0002,
            "use_rslora": False}


def front_matter(card):
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.mark.parametrize("kind, library", [("adapter", "peft"), ("merged", "transformers")])
def test_model_card_metadata_parses_and_matches_the_run(kind, library):
    card = render(kind, "r8-qv", "meta-llama/Llama-3.2-1B", SETTINGS, SUMMARY, EVALUATION, STATS, "apache-2.0",
                  "me/r8-qv")
    meta = front_matter(card)
    assert meta["base_model"] == "meta-llama/Llama-3.2-1B" and meta["library_name"] == library
    assert meta["pipeline_tag"] == "text-generation" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["word_tasks"] and "qlora" in meta["tags"]
    assert "| loss | 7.3 | 4.1 |" in card and "| exact_match | 0 | 0.25 |" in card
    assert "| r | 8 |" in card and "7,168 of 758,400" in card and "| word_tasks.jsonl | 200 | 3 | 1 |" in card
    assert "| use_rslora | false |" in card and "| target_modules | q_proj, v_proj |" in card
    assert ("PeftModel.from_pretrained(base, 'me/r8-qv')" in card) == (kind == "adapter")


class StandInHfApi:
    """Records what the upload asks of the Hub, and answers like it."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, private, repo_type, exist_ok):
        self.calls.append(("create_repo", repo_id, private, repo_type, exist_ok))
        return type("RepoUrl", (), {"url": f"https://hub.example/{repo_id}"})()

    def create_branch(self, repo_id, branch, exist_ok):
        self.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, folder_path, repo_id, repo_type, revision, commit_message):
        files = sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())
        self.calls.append(("upload_folder", repo_id, revision, files))
        return type("CommitInfo", (), {"oid": "abc123", "commit_url": f"https://hub.example/{repo_id}/commit/abc123"})()


def test_upload_records_repo_folder_privacy_and_revision(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        (folder / name).write_text("x")
    api = StandInHfApi()
    record = upload_script.upload(folder, "me/r8-qv", private=True, revision="sweep-1", api=api)
    assert api.calls == [
        ("create_repo", "me/r8-qv", True, "model", True),
        ("create_branch", "me/r8-qv", "sweep-1"),
        ("upload_folder", "me/r8-qv", "sweep-1", ["README.md", "adapter_config.json", "adapter_model.safetensors"]),
    ]
    assert record["url"] == "https://hub.example/me/r8-qv" and record["commit_id"] == "abc123"
    assert record["private"] is True and record["revision"] == "sweep-1"


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_hub_client_against_nothing_fails_clearly_and_records_nothing(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "README.md").write_text("card")
    token = "hf_FakeTokenForTests0123456789abcdef"
    env = {**os.environ, "HF_TOKEN": token, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
           "HF_HUB_OFFLINE": "0", "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "upload.py"), "--folder", str(folder),
                             *settings_args(tmp_path, "upload", repo_id="me/r8-qv"),
                             "--output", str(tmp_path / "upload.json")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert f"upload of {folder} to me/r8-qv failed:" in result.stderr
    assert token not in result.stdout + result.stderr
    assert not (tmp_path / "upload.json").exists() and not (tmp_path / "upload.json.partial").exists()


def test_upload_without_a_token_says_how_to_provide_one(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setattr(upload_script, "hub_token", lambda: None)
    with pytest.raises(upload_script.UploadError, match="set HF_TOKEN or run `huggingface-cli login`"):
        upload_script.upload(tmp_path, "me/x", private=True, revision="main")


def test_model_card_of_a_full_fine_tune():
    card = render("model", "full", "results/base_models/tiny-llama", {**SETTINGS, "method": "full"}, SUMMARY,
                  {**EVALUATION, "tuned": {**EVALUATION["tuned"], "exact_match_by_task": {"first_word": 0.9}},
                   "base": {**EVALUATION["base"], "exact_match_by_task": {"first_word": 0.0}}}, STATS)
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and "full" in meta["tags"] and "peft" not in meta["tags"]
    assert "fully fine-tuned model" in card and "PeftModel" not in card
    assert "| exact_match: first_word | 0 | 0.9 |" in card


def export_run(tmp_path, kind, **settings):
    """scripts/export.py on a stand-in run: trained weights (with a README.md of their own), its summary,
    evaluation, dataset stats and a manifest holding the run's settings."""
    weights = tmp_path / "trained"
    weights.mkdir(exist_ok=True)
    for name, text in (("adapter_config.json", "{}"), ("adapter_model.safetensors", "weights"),
                       ("README.md", "peft's own card")):
        (weights / name).write_text(text)
    manifest = {"run": "r8-qv", "seed": 0, "libraries": {"torch": "2.x"}, "device": None, "workflow": None,
                "shards": {}, "base_model": {"name_or_path": "meta-llama/Llama-3.2-1B"}, "settings": SETTINGS,
                "trained": {}}
    files = {"summary": SUMMARY, "eval": EVALUATION, "stats": STATS[0], "manifest": manifest}
    for name, value in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(value))
    folder = tmp_path / kind
    export.main(["--kind", kind, "--weights", str(weights), "--folder", str(folder),
                 *settings_args(tmp_path / "settings" / kind, "export", **settings),
                 "--run-name", "r8-qv", "--base-model", "meta-llama/Llama-3.2-1B",
                 "--summary", str(tmp_path / "summary.json"), "--eval-json", str(tmp_path / "eval.json"),
                 "--manifest", str(tmp_path / "manifest.json"), "--stats", str(tmp_path / "stats.json")])
    return folder


def test_export_publishes_the_weights_with_a_card_of_the_run_settings_in_its_manifest(tmp_path):
    folder = export_run(tmp_path, "adapter", license="apache-2.0", repo_id="me/r8-qv", what="adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json",
                                                        "adapter_model.safetensors", "manifest.json"]
    assert (folder / "adapter_model.safetensors").read_text() == "weights"
    assert (tmp_path / "trained" / "README.md").read_text() == "peft's own card", "the source is not written into"
    card = (folder / "README.md").read_text()
    assert card == render("adapter", "r8-qv", "meta-llama/Llama-3.2-1B", SETTINGS, SUMMARY, EVALUATION, STATS,
                          "apache-2.0", "me/r8-qv", json.loads((tmp_path / "manifest.json").read_text()))
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0" and "qlora" in meta["tags"] and meta["library_name"] == "peft"
    assert "| r | 8 |" in card and "PeftModel.from_pretrained(base, 'me/r8-qv')" in card
    assert json.loads((folder / "manifest.json").read_text())["settings"] == SETTINGS
    assert not (tmp_path / "adapter.partial").exists()


def test_export_of_what_is_not_uploaded_points_its_usage_at_the_folder(tmp_path):
    """The repo id is the usage hint only of the kind that is uploaded (`what`); another kind names its folder."""
    folder = export_run(tmp_path, "merged", repo_id="me/r8-qv", what="adapter")
    card = (folder / "README.md").read_text()
    assert f"AutoModelForCausalLM.from_pretrained({str(folder)!r})" in card and "me/r8-qv" not in card
    assert "license" not in front_matter(card) and front_matter(card)["library_name"] == "transformers"
