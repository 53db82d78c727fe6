"""The shared code of the workflow's stages (the stage scripts are in scripts/, the rules in
rules/): data (sources, validation, prompts, tokenization, shards, mixing, batches), training
(setup, state, adapters, checkpoints, FSDP, logging, selection), evaluation (generation,
metrics, held-out loss), export (manifest, model cards), reports (HTML), and the settings
declared in schemas/config.schema.yaml. docs/development.md has the map."""
