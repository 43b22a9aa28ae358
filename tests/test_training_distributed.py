"""A 2-process accelerate run on CPU (gloo) through the CLI: it completes, resumes, and equals the
single-process run with the same global batch (gradients are averaged across the processes)."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "stage1" / "tiny_shapes.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, out: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    if cmd[1:3] == ["-m", "multitap_rl.cli"]:
        return json.loads(proc.stdout)  # our stdout holds the result alone (third-party notices go to stderr)
    # under `accelerate launch`, the launcher process itself may print DeepSpeed's accelerator notice first
    return json.loads(proc.stdout[proc.stdout.index("{\n"):])


def _args(base, out, batch):
    return ["train-stage1", str(RECIPE), f"model.base_model={base}", "model.image_size=56", f"train.output_dir={out}",
            "train.max_steps=6", "train.save_every=3", "train.save_total_limit=null", "train.progress=false",
            "train.log_every=1",
            f"train.batch_size={batch}", "data.dataset_kwargs.n_train=32", "data.dataset_kwargs.n_eval=10"]


def _launch(base, out, batch=2):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", str(_free_port()),
           "-m", "multitap_rl.cli", *_args(base, out, batch)]
    return _run(cmd, out)


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def _probe_scores(model_dir: Path) -> torch.Tensor:
    from multitap_rl import MultiTapModel
    from multitap_rl.testing import make_shapes_records

    rows = make_shapes_records(8, seed=123, image_size=56)
    model = MultiTapModel.from_pretrained(model_dir, device="cpu")
    return model.score([r["image"] for r in rows], [r["text"] for r in rows]).overall


def _weights(ckpt: Path):
    from safetensors.torch import load_file

    return load_file(str(ckpt / "trainable.safetensors"))


def test_two_cpu_processes_complete_resume_and_match_one_process(tiny_dirs, tmp_path):
    base, _ = tiny_dirs
    two = tmp_path / "two"
    res = _launch(base, two)
    assert res["global_step"] == 6 and res["metrics"]["n"] == 10  # every eval row once, none twice
    state = json.loads((two / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert all((two / "checkpoint-6" / f"rng-{rank}.safetensors").is_file() for rank in (0, 1))
    assert (two / "model").is_dir() and (two / "model-released").is_dir()

    # 2 processes x batch 2 == 1 process x batch 4: same data, gradients averaged across processes.
    # What users care about is compared: the training losses and the trained model's scores. Not
    # every weight: gloo sums the two halves of each gradient in another order than one process
    # does (relative difference ~1e-7), and Adam divides every gradient by its own running RMS, so
    # a weight whose true gradient is ~0 (k_proj.bias: softmax ignores a shift shared by all keys)
    # takes steps of ~lr in the direction of rounding noise -- up to lr x steps = 6e-3 apart,
    # without changing any score. Weights with a real gradient move by lr x steps x 1e-7 at most.
    one = tmp_path / "one"
    single = _run([sys.executable, "-m", "multitap_rl.cli", *_args(base, one, 4)], one)
    a, b = _weights(two / "checkpoint-6"), _weights(one / "checkpoint-6")
    start = _weights(two / "checkpoint-3")
    assert max((a[k] - start[k]).abs().max() for k in a) > 1e-3  # it trained
    losses = [_losses(d) for d in (two, one)]
    assert len(losses[0]) == 6 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert single["metrics"]["mse"] == pytest.approx(res["metrics"]["mse"], abs=1e-5)
    # scores: float32 forward of the same inputs through weights equal up to the noise above;
    # 1e-5 leaves two orders of magnitude over the measured difference (~1e-7)
    s2, s1 = _probe_scores(two / "model"), _probe_scores(one / "model")
    assert torch.allclose(s2, s1, atol=1e-5, rtol=0), (s2 - s1).abs().max()

    # interrupted after step 3: the 2-process run resumes there and ends where it ended before
    again = tmp_path / "again"
    shutil.copytree(two / "checkpoint-3", again / "checkpoint-3")
    resumed = _launch(base, again)
    assert resumed["resumed_from"] == 3 and resumed["global_step"] == 6
    c = _weights(again / "checkpoint-6")
    for k in a:
        assert torch.allclose(a[k], c[k], atol=1e-6, rtol=0), k


def test_deepspeed_zero3_on_cpu_trains_resumes_and_matches_plain(tiny_dirs, tmp_path):
    """DeepSpeed ZeRO-3 in one CPU process: the same numbers as the plain run, resumable from its own
    checkpoint format. (Two processes: test_deepspeed_zero3_in_two_cpu_processes, slow.)"""
    pytest.importorskip("deepspeed")
    from multitap_rl import MultiTapModel
    from multitap_rl.testing import make_image

    base, _ = tiny_dirs

    def args(out):
        return [*_args(base, out, 2)[:-2], "data.dataset_kwargs.n_train=16", "data.dataset_kwargs.n_eval=4",
                "train.max_steps=4", "train.save_every=2", "train.mixed_precision=no"]

    def ds(out):
        return _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                     str(ROOT / "recipes" / "accelerate" / "zero3.yaml"), "--num_processes", "1",
                     "--main_process_port", str(_free_port()), "--mixed_precision", "no",
                     "-m", "multitap_rl.cli", *args(out)], out)

    zero = ds(tmp_path / "zero3")
    assert (tmp_path / "zero3" / "checkpoint-4" / "pytorch_model").is_dir()  # DeepSpeed's own checkpoint
    again = tmp_path / "again"
    shutil.copytree(tmp_path / "zero3" / "checkpoint-2", again / "checkpoint-2")
    resumed = ds(again)
    assert resumed["resumed_from"] == 2
    plain = _run([sys.executable, "-m", "multitap_rl.cli", *args(tmp_path / "plain")], tmp_path / "plain")
    assert zero["metrics"]["mse"] == pytest.approx(plain["metrics"]["mse"], abs=1e-6)
    imgs, texts = [make_image(i) for i in range(3)], ["a red circle", "a blue square", "a green cross"]
    models = [MultiTapModel.from_pretrained(r["models"]["released"], device="cpu", image_size=56)
              for r in (zero, resumed, plain)]
    scores = [m.score(imgs, texts).overall for m in models]
    assert torch.allclose(scores[0], scores[1], atol=1e-7, rtol=0)
    assert torch.allclose(scores[0], scores[2], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_deepspeed_zero3_in_two_cpu_processes(tiny_dirs, tmp_path):
    """Stage 1 under DeepSpeed ZeRO-3 in 2 CPU processes (gloo): trains, resumes from its own
    checkpoint in 2 processes, and equals one plain process with the same global batch. Tolerances
    as for the gloo DDP run above (gradient sums in another order, Adam's noise on ~zero-gradient
    weights): losses rel 1e-5, eval MSE 1e-5, scores 1e-5."""
    pytest.importorskip("deepspeed")
    base, _ = tiny_dirs

    def args(out, batch):
        return [*_args(base, out, batch)[:-2], "data.dataset_kwargs.n_train=16", "data.dataset_kwargs.n_eval=4",
                "train.max_steps=4", "train.save_every=2", "train.mixed_precision=no"]

    def ds(out):
        return _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                     str(ROOT / "recipes" / "accelerate" / "zero3.yaml"), "--num_processes", "2",
                     "--main_process_port", str(_free_port()), "--mixed_precision", "no",
                     "-m", "multitap_rl.cli", *args(out, 2)], out)

    zero = ds(tmp_path / "zero3")
    state = json.loads((tmp_path / "zero3" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and zero["global_step"] == 4
    again = tmp_path / "again"
    shutil.copytree(tmp_path / "zero3" / "checkpoint-2", again / "checkpoint-2")
    resumed = ds(again)
    assert resumed["resumed_from"] == 2 and resumed["global_step"] == 4
    plain = _run([sys.executable, "-m", "multitap_rl.cli", *args(tmp_path / "plain", 4)], tmp_path / "plain")
    assert _losses(tmp_path / "zero3") == pytest.approx(_losses(tmp_path / "plain"), rel=1e-5)
    assert zero["metrics"]["mse"] == pytest.approx(plain["metrics"]["mse"], abs=1e-5)
    scores = [_probe_scores(Path(r["models"]["multitap"])) for r in (zero, resumed, plain)]
    assert torch.allclose(scores[0], scores[1], atol=1e-5, rtol=0)
    assert torch.allclose(scores[0], scores[2], atol=1e-5, rtol=0)
