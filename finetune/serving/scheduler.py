"""The queue between the HTTP threads and the one thread that runs the model. Waiting requests are
taken in batches: the oldest request's batch takes every waiting request it can share a forward
with, up to max_batch. With mixing on, requests for the base and for any plain LoRA adapter of
the shared peft model share a batch (each row its own adapter); a DoRA or AdaLoRA adapter or a
full fine-tune takes a batch of its own. With mixing off (the one-adapter-at-a-time baseline of
bench/serve_bench.py), every batch holds one served model's requests."""
import contextlib
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass

from finetune.serving.decode import decode_batch
from finetune.serving.mixed_lora import mixed_adapters
from finetune.serving.models import BASE


@dataclass
class Job:
    servable: object
    sequence: object


class Scheduler:
    def __init__(self, max_batch=32, mix=True, gather_s=0.01):
        self.max_batch, self.mix, self.gather_s = max_batch, mix, gather_s
        self.waiting = deque()
        self.ready = threading.Condition()
        self.batches = []  # the served names of each recent batch (for the benchmark and the tests)
        threading.Thread(target=self.serve_forever, daemon=True, name="decode").start()

    def submit(self, jobs):
        with self.ready:
            self.waiting.extend(jobs)
            self.ready.notify()

    def batch_key(self, job):
        servable = job.servable
        if self.mix and servable.mixable:
            return ("mixed", id(servable.model))
        return ("alone", servable.name)

    def next_batch(self):
        with self.ready:
            while not self.waiting:
                self.ready.wait()
        self.gather()
        with self.ready:
            key = self.batch_key(self.waiting[0])
            batch = [job for job in self.waiting if self.batch_key(job) == key][:self.max_batch]
            taken = set(map(id, batch))
            self.waiting = deque(job for job in self.waiting if id(job) not in taken)
        return batch

    def gather(self, longest_s=0.25):
        """Wait while requests keep arriving (a burst shares the batch), at most longest_s."""
        start, seen = time.perf_counter(), -1
        while len(self.waiting) != seen and len(self.waiting) < self.max_batch \
                and time.perf_counter() - start < longest_s:
            seen = len(self.waiting)
            time.sleep(self.gather_s)

    def serve_forever(self):
        while True:
            batch = self.next_batch()
            try:
                run_batch(batch, mixed=self.batch_key(batch[0])[0] == "mixed")
                self.batches.append([job.servable.name for job in batch])
                del self.batches[:-1000]  # a long-running server keeps the recent ones only
            except Exception as exc:  # one failed batch must not stop the server: its requests get the error
                traceback.print_exc()
                for job in batch:
                    if not job.sequence.done:
                        job.sequence.emit(f"{type(exc).__name__}: {exc}", "error")


def run_batch(batch, mixed):
    servable = batch[0].servable
    model, sequences = servable.model, [job.sequence for job in batch]
    pad_id = servable.tokenizer.pad_token_id
    stops = set().union(*(s.stop_ids for s in sequences))
    suppress = () if pad_id is None or pad_id in stops else (pad_id,)
    pad_id = pad_id if pad_id is not None else min(stops)
    if mixed and servable.stacks:
        with mixed_adapters(model, servable.stacks, [job.servable.row for job in batch]):
            decode_batch(model, sequences, pad_id, suppress)
        return
    if mixed:  # layers the stacks do not cover: peft's own mixed batches
        decode_batch(model, sequences, pad_id, suppress, adapter_names=[job.servable.adapter for job in batch])
        return
    with adapter_context(servable):
        decode_batch(model, sequences, pad_id, suppress)


def adapter_context(servable):
    """The peft model set to the servable's adapter (or with adapters off for the base); a model of
    its own needs nothing."""
    if servable.adapter is None:
        return contextlib.nullcontext()
    if servable.adapter == BASE:
        return servable.model.disable_adapter()
    servable.model.set_adapter(servable.adapter)
    return contextlib.nullcontext()
