"""Data: reading every kind of source, validating records, prompts and templates, the tokenizer, tokenization into Arrow shards, weighted mixing, batches."""
