"""``shard="zero3"``: the reward model partitioned over the ranks with DeepSpeed ZeRO-3 and gathered
per call scores exactly as the unsharded model (the gather restores the loaded tensors bit for bit,
and the call then runs the same float32 operations on them)."""

import json
import socket
import sys
from pathlib import Path

import pytest

from multitap_rl import ModelSpec
from multitap_rl.errors import ConfigError
from reward_fns import core, multitap_objective_rewards, multitap_reward

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed" / "shard_scores.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_shard_settings_are_clear_errors(tiny_dirs, tiny_model, images):
    base, reward = tiny_dirs
    with pytest.raises(ConfigError, match=r"shard must be one of \[None, 'zero3'\], got 'zero2'"):
        multitap_reward(ModelSpec(checkpoint=reward, base_model=base, shard="zero2"))
    with pytest.raises(ConfigError, match="shard='zero3' and offload=True"):
        ModelSpec(checkpoint=reward, base_model=base, shard="zero3", offload=True)
    with pytest.raises(TypeError):  # a loaded model is never sharded in place: the spec has that field
        multitap_objective_rewards(tiny_model, shard="zero3")


def test_shard_outside_a_distributed_run_is_a_clear_error(tiny_dirs, images):
    pytest.importorskip("deepspeed")
    base, reward = tiny_dirs
    core.forget_scorers()
    fn = multitap_reward(ModelSpec(checkpoint=reward, base_model=base, shard="zero3", device="cpu"))
    with pytest.raises(ConfigError, match="torch.distributed is not initialised"):
        fn(["Describe this image."], ["A red circle."], image=[images[0]])
    core.forget_scorers()


def _models_arg(request) -> str:
    rows = []
    for family in ("qwen2_vl", "mllama", "internlm_xc2"):
        from conftest import BACKBONE_FIXTURES

        base, reward = request.getfixturevalue(BACKBONE_FIXTURES[family][0])
        rows.append([family, str(base), str(reward)])
    return json.dumps(rows)


def _check(reports, world):
    for r, rep in enumerate(reports):
        assert rep["rank"] == r and rep["world"] == world
        for family, m in rep["models"].items():
            assert m["max_diff"] == 0.0 and m["lengths_match"], family  # the same weights, the same computation
            assert m["data_numel_between_calls"] == 0, family  # nothing whole between calls
            # this rank's slice: ceil(numel / world) per tensor (DeepSpeed pads slices to equal size)
            assert m["numel_full"] / world <= m["numel_here"] <= m["numel_full"] / world + m["tensors"], family


def test_one_rank_sharded_scores_equal_unsharded(request, tmp_path, monkeypatch):
    """In this process, a 1-rank gloo group: the partition/gather machinery runs (parameters are
    emptied between calls), for every backbone."""
    pytest.importorskip("deepspeed")
    import torch.distributed as dist

    sys.path.insert(0, str(SCRIPT.parent))
    import shard_scores

    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    try:
        shard_scores.main(["--models", _models_arg(request), "--out", str(tmp_path)])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        core.forget_scorers()
    _check([json.loads((tmp_path / "rank-0.json").read_text())], world=1)


@pytest.mark.slow
def test_two_ranks_sharded_scores_equal_unsharded(request, tmp_path):
    pytest.importorskip("deepspeed")
    import _launch as launcher

    models = _models_arg(request)
    proc = launcher.run(lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                      "--master_port", str(port), str(SCRIPT), "--models", models,
                                      "--out", str(tmp_path)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    reports = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    _check(reports, world=2)
    assert reports[1]["empty_rank_rewards"] == [None, None]  # and it took part in rank 0's gather
