"""Answers to the eval prompts during training (sample_every): the prompts encoded
once with the run's template, then the model's greedy answers at a step, as rows
of samples.jsonl."""
from finetune.evaluation.generation import encode_prompt, generate, prompt_records, reference_answer
from finetune.data.prompts import resolve_template, stop_token_ids


def prepare_samples(prompts, template, tokenizer):
    """([(record, prompt ids)], stop token ids) of the prompts to answer; ([], []) when there are none."""
    if not prompts:
        return [], []
    template = resolve_template(tokenizer, template)
    encoded = [(record, encode_prompt(record, tokenizer, template)[0]) for record in prompt_records(prompts)]
    return encoded, stop_token_ids(tokenizer, template)


def answers_at(model, tokenizer, samples, stop_ids, step, max_new_tokens, seed, synced_processes=False):
    """The model's greedy answers to the prepared prompts, as samples.jsonl rows of this step.
    synced_processes: every process of a sharded model generates together."""
    answers = generate(model, tokenizer, [ids for _, ids in samples], max_new_tokens=max_new_tokens,
                       batch_size=len(samples), temperature=0.0, top_p=1.0, seed=seed, stop_ids=stop_ids,
                       synced_processes=synced_processes)
    return [{"step": step, "prompt": tokenizer.decode(ids), "reference": reference_answer(record), "answer": answer}
            for (record, ids), answer in zip(samples, answers)]
