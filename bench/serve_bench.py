"""Throughput of the sweep server (scripts/serve.py) on concurrent requests spread over several LoRA
adapters of one base: adapters mixed in one batch (the server's default) against one adapter per
batch (what a server without multi-LoRA batching does) and one request at a time.

    python bench/serve_bench.py --wait-idle                      # the example's tiny Llama size
    python bench/serve_bench.py --wait-idle --hidden 512 --layers 6
    python bench/serve_bench.py --quick                          # a smoke test: 6 requests, 1 round

Each round: a fresh base model (built offline like the workflow's tiny model, random weights; or
--model), --adapters LoRA adapters with random weights (r 16, all linear layers), loaded once; then
for each mode a server on a free loopback port, --requests concurrent completion requests through the
`openai` client, spread round-robin over the adapters, greedy, each exactly --tokens tokens long
(ignore_eos). Timed: first request sent to last answer received; throughput in generated tokens per
second. The best of --rounds rounds counts for each mode.
"""
import argparse
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "bench")]
from dpo_bench import busy_cpus  # noqa: E402  (standard library only)

MODES = {"mixed": dict(mix=True, max_batch=32), "one adapter per batch": dict(mix=False, max_batch=32),
         "one request at a time": dict(mix=False, max_batch=1)}
PROMPTS = ["Which word comes after ocean?\n\nList: tiger ocean maple river", "Which number is larger?\n\n17 and 41",
           "How many words are there?\n\nred blue green", "What is the last word?\n\nList: apple stone cloud"]


def build_sweep(args, work):
    """The manifest of a base model and args.adapters random LoRA adapters on it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.data.tokenizer import load_tokenizer
    from finetune.tiny_model import build_tiny_model
    base = Path(args.model) if args.model else work / "model"
    if not args.model:
        build_tiny_model([REPO / "data" / "pretrain_corpus.jsonl"], base, hidden_size=args.hidden,
                         num_layers=args.layers)
    tokenizer = load_tokenizer(base)
    runs = []
    for index in range(args.adapters):
        torch.manual_seed(index)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                               LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
        model.save_pretrained(work / f"adapter-{index}")
        tokenizer.save_pretrained(work / f"adapter-{index}")
        runs.append({"name": f"adapter-{index}", "trained": str(work / f"adapter-{index}")})
    return {"name": "base", "path": str(base), "template": "auto", "runs": runs}


def measure(servables, mode, args):
    """(seconds, generated tokens, batches) of args.requests concurrent requests on a server in this mode."""
    import openai

    import serve
    server = serve.make_server(servables, port=0, max_tokens=args.tokens, **MODES[mode])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="-", max_retries=0)
    names = [name for name in servables if name != "base"]

    def ask(index):
        return client.completions.create(model=names[index % len(names)], prompt=PROMPTS[index % len(PROMPTS)],
                                         max_tokens=args.tokens, temperature=0, extra_body={"ignore_eos": True})
    try:
        ask(0)  # warm-up
        server.app["scheduler"].batches.clear()
        start = time.perf_counter()
        with ThreadPoolExecutor(args.requests) as pool:
            replies = list(pool.map(ask, range(args.requests)))
        seconds = time.perf_counter() - start
    finally:
        server.shutdown()
        server.server_close()
    return seconds, sum(r.usage.completion_tokens for r in replies), list(server.app["scheduler"].batches)


def run_round(args):
    import torch

    from finetune.serving.models import load_servables
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        servables = load_servables(build_sweep(args, Path(folder)))
        result = {}
        for mode in MODES:
            while args.wait_idle and busy_cpus() > 0.1:
                time.sleep(5)
            seconds, tokens, batches = measure(servables, mode, args)
            result[mode] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                            "batches": len(batches), "largest_batch": max(map(len, batches))}
        return result


def report(args, rounds):
    best = {mode: max((r[mode] for r in rounds), key=lambda m: m["tokens_per_s"]) for mode in MODES}
    mixed = best["mixed"]["tokens_per_s"]
    lines = [f"{args.requests} concurrent requests over {args.adapters} adapters, {args.tokens} tokens each; "
             f"model hidden {args.hidden}, {args.layers} layers; {args.threads} threads; best of {len(rounds)}",
             "", "| serving | wall | tokens/s | batches (largest) | mixed / this |", "|---|---|---|---|---|"]
    for mode, m in best.items():
        lines.append(f"| {mode} | {m['seconds']:.2f} s | {m['tokens_per_s']:.0f} | {m['batches']} "
                     f"({m['largest_batch']}) | {mixed / m['tokens_per_s']:.2f}x |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a base model folder (default: a tiny Llama built here)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--wait-idle", action="store_true", help="start each measurement once the CPUs are idle")
    parser.add_argument("--quick", action="store_true", help="smoke test: 6 requests of 4 tokens, 1 round")
    parser.add_argument("--json", type=Path, help="also write the rounds here")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.tokens, args.rounds = 6, 4, 1
    return args


def main(argv=None):
    args = parse_args(argv)
    rounds = [run_round(args) for _ in range(args.rounds)]
    if args.json:
        args.json.write_text(json.dumps(rounds, indent=1))
    print(report(args, rounds))
    return rounds


if __name__ == "__main__":
    main()
