"""The OpenAI-style server of a sweep (scripts/serve.py), driven through the real `openai` client:
adapters answered together in one batch and exactly as evaluation answered, streaming, many
concurrent requests, DoRA/AdaLoRA/full runs beside them, a 4-bit base, bad requests and the API key."""
import contextlib
import http.client
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

import evaluate
import serve
import train
from conftest import REPO, settings_args
from finetune.serving.models import load_servables

QUESTIONS = ["Add the two numbers.", {"instruction": "Reverse the order of these words.", "input": "red blue green"}]


def train_run(folder, tiny_model, shards, **settings):
    train.main(["--base-model", str(tiny_model), "--shards", *map(str, shards), "--output-dir", str(folder / "trained"),
                "--metrics", str(folder / "metrics.jsonl"), "--summary", str(folder / "train_summary.json"),
                "--run-name", folder.name,
                *settings_args(folder, "train", **{"log_every": 5, "eval_every": 0, "precision": "fp32", **settings})])
    return folder


def evaluate_run(run, folder, tiny_model, shards):
    folder.mkdir()
    records = folder / "records.jsonl"
    records.write_text("".join(shard.with_suffix(".jsonl").read_text() for shard in shards))
    evaluate.main(["--base-model", str(tiny_model), "--trained-dir", str(run / "trained"),
                   "--shards", *map(str, shards), "--records", str(records), "--eval-json", str(folder / "eval.json"),
                   "--generations", str(folder / "generations.jsonl"), "--run-name", folder.name,
                   *settings_args(folder, "evaluate", prompts=QUESTIONS, num_samples=6, max_new_tokens=12)])
    return [json.loads(line) for line in (folder / "generations.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_model, trained_run, shards):
    """A sweep on the tiny model: LoRA runs a (the shared 60-step run), b and c, a DoRA, an AdaLoRA and a
    full run; a and b evaluated (their generations.jsonl)."""
    root = tmp_path_factory.mktemp("sweep")
    runs = {"a": trained_run}
    for name, settings in [("b", dict(r=4, alpha=8, learning_rate=5e-3, max_steps=15, seed=1)),
                           ("c", dict(r=8, alpha=8, learning_rate=5e-3, max_steps=5, seed=2)),
                           ("dora", dict(method="dora", r=4, learning_rate=5e-3, max_steps=5)),
                           ("adalora", dict(method="adalora", r=4, learning_rate=5e-3, max_steps=10)),
                           ("full", dict(method="full", learning_rate=1e-3, max_steps=5))]:
        runs[name] = train_run(root / name, tiny_model, shards, **settings)
    generations = {name: evaluate_run(runs[name], root / f"eval-{name}", tiny_model, shards) for name in ("a", "b")}
    manifest = {"name": "tiny", "path": str(tiny_model), "template": "auto", "trust_remote_code": False,
                "runs": [{"name": name, "trained": str(folder / "trained")} for name, folder in runs.items()]}
    return manifest, generations


@pytest.fixture(scope="module")
def server(sweep):
    manifest, _ = sweep
    running = serve.make_server(load_servables(manifest), port=0, max_batch=32)
    threading.Thread(target=running.serve_forever, daemon=True).start()
    yield running
    running.shutdown()


@contextlib.contextmanager
def batch_of(server, count, timeout=60):
    """The server's next batch waits until `count` requests are waiting (on a loaded machine the requests
    of a burst may arrive further apart than the server's gathering waits)."""
    scheduler = server.app["scheduler"]

    def gather(longest_s=None):
        deadline = time.perf_counter() + timeout
        while len(scheduler.waiting) < count and time.perf_counter() < deadline:
            time.sleep(0.01)
    scheduler.gather = gather
    try:
        yield
    finally:
        del scheduler.gather


def client_of(server, key="unused", retries=0):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key=key, max_retries=retries)


def chat(client, model, question, **options):
    content = question if isinstance(question, str) else f"{question['instruction']}\n\n{question['input']}"
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                           temperature=0, **options)
    return reply.choices[0].message.content


def test_every_run_and_the_base_are_listed_by_kind(server):
    listed = {m.id: m.model_extra["kind"] for m in client_of(server).models.list().data}
    assert listed == {"tiny": "base", "a": "lora", "b": "lora", "c": "lora", "dora": "dora", "adalora": "adalora",
                      "full": "full"}


def test_two_adapters_answer_in_one_batch_as_evaluation_answered(server, sweep):
    """Requests for a, b and the base sent together share batches; every greedy answer equals what
    evaluate generated for the same prompt (generations.jsonl: tuned, and base)."""
    _, generations = sweep
    client, batches_before = client_of(server), len(server.app["scheduler"].batches)
    asks = [(run, g["question"], g["tuned"]) for run in ("a", "b") for g in generations[run]]
    asks += [("tiny", g["question"], g["base"]) for g in generations["a"]]
    with batch_of(server, len(asks)), ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(lambda ask: chat(client, ask[0], ask[1], max_tokens=12).strip(), asks))
    assert answers == [expected for _, _, expected in asks]
    batches = server.app["scheduler"].batches[batches_before:]
    assert any({"a", "b"} <= set(batch) for batch in batches), batches


