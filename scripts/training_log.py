"""What a training run writes as it goes, on its main process only: a row of
metrics.jsonl per logging step, the answers to the sample prompts in
samples.jsonl, and both as TensorBoard events (scalars and a text table)."""
import json
from pathlib import Path


def markdown_table(rows, keys):
    def cell(text):
        return str(text).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(cell(row[key]) for key in keys) + " |" for row in rows])


class TrainingLog:
    """metrics.jsonl, samples.jsonl and TensorBoard events, written by the main process only."""

    def __init__(self, metrics_path, samples_path, tensorboard_dir, enabled):
        self.file = self.samples = self.board = None
        if not enabled:
            return
        Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
        self.file = open(metrics_path, "w")
        self.samples = open(samples_path, "w", encoding="utf-8") if samples_path else None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.board = SummaryWriter(tensorboard_dir)

    def record(self, row):
        if self.file is None:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.board:
            for key, value in row.items():
                if key != "step":
                    self.board.add_scalar(f"train/{key}" if key != "eval_loss" else "eval/loss", value, row["step"])

    def record_samples(self, rows):
        if self.samples is None or not rows:
            return
        self.samples.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        self.samples.flush()
        if self.board:
            self.board.add_text("samples", markdown_table(rows, ("prompt", "reference", "answer")), rows[0]["step"])

    def close(self):
        for handle in (self.file, self.samples, self.board):
            if handle is not None:
                handle.close()
