"""Serve a base model and every run trained on it behind an OpenAI-style HTTP API:
GET /v1/models, POST /v1/completions and /v1/chat/completions (streamed with "stream": true).
Each run answers under its own name, the base under the base model's; requests for different
LoRA adapters share one batch (finetune/serving). The manifest is what the workflow writes for
each base model (results/serve/{base_model}.json, beside the equivalent vLLM command).

    python scripts/serve.py --manifest results/serve/tiny-llama.json [--port 8000] [--api-key KEY]

Listens on 127.0.0.1 unless --host says otherwise. With an API key (--api-key or the
FINETUNE_API_KEY environment variable) a request without `Authorization: Bearer KEY` gets 401;
the key is never printed or logged.
"""
import argparse
import hmac
import json
import os
import queue
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from finetune.models import DTYPES, resolve_precision
from finetune.serving.api import (ApiError, answer, chat_prompt, check_length, check_type, chunk, completion_prompts,
                                  model_list, new_id, sampling, seeded_generator, served_model, usage)
from finetune.serving.decode import Sequence
from finetune.serving.models import load_servables
from finetune.serving.scheduler import Job, Scheduler

API_KEY_VARIABLE = "FINETUNE_API_KEY"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "finetune-serve"
    app = None  # set per server: servables, scheduler, limits, api_key, created

    def log_message(self, format, *args):  # the request line and status only: never a header (the API key)
        sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def send_json(self, status, body, close=False):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def authorize(self):
        key = self.app["api_key"]
        given = self.headers.get("Authorization", "")
        if key and not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'", None,
                           "invalid_api_key")

    def read_body(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(411, "a request body needs a Content-Length", None, "length_required")
        if int(length) > self.app["limits"]["max_body_bytes"]:
            self.discard(int(length))  # a client sends its whole body before it reads the answer
            raise ApiError(413, f"the request body is {length} bytes; the limit is "
                           f"{self.app['limits']['max_body_bytes']}", None, "request_too_large")
        try:
            body = json.loads(self.rfile.read(int(length)))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
        return body

    def discard(self, length, most=64 << 20):
        left = min(length, most)
        while left > 0:
            read = len(self.rfile.read(min(1 << 16, left)))
            if not read:
                break
            left -= read

    def handle_errors(self, action):
        try:
            self.authorize()
            action()
        except ApiError as error:  # a body left unread would be taken for the next request: close
            self.send_json(error.status, error.body(), close=True)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def do_GET(self):
        def action():
            if self.path.rstrip("/") == "/v1/models":
                return self.send_json(200, model_list(self.app["servables"], self.app["created"]))
            if self.path.startswith("/v1/models/"):
                listed = model_list(self.app["servables"], self.app["created"])["data"]
                found = [m for m in listed if m["id"] == self.path[len("/v1/models/"):]]
                if found:
                    return self.send_json(200, found[0])
                raise ApiError(404, f"The model '{self.path[len('/v1/models/'):]}' does not exist", "model",
                               "model_not_found")
            if self.path == "/health":
                return self.send_json(200, {"status": "ok"})
            raise ApiError(404, f"no such endpoint: GET {self.path}", None, "unknown_url")
        self.handle_errors(action)

    def refuse_method(self):
        def action():
            raise ApiError(405, f"{self.command} is not supported here: GET /v1/models, POST /v1/completions or "
                           "/v1/chat/completions", None, "method_not_allowed")
        self.handle_errors(action)

    do_PUT = do_DELETE = do_PATCH = refuse_method

    def do_POST(self):
        routes = {"/v1/completions": False, "/v1/chat/completions": True}

        def action():
            if self.path not in routes:
                raise ApiError(404, f"no such endpoint: POST {self.path}", None, "unknown_url")
            self.complete(self.read_body(), chat=routes[self.path])
        self.handle_errors(action)

    def complete(self, body, chat):
        servable = served_model(body, self.app["servables"])
        options, n, seed = sampling(body, self.app["limits"])
        stop_ids = frozenset() if options.pop("ignore_eos") else frozenset(servable.stop_ids)
        stream = bool(check_type(body, "stream", bool))
        prompts = [chat_prompt(body, servable)] if chat else completion_prompts(body, servable)
        events, sequences = queue.Queue(), []
        for prompt in prompts:
            check_length(prompt, options["max_tokens"], servable, "messages" if chat else "prompt")
            for _ in range(n):
                index = len(sequences)
                sequences.append(Sequence(
                    prompt, stop_ids=stop_ids, tokenizer=servable.tokenizer,
                    emit=lambda text, reason, i=index: events.put((i, text, reason)),
                    generator=seeded_generator(seed, index), **options))
        self.app["scheduler"].submit([Job(servable, sequence) for sequence in sequences])
        request_id = new_id("chatcmpl" if chat else "cmpl")
        if stream:
            return self.stream(chat, request_id, body, sequences, events)
        for _ in self.finished(sequences, events):
            pass
        failed = [s.text for s in sequences if s.finish_reason == "error"]
        if failed:
            raise ApiError(500, f"generation failed: {failed[0]}", None, "server_error", "server_error")
        self.send_json(200, answer(chat, request_id, body["model"], sequences))

    @staticmethod
    def finished(sequences, events):
        """The events of the request's sequences until every one has finished."""
        open_sequences = len(sequences)
        while open_sequences:
            index, text, reason = events.get()
            open_sequences -= reason is not None
            yield index, text, reason

    def stream(self, chat, request_id, body, sequences, events):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        started = set()
        try:
            for index, text, reason in self.finished(sequences, events):
                if reason == "error":
                    self.send_event({"error": {"message": f"generation failed: {text}", "type": "server_error"}})
                    continue
                self.send_event(chunk(chat, request_id, body["model"], index, text, reason, first=index not in started))
                started.add(index)
            if (body.get("stream_options") or {}).get("include_usage"):
                self.send_event({**chunk(chat, request_id, body["model"], 0, "", None), "choices": [],
                                 "usage": usage(sequences)})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client left: stop generating for it
            for sequence in sequences:
                sequence.cancelled = True

    def send_event(self, payload):
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    request_queue_size = 256  # connections waiting to be accepted (the default, 5, resets a burst of clients)
    daemon_threads = True


def make_server(servables, host="127.0.0.1", port=8000, api_key=None, max_batch=32, mix=True, max_tokens=512,
                default_max_tokens=128, max_body_bytes=1_000_000, max_n=8):
    """An HTTP server (not yet serving) answering for `servables`; port 0 takes a free port."""
    app = {"servables": servables, "scheduler": Scheduler(max_batch=max_batch, mix=mix), "api_key": api_key,
           "created": int(time.time()),
           "limits": {"max_tokens": max_tokens, "default_max_tokens": min(default_max_tokens, max_tokens),
                      "max_body_bytes": max_body_bytes, "max_n": max_n}}
    server = Server((host, port), type("BoundHandler", (Handler,), {"app": app}))
    server.app = app
    return server


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, required=True, help="results/serve/{base_model}.json")
    parser.add_argument("--runs", nargs="+", help="serve only these runs (default: every run in the manifest)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_VARIABLE),
                        help=f"require this key (default: ${API_KEY_VARIABLE}; none: no key asked)")
    parser.add_argument("--quantization", choices=["none", "4bit"], default="none",
                        help="the shared base in full precision or 4-bit NF4 (bitsandbytes)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                        help="the compute dtype (auto: bf16 on a GPU that has it, else fp32)")
    parser.add_argument("--max-batch", type=int, default=32, help="requests decoded together")
    parser.add_argument("--no-mix", action="store_true",
                        help="one adapter per batch (the baseline: what a server without multi-LoRA batching does)")
    parser.add_argument("--max-tokens", type=int, default=512, help="the most tokens a request may ask for")
    parser.add_argument("--default-max-tokens", type=int, default=128, help="for requests that set no max_tokens")
    parser.add_argument("--max-body-bytes", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[resolve_precision(args.precision, device)]
    manifest = json.loads(args.manifest.read_text())
    missing = [path for path in [manifest["path"], *(run["trained"] for run in manifest["runs"])]
               if not Path(path).exists() and not path.count("/") == 1]  # a Hub id is owner/name
    if missing:
        raise SystemExit(f"{args.manifest}: {', '.join(missing)} not found; run serve.py in the project folder "
                         "(the manifest's paths are relative to it), after the runs have trained")
    servables = load_servables(manifest, args.quantization, dtype, device, args.runs)
    server = make_server(servables, args.host, args.port, args.api_key, args.max_batch, not args.no_mix,
                         args.max_tokens, args.default_max_tokens, args.max_body_bytes)
    host, port = server.server_address[:2]
    kinds = ", ".join(f"{name} ({s.kind})" for name, s in servables.items())
    print(f"serving {kinds} on http://{host}:{port}/v1{' (API key required)' if args.api_key else ''}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