def test_streamed_answer_is_the_whole_answer_in_pieces(server, sweep):
    _, generations = sweep
    client = client_of(server)
    whole = chat(client, "a", generations["a"][0]["question"], max_tokens=12)
    stream = client.chat.completions.create(model="a", temperature=0, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": generations["a"][0]["question"]}])
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == whole and len([p for p in pieces if p]) > 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1
    completion = list(client.completions.create(model="b", prompt="red blue", max_tokens=5, stream=True))
    assert "".join(c.choices[0].text for c in completion) == client.completions.create(
        model="b", prompt="red blue", max_tokens=5).choices[0].text


def test_32_concurrent_requests_over_3_adapters_all_complete(server):
    client, before = client_of(server), len(server.app["scheduler"].batches)
    asks = [("a", "b", "c")[i % 3] for i in range(32)]
    with batch_of(server, 32), ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(lambda run: client.completions.create(model=run, prompt="Sort: red blue", max_tokens=8,
                                                                      temperature=0.7, seed=1), asks))
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in replies)
    assert {r.model for r in replies} == {"a", "b", "c"}
    batches = server.app["scheduler"].batches[before:]
    assert sum(map(len, batches)) == 32 and max(map(len, batches)) == 32  # the three adapters in one batch


def test_dora_adalora_and_full_runs_answer_as_their_own_model_does(server, sweep):
    """Runs peft cannot mix are answered a batch of their own at a time, like a model of their own."""
    from finetune.evaluation.generation import generate
    servables = server.app["servables"]
    client = client_of(server)
    for name in ("dora", "adalora", "full"):
        servable = servables[name]
        prompt = servable.tokenizer("red blue green").input_ids
        from finetune.serving.scheduler import adapter_context
        with adapter_context(servable):
            expected = generate(servable.model, servable.tokenizer, [prompt], 6, 1, 0.0, 1.0, 0, servable.stop_ids)[0]
        assert client.completions.create(model=name, prompt="red blue green", max_tokens=6,
                                         temperature=0).choices[0].text.strip() == expected


def test_bad_requests_get_the_openai_error_and_the_server_keeps_serving(server):
    client = client_of(server)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="a", prompt="hi", max_tokens=10_000)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="a", prompt="red " * 2100, max_tokens=10)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="a", messages=[{"role": "robot", "content": "hi"}])
    port = server.server_address[1]
    for body, status in [(b"{not json", 400), (b"[1, 2]", 400), (b"x" * 1_000_001, 413)]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        error = json.loads(response.read())["error"]
        assert response.status == status and error["message"] and error["type"] == "invalid_request_error"
    assert client.completions.create(model="a", prompt="red", max_tokens=2).choices[0].finish_reason


def test_base_in_4bit_serves_the_adapters(sweep):
    pytest.importorskip("bitsandbytes")
    manifest, _ = sweep
    servables = load_servables({**manifest, "runs": manifest["runs"][:2]}, quantization="4bit")
    assert type(servables["tiny"].model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ \
        == "Linear4bit"
    running = serve.make_server(servables, port=0)
    threading.Thread(target=running.serve_forever, daemon=True).start()
    try:
        assert client_of(running).completions.create(model="b", prompt="red blue", max_tokens=4).choices[0].text
    finally:
        running.shutdown()


def test_api_key_is_required_and_never_logged(sweep, tmp_path):
    """The CLI as users start it: loopback only, the key from the environment; a missing or wrong
    key gets 401, the right one an answer, and the key appears in no output."""
    manifest, _ = sweep
    (tmp_path / "m.json").write_text(json.dumps({**manifest, "runs": manifest["runs"][:1]}))
    key = "sk-test-7d1f0c2b"
    process = subprocess.Popen([sys.executable, str(REPO / "scripts" / "serve.py"), "--manifest", str(tmp_path / "m.json"),
                                "--port", "0"], env={**__import__("os").environ, "FINETUNE_API_KEY": key},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = process.stdout.readline()
        assert "http://127.0.0.1:" in banner and "API key required" in banner, banner + process.stderr.read()
        port = int(banner.split("http://127.0.0.1:")[1].split("/")[0])
        address = f"http://127.0.0.1:{port}/v1"
        for wrong in ("", "sk-wrong"):
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=address, api_key=wrong or "none", max_retries=0,
                              default_headers={} if wrong else {"Authorization": ""}).models.list()
        right = openai.OpenAI(base_url=address, api_key=key, max_retries=0)
        assert right.completions.create(model="a", prompt="red", max_tokens=2).choices
    finally:
        process.terminate()
        output = process.communicate(timeout=30)
    assert key not in banner + "".join(output)


def test_stacked_adapters_compute_what_peft_mixed_batches_compute(server):
    """The one-pass mixed LoRA (finetune/serving/mixed_lora.py) against peft's adapter_names= path, on a
    batch whose rows use the base and three adapters of different ranks."""
    import torch

    from finetune.serving.mixed_lora import mixed_adapters
    servables = server.app["servables"]
    names = ["tiny", "a", "b", "c", "b", "a"]
    model = servables["a"].model
    input_ids = torch.randint(5, 500, (len(names), 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with mixed_adapters(model, servables["a"].stacks, [servables[n].row for n in names]):
            stacked = model(input_ids=input_ids).logits
        reference = model(input_ids=input_ids, adapter_names=[servables[n].adapter for n in names]).logits
        with model.disable_adapter():
            base = model(input_ids=input_ids).logits
    assert torch.allclose(stacked, reference, atol=1e-5)
    assert (stacked[1:] - base[1:]).abs().amax(dim=(1, 2)).min() > 1e-3  # every adapter row changed something
    assert torch.equal(stacked[0], base[0])
