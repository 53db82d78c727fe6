# Where a dataset is read from (scripts/sources.py reads it): the files that are
# the validate job's inputs, so that editing one reruns only its dataset.
import os

# A dataset path with this prefix is a Hub dataset (as scripts/sources.py reads it); any other is local.
HUB_DATASET_PREFIX = "hf://datasets/"


def dataset_files(dataset):
    """The files a dataset is read from, as the validate job's inputs: its file; every file of a
    datasets folder (editing any of them reruns it); none for a Hub dataset, whose source_split and
    revision are flags (changing them reruns it by its params). A missing local path stays an input,
    so that Snakemake names it before any job runs."""
    path = config["datasets"][dataset]["path"]
    if path.startswith(HUB_DATASET_PREFIX):
        return []
    if not os.path.isdir(path):
        return [path]
    files = []
    for folder, subfolders, names in os.walk(path):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        files += [os.path.join(folder, name) for name in sorted(names) if not name.startswith(".")]
    return files
