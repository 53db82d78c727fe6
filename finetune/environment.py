"""What a job ran on: the versions of the libraries that shape a result, the
device, and the memory it took. Training records them in its summary; the run
manifest (export/manifest.py) carries them on."""
import platform
import resource
from importlib import metadata

LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "tokenizers", "safetensors",
             "pyarrow", "numpy", "snakemake")


def library_versions():
    """{name: version} of python and each library (None when it is not installed)."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_description(device, processes):
    """{type, name, count, processes}: CPU, or the GPU model and how many took part."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return {"type": "cuda", "name": name, "count": processes, "processes": processes,
                "cuda": torch.version.cuda, "capability": ".".join(map(str, torch.cuda.get_device_capability(device)))}
    return {"type": device.type, "name": platform.processor() or platform.machine(), "count": 0,
            "processes": processes}


def peak_memory_mb(device):
    """Peak memory of this process: allocated on the GPU, else resident in RAM."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
