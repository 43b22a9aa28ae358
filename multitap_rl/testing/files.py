"""File helpers shared by the tiny-model builders."""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["save_sharded_fixed", "write_json", "write_tiny_reward_checkpoint"]


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_sharded_fixed(state: dict[str, torch.Tensor], out_dir: Path, n_shards: int) -> None:
    from safetensors.torch import save_file

    keys = sorted(state)
    per = -(-len(keys) // n_shards)
    weight_map = {}
    total = 0
    for i in range(n_shards):
        chunk = keys[i * per : (i + 1) * per]
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: state[k] for k in chunk}, str(out_dir / name), metadata={"format": "pt"})
        for k in chunk:
            weight_map[k] = name
            total += state[k].numel() * state[k].element_size()
    write_json(out_dir / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_tiny_reward_checkpoint(base: Path, reward: Path, seed: int, hidden: int, *,
                                 name_base_model: bool = False) -> Path:
    """A released-layout MULTI-TAP checkpoint at ``reward`` from the base model at ``base``: every
    base weight perturbed by seeded noise under ``backbone_model.*`` (a fine-tuned model differs
    from its base, so a loader that silently kept base weights fails the fidelity tests), a
    seeded ``reward_head``, two shards with an index, and the ``VLMRewardModel`` config.

    ``name_base_model``: also write ``multitap_config.json`` naming ``base`` (resolved absolute),
    so the checkpoint loads without ``base_model=`` / ``--base-model`` (it names nothing else: the
    settings stay the released checkpoints' defaults, the scores are the same). Off, the folder
    holds exactly the released layout's files (the stored reference scores fingerprint them)."""
    from safetensors.torch import load_file

    reward.mkdir(parents=True, exist_ok=True)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(base / shard)))
    gen = torch.Generator().manual_seed(seed + 1)
    ckpt = {}
    for key in sorted(state):
        value = state[key]
        noise = torch.randn(value.shape, generator=gen, dtype=torch.float32) * 0.01
        ckpt[f"backbone_model.{key}"] = (value.float() + noise).to(value.dtype).contiguous()
    ckpt["reward_head.weight"] = torch.randn(1, hidden, generator=gen) / (hidden + 1) ** 0.5 * 4.0
    ckpt["reward_head.bias"] = torch.zeros(1)
    save_sharded_fixed(ckpt, reward, n_shards=2)
    write_json(reward / "config.json", {"architectures": ["VLMRewardModel"], "torch_dtype": "float32",
                                         "transformers_version": "4.46.1"})
    if name_base_model:
        from ..checkpoint import MULTITAP_CONFIG

        write_json(reward / MULTITAP_CONFIG, {"format": "multitap-rl", "format_version": 1, "layout": "released",
                                              "base_model": str(Path(base).resolve()), "hidden_size": hidden})
    return reward
