"""Serving a whole sweep from one base model behind an OpenAI-style API (scripts/serve.py):
the models and adapters served (models.py), batched decoding across adapters (decode.py),
the queue that forms the batches (scheduler.py) and the API's requests and answers (api.py)."""
