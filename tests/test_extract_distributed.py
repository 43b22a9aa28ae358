"""Stage-2 extraction split over ranks: rank r of W writes chunks k with k % W == r into one store,
which equals the 1-process store (ids, order, features, targets) and resumes per rank.

Features are compared with ``torch.equal``: each chunk is computed from the same rows, in the same
batches, by the same float32 CPU operations with one thread, whichever process runs it."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _spies import Counting

from multitap_rl import MultiTapModel
from multitap_rl.errors import DataError
from multitap_rl.testing import make_image
from multitap_rl.training.features import extract_features, load_features

ROOT = Path(__file__).resolve().parents[1]
DIMS = ("prompt_following", "objective_rules", "clarity", "information_richness", "safety")


@pytest.fixture(scope="module")
def small_model(tiny_dirs):
    base, reward = tiny_dirs
    return MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", image_size=112)


@pytest.fixture()
def data(tmp_path):
    """11 align-anything-style rows (2 samples each) with ids, and a schema that stores the ids."""
    rng = np.random.default_rng(1)
    words = "a the red green blue circle square left right top small dog cat tree sky on".split()
    text = lambda: " ".join(rng.choice(words, size=rng.integers(3, 9)))  # noqa: E731
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(11):
        make_image(i % 5, size=(56, 48)).save(tmp_path / "img" / f"{i % 5}.png")
        row = {"id": f"q{i}", "image": f"img/{i % 5}.png", "question": text() + "?", "response_1": text(),
               "response_2": text()}
        for d in DIMS:
            row[f"{d}_rate_1"], row[f"{d}_rate_2"] = int(rng.integers(0, 4)), int(rng.integers(0, 4))
        rows.append(row)
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from multitap_rl.schemas import load_schema

    schema = load_schema("align-anything-ti2t").to_dict()
    schema["id_column"] = "id"
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(schema))
    return path, tmp_path / "schema.yaml"


def _same_store(a, b):
    assert a.ids == b.ids and a.ids is not None
    assert a.rows.tolist() == b.rows.tolist() and a.samples.tolist() == b.samples.tolist()
    assert torch.equal(a.features, b.features) and torch.equal(a.overall, b.overall)
    assert np.array_equal(a.targets, b.targets, equal_nan=True)


def test_ranks_write_their_chunks_and_the_store_equals_one_process(small_model, data, tmp_path):
    path, schema = data
    kw = dict(schema=str(schema), chunk_size=2, batch_size=3, progress=False)  # 6 chunks: 2+2+2+2+2+1 rows
    one = load_features(extract_features(small_model, path, tmp_path / "one", **kw))
    ranks = [Counting(small_model) for _ in range(3)]
    for r in (0, 2, 1):  # no process talks to another; rank 0 creates the store first
        extract_features(ranks[r], path, tmp_path / "split", rank=r, world_size=3, **kw)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r, counted in enumerate(ranks):  # rank r computed exactly the rows of chunks r and r + 3
        mine = [i for k in (r, r + 3) for i in range(2 * k, min(2 * k + 2, 11))]
        assert counted.texts == [rows[i][f"response_{j}"] for i in mine for j in (1, 2)]
    _same_store(load_features(tmp_path / "split"), one)
    assert json.loads((tmp_path / "split" / "manifest.json").read_text()) == \
        json.loads((tmp_path / "one" / "manifest.json").read_text())


def test_bad_rank_settings(small_model, data, tmp_path):
    path, schema = data
    with pytest.raises(DataError, match="need 0 <= rank < world_size"):
        extract_features(small_model, path, tmp_path / "s", schema=str(schema), rank=2, world_size=2, progress=False)
    with pytest.raises(DataError, match="missing on this rank after rank 0 wrote it"):
        extract_features(small_model, path, tmp_path / "s", schema=str(schema), rank=1, world_size=2, progress=False)


def _cli(args, launch: bool):
    import _launch as launcher

    def cmd(port):
        prefix = [sys.executable, "-m", "multitap_rl.cli"]
        if launch:
            prefix = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                      str(ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", str(port),
                      "-m", "multitap_rl.cli"]
        return [*prefix, "extract", *args]

    proc = launcher.run(cmd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc.stdout


@pytest.mark.slow
def test_accelerate_launch_two_processes_equals_one_and_resumes_per_rank(tiny_dirs, data, tmp_path):
    pytest.importorskip("accelerate")
    base, reward = tiny_dirs
    path, schema = data

    def args(out):
        return ["--checkpoint", str(reward), "--base-model", str(base), "--image-size", "112", "--data", str(path),
                "--schema", str(schema), "--out", str(out), "--chunk-size", "2", "--batch-size", "3", "--no-progress"]

    _cli(args(tmp_path / "one"), launch=False)
    stdout = _cli(args(tmp_path / "two"), launch=True)
    assert stdout.count("samples from") == 1 and "2 processes" in stdout  # one summary line, from rank 0
    one, two = load_features(tmp_path / "one"), load_features(tmp_path / "two")
    _same_store(two, one)

    # interrupted: chunk 1 (rank 1's) and chunk 4 (rank 0's) lost; the others must not be recomputed
    chunks = tmp_path / "two" / "chunks"
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in chunks.iterdir()}
    for k in (1, 4):
        (chunks / f"chunk-{k:06d}.safetensors").unlink()
    _cli(args(tmp_path / "two"), launch=True)
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in chunks.iterdir()}
    assert sorted(after) == sorted(before)
    redone = {n for n in after if after[n] != before[n]}
    assert redone == {"chunk-000001.safetensors", "chunk-000004.safetensors"}
    _same_store(load_features(tmp_path / "two"), one)
