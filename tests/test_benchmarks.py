"""The benchmark scripts still run and print their ratios (slow: they time the reference path)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("script, args, expect", [
    ("score_throughput.py", ["--sizes", "tiny", "--repeats", "1"], "GRPO 4 images x 8"),
    ("grpo_reward_throughput.py", ["--sizes", "tiny", "--repeats", "1", "--groups", "4"], "tiny     4"),
])
def test_benchmark_prints_ratios(script, args, expect):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                         text=True, timeout=900, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                                      "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(line for line in out.stdout.splitlines() if expect in line)
    ratios = [float(r) for r in re.findall(r"(\d+(?:\.\d+)?)x", line)]
    assert len(ratios) == 2 and all(r > 0 for r in ratios), line


@pytest.mark.slow
def test_memory_benchmark_streams_with_the_same_scores():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "score_memory.py"), "--n", "80"],
                         capture_output=True, text=True, timeout=900,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    ratio, diff = re.search(r"ratio ([\d.]+)x; max \|score difference\| (\S+)", out.stdout).groups()
    assert float(ratio) > 1.0 and float(diff) == 0.0, out.stdout
