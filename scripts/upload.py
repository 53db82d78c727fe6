"""Upload an adapter or merged model folder to the Hugging Face Hub and record
where it went (repo URL, revision, commit id) in a JSON file.

The token comes from HF_TOKEN or the standard login cache
(`huggingface-cli login`), never from the command line or the config, and is
never printed or written anywhere. On any failure nothing is recorded.

    python scripts/upload.py --folder results/runs/r8/adapter --settings results/runs/r8/settings/upload.json \
        --output results/runs/r8/upload.json
"""
import argparse
import sys
from pathlib import Path

from finetune.files import write_json
from finetune.settings import read_settings


class UploadError(Exception):
    pass


def hub_token():
    from huggingface_hub import get_token
    return get_token()


def upload(folder, repo_id, private, revision, api=None, commit_message=None):
    """Create the repo if needed and upload the folder; return what to record."""
    if api is None:
        from huggingface_hub import HfApi
        if hub_token() is None:
            raise UploadError("no Hugging Face token: set HF_TOKEN or run `huggingface-cli login`")
        api = HfApi()
    folder = Path(folder)
    try:
        repo = api.create_repo(repo_id=repo_id, private=private, repo_type="model", exist_ok=True)
        if revision != "main":
            api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
                                   commit_message=commit_message or f"Upload {folder.name}")
    except Exception as exc:  # the Hub client raises many kinds; report the kind and message, nothing else
        raise UploadError(f"upload of {folder} to {repo_id} failed: {type(exc).__name__}: {exc}") from None
    return {
        "repo_id": repo_id,
        "url": str(getattr(repo, "url", f"https://huggingface.co/{repo_id}")),
        "revision": revision,
        "commit_id": getattr(commit, "oid", None),
        "commit_url": getattr(commit, "commit_url", None),
        "private": private,
        "files": sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--settings", type=Path, required=True, help="this stage's settings (JSON)")
    parser.add_argument("--output", type=Path, required=True, help="upload.json")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    settings = read_settings(args.settings, "upload")
    try:
        record = upload(args.folder, settings.repo_id, settings.private, settings.revision)
    except UploadError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
    write_json(args.output, record)
    print(f"uploaded {args.folder} to {record['url']} at commit {record['commit_id']}")


if __name__ == "__main__":
    main()
