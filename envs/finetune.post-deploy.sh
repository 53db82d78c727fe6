#!/usr/bin/env bash
# Run by Snakemake (--sdm conda) once the environment of envs/finetune.yaml is created:
# install the workflow's package (finetune/) into it, editable, from the workflow folder
# (the working directory unless FINETUNE_WORKFLOW_DIR names another).
set -euo pipefail
pip install --no-deps -e "${FINETUNE_WORKFLOW_DIR:-.}"
