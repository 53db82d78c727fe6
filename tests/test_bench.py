"""The GPU benchmark mode runs end to end at a tiny size on CPU (so it is ready when a GPU is
lent), and its report counts MFU as 6 * parameters * tokens/s over the GPU's bf16 peak; the GRPO
benchmark's smoke test times both sides and reports their ratio."""
import importlib.util
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO


def bench_module(name):
    """A benchmark script of bench/ as a module, loaded from its file."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_bench = bench_module("train_bench")

pytestmark = pytest.mark.slow


def test_gpu_mode_runs_every_side_at_a_tiny_size_on_cpu(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "bench" / "train_bench.py"), "--gpu", "--device", "cpu",
                             "--size", "tiny", "--records", "16", "--steps", "1", "--threads", "1",
                             "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LoRA r=16 all-linear, bf16" in result.stdout
    for side in ("this workflow", "(a) seed: Trainer, padding=max_length", "(b) Trainer, dynamic padding"):
        assert f"| {side}" in result.stdout
    assert "this workflow / best baseline:" in result.stdout


def test_mfu_is_six_n_tokens_over_the_bf16_peak(capsys):
    args = SimpleNamespace(gpu=True, device="cuda", records=10, steps=5, size="1b", threads=1, peak_tflops=1000.0)
    row = {"peak_memory_mb": 1000, "losses": [2.0, 1.0]}
    results = {"this workflow": {**row, "tokens_per_s": 50_000}, train_bench.METHODS[1]: {**row, "tokens_per_s": 25_000},
               train_bench.METHODS[2]: {**row, "tokens_per_s": 40_000}}
    train_bench.report(args, results, parameters=1_000_000_000)
    printed = capsys.readouterr().out
    assert "| this workflow | 50,000 | 2.00x | 30.0% |" in printed  # 6 * 1e9 * 5e4 / 1e15
    assert "this workflow / best baseline: 1.25x" in printed


def test_grpo_bench_quick_times_ours_and_trls_step_and_their_ratio(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "bench" / "grpo_bench.py"), "--quick", "--workdir",
                             str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| GRPO step (median) | this workflow | TRL GRPOTrainer | TRL / ours |" in result.stdout
    for part in ("generation: sampling and scoring", "optimization: forward, backward, optimizer step", "step"):
        assert re.search(rf"\| {part} \| [0-9.]+ s \| [0-9.]+ s \| [0-9.]+x \| [0-9.]+ s \|", result.stdout), part
    assert re.search(r"TRL's prompt tokens are ours for (\d+)/\1 prompts", result.stdout), "TRL tokenizes as we do"
