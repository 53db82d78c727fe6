"""Serving what the GRPO example trained (the default runs and the example's, grpo_finished in conftest.py):
the workflow writes one manifest and vLLM command per base model; the server started from a manifest
answers as each run's evaluation did, two LoRA runs sharing a batch."""
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

import serve
from finetune.serving.models import load_servables
from test_serve import batch_of

pytestmark = pytest.mark.slow


def test_each_base_model_gets_a_manifest_and_a_vllm_command(grpo_finished):
    serving = grpo_finished / "results" / "serve"
    manifest = json.loads((serving / "tiny-llama.json").read_text())
    assert manifest["path"] == "results/base_models/tiny-llama"
    assert {r["name"]: r["method"] for r in manifest["runs"]} == {"lora-r16": "lora", "full": "full",
                                                                  "sft-short": "lora"}
    vllm = (serving / "tiny-llama.vllm.sh").read_text()
    assert "vllm serve results/base_models/tiny-llama --served-model-name tiny-llama --enable-lora" in vllm
    assert "lora-r16=results/runs/lora-r16/trained" in vllm and "sft-short=results/runs/sft-short/trained" in vllm
    assert "# vllm serve results/runs/full/trained --served-model-name full" in vllm
    chained = json.loads((serving / "sft-short.tuned.json").read_text())
    assert chained["path"] == "results/runs/sft-short/merged_weights" and [r["name"] for r in chained["runs"]] == [
        "grpo"]


@pytest.fixture
def evaluation_threads():
    """The evaluate jobs ran with 2 threads (the rule's threads); tests before may have left torch at 1
    (train.main(["--threads", "1"])), and another thread count sums in another order: a near tie can flip."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_the_served_runs_answer_as_their_evaluation_did(grpo_finished, monkeypatch, evaluation_threads):
    monkeypatch.chdir(grpo_finished)  # the manifest's paths are the project's
    manifest = json.loads((grpo_finished / "results/serve/tiny-llama.json").read_text())
    server = serve.make_server(load_servables(manifest), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="-", max_retries=0)
    asks = []
    for run in ("lora-r16", "sft-short", "full"):
        lines = (grpo_finished / f"results/runs/{run}/generations.jsonl").read_text().splitlines()
        asks += [(run, g["question"], g["tuned"]) for g in map(json.loads, lines[:10])]

    def ask(item):
        run, question, _ = item
        reply = client.chat.completions.create(model=run, messages=[{"role": "user", "content": question}],
                                               max_tokens=16, temperature=0)  # the example's eval.max_new_tokens
        return reply.choices[0].message.content.strip()
    try:
        with batch_of(server, len(asks)), ThreadPoolExecutor(len(asks)) as pool:
            answers = list(pool.map(ask, asks))
    finally:
        server.shutdown()
    assert answers == [expected for _, _, expected in asks]
    assert sum(a == "The first word is tiger." for a in answers) >= 2, "trained answers, not noise"
    assert any({"lora-r16", "sft-short"} <= set(batch) for batch in server.app["scheduler"].batches)
