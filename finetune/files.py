"""Reading and writing the workflow's files. Outputs appear whole or not at all:
everything is written to a sibling '.partial' path first and moved into place
only when complete, so a crash or a kill never leaves a half-written file or
folder behind."""
import contextlib
import json
import os
import shutil
from pathlib import Path

LINKED_BYTES = 1 << 20  # files at least this large are hard-linked by copy_folder


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path):
    """Yield the '.partial' sibling of `path` (a file or a folder) to write to; on
    success it replaces `path`, on any failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    _remove(partial)
    try:
        yield partial
    except BaseException:
        _remove(partial)
        raise
    if path.is_dir():
        shutil.rmtree(path)
    os.replace(partial, path)


def write_json(path, value):
    with atomic_path(path) as partial:
        partial.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_jsonl(path, rows):
    with atomic_path(path) as partial:
        partial.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def read_json(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path):
    """The rows of a JSONL file (blank lines skipped), read as they are consumed."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def copy_folder(source, destination):
    """A copy of a folder whose large files (the weights) are hard-linked where the file system allows,
    so that they are not on disk twice. Later writes to either never change the other: every stage
    replaces files, it never edits them in place. Snakemake's own marker is left out (it touches the
    marker of each folder it makes: a shared one would make the source look newer)."""
    def link_or_copy(source_file, destination_file):
        if os.path.getsize(source_file) >= LINKED_BYTES:
            try:
                return os.link(source_file, destination_file)
            except OSError:
                pass
        return shutil.copy2(source_file, destination_file)
    shutil.copytree(source, destination, copy_function=link_or_copy,
                    ignore=shutil.ignore_patterns(".snakemake_timestamp"))


def save_pretrained_atomically(output_dir, model, tokenizer, **model_options):
    """save_pretrained a model (or adapter) and its tokenizer into one folder, atomically."""
    with atomic_path(output_dir) as partial:
        model.save_pretrained(partial, **model_options)
        tokenizer.save_pretrained(partial)
    return Path(output_dir)
