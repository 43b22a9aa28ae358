"""``normalize="running"`` across 2 CPU processes (torch.distributed, gloo): every rank normalises
with the statistics of the whole global batch, so the same sample gets the same reward on both
ranks, equal to one process that sees every rank's samples."""

import json
import os
import socket

import pytest
import torch

WEIGHTS = "overall=1,detail=0.5"
GATES = ["overall<0.2:penalty=1"]
SHARED = {"overall": 0.71, "detail": 2.5}  # the sample both ranks score in steps 2 and 3
EPS32 = 2.0 ** -23

# Per step, per rank: the raw dimension values of that rank's samples (rank 1 has none in step 1).
STEPS = [
    [{"overall": [0.91, 0.62, 0.88, 0.75], "detail": [1.0, 4.0, 2.0, 6.5]},
     {"overall": [0.52, 0.97, 0.81], "detail": [0.5, 3.0, 5.0]}],
    [{"overall": [0.66, 0.93], "detail": [2.0, 7.0]},
     {"overall": [], "detail": []}],
    [{"overall": [SHARED["overall"], 0.95, 0.90], "detail": [SHARED["detail"], 6.0, 5.5]},
     {"overall": [SHARED["overall"], 0.15, 0.40, 0.55], "detail": [SHARED["detail"], 0.2, 1.0, 1.5]}],
    [{"overall": [SHARED["overall"], 0.60], "detail": [SHARED["detail"], 3.5]},
     {"overall": [SHARED["overall"], 0.99, 0.98], "detail": [SHARED["detail"], 7.5, 8.0]}],
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, per_process: bool) -> None:
    import torch.distributed as dist

    from multitap_rl.combiner import RewardCombiner

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        comb = RewardCombiner(WEIGHTS, ["overall", "detail"], normalize="running", momentum=0.9, gates=GATES)
        if per_process:
            comb.running.group = False  # the behaviour the issue measured: statistics per rank
        steps = []
        for batches in STEPS:
            got = comb({k: torch.tensor(v, dtype=torch.float32) for k, v in batches[rank].items()})
            steps.append({"reward": got.reward.tolist(), "mean": dict(comb.running.mean), "var": dict(comb.running.var)})
        with open(os.path.join(out, f"rank-{rank}.json"), "w") as fh:
            json.dump(steps, fh)
    finally:
        dist.destroy_process_group()


def _run(tmp_path, per_process: bool):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), per_process), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_two_ranks_share_running_statistics(tmp_path):
    from multitap_rl.combiner import RewardCombiner

    ranks = _run(tmp_path, per_process=False)
    one = RewardCombiner(WEIGHTS, ["overall", "detail"], normalize="running", momentum=0.9, gates=GATES)
    for k, batches in enumerate(STEPS):
        a, b = ranks[0][k], ranks[1][k]
        # every rank merges the same gathered (n, mean, M2) in rank order: bitwise the same statistics
        assert a["mean"] == b["mean"] and a["var"] == b["var"]
        if k >= 2:  # the same sample, the same step, two ranks: the same reward
            assert abs(a["reward"][0] - b["reward"][0]) <= 1e-6
        # one process that sees the whole global batch (rank 0's samples, then rank 1's)
        glob = one({d: torch.tensor(batches[0][d] + batches[1][d], dtype=torch.float32) for d in ("overall", "detail")})
        for d in ("overall", "detail"):
            # float64 statistics that differ only in summation order (one pass vs Chan's merge of 2)
            assert a["mean"][d] == pytest.approx(one.running.mean[d], rel=1e-12, abs=1e-15)
            assert a["var"][d] == pytest.approx(one.running.var[d], rel=1e-12, abs=1e-15)
        # Rewards: the same float32 inputs, statistics equal to ~1e-15 relative; the float32
        # evaluation of w * (x - m) / s may round m to the neighbouring float32 (eps32 * |m| / s) and
        # rounds each operation once (<= 4 eps32 * |term|), per weighted term; the gate adds an exact 1.
        bound = 0.0
        for d, w in one.weights.items():
            m, s = one.running.mean[d], (one.running.var[d] + one.running.eps) ** 0.5
            term = float(glob.normalized[d].abs().max()) if glob.normalized[d].numel() else 0.0
            bound += abs(w) * (EPS32 * abs(m) / s + 4 * EPS32 * term)
        assert bound < 1e-5
        got = torch.tensor(a["reward"] + b["reward"])
        assert got.shape == glob.reward.shape
        if got.numel():
            assert float((got - glob.reward).abs().max()) <= bound


@pytest.mark.slow
def test_per_process_statistics_disagree(tmp_path):
    """The failure the shared statistics fix: with statistics per rank (``group=False``), the same
    sample in the same step gets rewards far apart on the two ranks."""
    ranks = _run(tmp_path, per_process=True)
    assert ranks[0][2]["mean"] != ranks[1][2]["mean"]
    gap = max(abs(ranks[0][k]["reward"][0] - ranks[1][k]["reward"][0]) for k in (2, 3))
    assert gap > 0.1
