"""Checkpoint helpers shared by the backbone tests: load a tiny model, read and rewrite its weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from multitap_rl import MultiTapModel


def load(dirs, **kwargs) -> MultiTapModel:
    """The tiny model of ``dirs`` = (base, reward) on CPU."""
    base, reward = dirs
    return MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", **kwargs)


def read_state(reward: Path) -> dict:
    """Every tensor of a sharded released-layout checkpoint."""
    index = json.loads((reward / "model.safetensors.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(reward / shard)))
    return state


def write_checkpoint(state: dict, out: Path, like: Path) -> Path:
    """``state`` as a single-file checkpoint at ``out`` with ``like``'s config.json."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(like / "config.json", out / "config.json")
    return out
