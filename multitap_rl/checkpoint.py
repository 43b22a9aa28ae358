"""Locate and read MULTI-TAP checkpoints and base models; load weights strictly.

A checkpoint is a local directory or a hub id. Layouts read:

* released MULTI-TAP: ``model.safetensors.index.json`` + shards (or one ``model.safetensors``)
  with ``backbone_model.*`` (transformers 4.46 or 5.x key names) and ``reward_head.{weight,bias}``;
* ours (``multitap_config.json`` beside the weights): the same keys, plus metadata naming the
  base model, the backbone family and the position scheme.

Nothing here falls back to random weights: a missing or unexpected key is an error listing them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import CheckpointError

__all__ = [
    "BACKBONE_PREFIX",
    "HEAD_PREFIX",
    "KNOWN_CHECKPOINTS",
    "CheckpointError",
    "check_tensor",
    "hub_offline",
    "checkpoint_fingerprint",
    "folder_above_hint",
    "holds_weights",
    "load_strict",
    "read_multitap_config",
    "read_state_dict",
    "resolve_dir",
    "save_sharded",
    "split_checkpoint",
]

logger = logging.getLogger(__name__)

BACKBONE_PREFIX = "backbone_model."
HEAD_PREFIX = "reward_head."
MULTITAP_CONFIG = "multitap_config.json"

# Released checkpoints (kaist-cvml/MULTI-TAP README) and the base model each was trained from.
KNOWN_CHECKPOINTS = {
    "brl-xfact/Multi-TAP-Qwen2-VL-2B": "Qwen/Qwen2-VL-2B-Instruct",
    "brl-xfact/Multi-TAP-Qwen2-VL-7B": "Qwen/Qwen2-VL-7B-Instruct",
    "brl-xfact/Multi-TAP-Llama3.2-11B-Vision": "meta-llama/Llama-3.2-11B-Vision-Instruct",
    "brl-xfact/Multi-TAP-internlm-xcomposer2d5-7b": "internlm/internlm-xcomposer2d5-7b",
}

# Files a base model contributes: config, tokenizer, processor, chat template. Never its weights.
BASE_MODEL_FILES = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken"]  # *.model: SentencePiece (InternLM2)
CHECKPOINT_FILES = ["*.json", "*.safetensors"]


def hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (``HF_HUB_OFFLINE``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve_dir(name_or_path: str | os.PathLike, *, what: str, allow_patterns: list[str],
                revision: str | None = None) -> Path:
    """A local directory as is; otherwise a hub id fetched with ``huggingface_hub`` (cache-aware;
    with ``HF_HUB_OFFLINE`` only the local cache is read, without network retries). Raises
    ``CheckpointError`` naming ``what`` when neither works."""
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{what} {str(path)!r} is a file; pass its directory")
    name = os.fspath(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"{what} {name!r}: no such directory, and not a hub id of the form 'org/name'")
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=allow_patterns,
                                      local_files_only=offline))
    except Exception as exc:  # network, auth, cache miss: one clear message
        if offline:
            raise CheckpointError(f"{what} {name!r}: not a local directory and not available offline "
                                  "(HF_HUB_OFFLINE is set and it is not in the hub cache): pass a local directory") from None
        raise CheckpointError(
            f"{what} {name!r}: not a local directory and could not be fetched from the hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None


INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _index_shards(index: Path) -> list[str]:
    """The shard file names a safetensors index names (sorted, unique), each checked: the index is
    a JSON object whose ``weight_map`` maps every tensor name to the name of a file directly inside
    the index's folder."""
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{index}: not a safetensors index ({type(exc).__name__}: {exc})") from None
    if not isinstance(doc, dict) or "weight_map" not in doc:
        raise CheckpointError(f"{index}: not a safetensors index (expected a JSON object with a 'weight_map')")
    weight_map = doc["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: 'weight_map' must be a non-empty object mapping tensor names to shard file "
                              f"names, got {_shown(weight_map)}")
    for key, f in weight_map.items():
        if not isinstance(f, str) or not f.strip():
            raise CheckpointError(f"{index}: 'weight_map' entry {key!r} must be a shard file name (a string), "
                                  f"got {_shown(f)}")
    files = sorted(set(weight_map.values()))
    root = index.parent.resolve()
    for f in files:  # a shard must be a file inside the checkpoint folder, never ../elsewhere
        if Path(f).is_absolute() or (index.parent / f).resolve().parent != root:
            raise CheckpointError(f"{index}: shard {f!r} lies outside the checkpoint folder; refusing to read it")
    return files


def _shards(ckpt_dir: Path) -> list[Path]:
    index, single = ckpt_dir / INDEX_FILE, ckpt_dir / SINGLE_FILE
    if index.is_file():
        files = _index_shards(index)
        if single.is_file() and files != [SINGLE_FILE]:
            # transformers reads the single file, we would read the index: two different models.
            raise CheckpointError(
                f"{ckpt_dir}: holds both {INDEX_FILE} (shards {files[:3]}{' ...' if len(files) > 3 else ''}) and "
                f"{SINGLE_FILE}; which one is the model is ambiguous: remove one of them")
        missing = [f for f in files if not (ckpt_dir / f).is_file()]
        if missing:
            raise CheckpointError(f"{ckpt_dir}: shards named in the index are missing: {missing}")
        return [ckpt_dir / f for f in files]
    if single.is_file():
        return [single]
    if any(ckpt_dir.glob("*.bin")) or any(ckpt_dir.glob("*.pt")):
        raise CheckpointError(
            f"{ckpt_dir}: only pickle weights (*.bin/*.pt) found; multitap-rl reads safetensors only "
            "(convert them once in a trusted environment)"
        )
    raise CheckpointError(folder_above_hint(ckpt_dir) or f"{ckpt_dir}: no {SINGLE_FILE} or {INDEX_FILE}")


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean",
               type(None): "null"}


def _shown(value, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, with its JSON type: for error messages."""
    text = repr(value)
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{text} ({_JSON_TYPES.get(type(value), type(value).__name__)})"


def holds_weights(path: Path) -> bool:
    """True if ``path`` is a directory with ``model.safetensors`` or a safetensors index."""
    return (path / INDEX_FILE).is_file() or (path / SINGLE_FILE).is_file()


def folder_above_hint(ckpt_dir: Path, name: str | None = None) -> str | None:
    """For a folder that holds no weights of its own but a checkpoint one level down -- a stage-1
    output folder (``model/``, ``model-released/``, ``checkpoint-<step>/``) -- what to pass
    instead, naming the folder as ``name`` (default: ``ckpt_dir``); None for any other folder."""
    name = os.fspath(ckpt_dir) if name is None else name
    if holds_weights(ckpt_dir):
        return None
    models = [sub for sub in ("model", "model-released") if holds_weights(ckpt_dir / sub)]
    if models:
        alt = f" (or {os.path.join(name, models[1])}, the released layout)" if len(models) > 1 else ""
        return (f"{name!r} is a training output folder, not a checkpoint: pass {os.path.join(name, models[0])}"
                f"{alt}")
    steps = sorted((int(p.name[len("checkpoint-"):]), p.name) for p in ckpt_dir.glob("checkpoint-*")
                   if p.is_dir() and p.name[len("checkpoint-"):].isdigit())
    if steps:
        return (f"{name!r} is a training output folder without a final model yet ({steps[-1][1]} holds "
                "resumable training state, not a checkpoint): let the training finish (or resume it), then pass "
                f"{os.path.join(name, 'model')}")
    return None


def read_state_dict(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, on CPU, checked: every tensor is
    floating point and finite (a NaN, an infinity or an integer weight is a ``CheckpointError``
    naming the tensor, never a silent wrong score)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in _shards(ckpt_dir):
        try:
            part = load_file(str(shard))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{shard}: cannot read safetensors ({exc})") from None
        dup = state.keys() & part.keys()
        if dup:
            raise CheckpointError(f"{shard}: keys repeated across shards: {sorted(dup)[:5]}")
        for key, t in part.items():
            check_tensor(t, f"{shard}: tensor {key!r}")
        state.update(part)
    return state


def check_tensor(t: torch.Tensor, where: str) -> None:
    """A ``CheckpointError`` naming ``where`` if ``t`` is not a finite floating-point tensor."""
    if not t.dtype.is_floating_point:
        raise CheckpointError(f"{where} has dtype {str(t.dtype).replace('torch.', '')}; weights must be floating "
                              "point (a corrupt or foreign file?)")
    finite = torch.isfinite(t.float() if t.element_size() == 1 else t)  # fp8 has no isfinite kernel
    if not bool(finite.all()):
        n = int((~finite).sum())
        raise CheckpointError(f"{where} holds {n} NaN or infinite value(s); refusing to score with it")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _optional(check):
    return lambda v: v is None or check(v)


# Every field of multitap_config.json that the loader reads or save_pretrained writes: what it must
# be, and the check. Other fields (extra_metadata, e.g. a training summary) are kept as they are.
_META_FIELDS = {
    "format": ("'multitap-rl'", lambda v: v == "multitap-rl"),
    "format_version": ("1 (this multitap-rl reads format version 1)", lambda v: _positive_int(v) and v == 1),
    "layout": ("'multitap' or 'released'", lambda v: isinstance(v, str) and v in ("multitap", "released")),
    "family": ("a string (the backbone family)", lambda v: isinstance(v, str)),
    "base_model": ("a non-empty string (a directory or hub id) or null",
                   _optional(lambda v: isinstance(v, str) and bool(v.strip()))),
    "rope": ("a non-empty string or null", _optional(lambda v: isinstance(v, str) and bool(v))),
    "image_size": ("a positive integer or null", _optional(_positive_int)),
    "max_length": ("a positive integer or null", _optional(_positive_int)),
    "hidden_size": ("a positive integer", _positive_int),
    "backbone_options": ("an object of keyword arguments or null", _optional(lambda v: isinstance(v, dict))),
}
_RESERVED_OPTIONS = ("rope", "image_size", "max_length")


def _check_meta(meta: dict, path: Path) -> None:
    """A ``CheckpointError`` naming ``path`` and the field for any field of the wrong type or value."""
    for field, (want, ok) in _META_FIELDS.items():
        if field in meta and not ok(meta[field]):
            raise CheckpointError(f"{path}: field {field!r} must be {want}, got {_shown(meta[field])}; "
                                  "repair or delete the file")
    options = meta.get("backbone_options") or {}
    bad = [k for k in options if not k.isidentifier()]
    if bad:
        raise CheckpointError(f"{path}: field 'backbone_options' has key(s) {bad} that are not keyword argument names")
    reserved = sorted(set(_RESERVED_OPTIONS) & options.keys())
    if reserved:
        raise CheckpointError(f"{path}: field 'backbone_options' must not hold {reserved}: they are fields of "
                              "their own")


def read_multitap_config(ckpt_dir: Path) -> dict:
    """Our ``multitap_config.json`` (``{}`` when absent). A corrupt one, or one with a field of the
    wrong type (``"image_size": "big"``, ``"backbone_options": "x"``), is a ``CheckpointError``
    naming the file and the field: the loader can use every field it returns as it is."""
    path = ckpt_dir / MULTITAP_CONFIG
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); repair or delete it") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    _check_meta(meta, path)
    return meta


def split_checkpoint(state: dict[str, torch.Tensor], where: str) -> tuple[dict, dict]:
    """(backbone keys without prefix, reward head keys without prefix); other keys are an error."""
    backbone, head, other = {}, {}, []
    for key, value in state.items():
        if key.startswith(BACKBONE_PREFIX):
            backbone[key[len(BACKBONE_PREFIX) :]] = value
        elif key.startswith(HEAD_PREFIX):
            head[key[len(HEAD_PREFIX) :]] = value
        else:
            other.append(key)
    if other:
        raise CheckpointError(f"{where}: unexpected keys (not backbone_model.* / reward_head.*): {_short(other)}")
    if not backbone:
        raise CheckpointError(f"{where}: no backbone_model.* weights; is this a MULTI-TAP checkpoint?")
    if set(head) != {"weight", "bias"}:
        raise CheckpointError(f"{where}: reward head must have weight and bias, found {sorted(head)}")
    return backbone, head


def _short(keys: list[str], n: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``state`` into ``module``: every parameter/buffer present, no extra key, same shapes.

    Any difference raises one ``CheckpointError`` listing missing keys, unexpected keys and shape
    mismatches (the last two usually mean the base model is not the one the checkpoint was
    trained from)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    bad = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs base model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
        if bad:
            parts.append(f"shape mismatches ({len(bad)}): " + "; ".join(bad[:6]) + (" ..." if len(bad) > 6 else ""))
        hint = " (wrong base model?)" if bad or (missing and unexpected) or len(missing) > 1 else ""
        raise CheckpointError(f"{where} does not fit the base model{hint}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = str(size).strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * units[unit])
    return int(text)


def save_sharded(state: dict[str, torch.Tensor], out_dir: Path, max_shard_size: int | str = "5GB") -> list[Path]:
    """Write ``state`` as ``model.safetensors``, or as shards plus ``model.safetensors.index.json``
    when it exceeds ``max_shard_size`` (bytes or "500MB"/"5GB"). Weight files already in
    ``out_dir`` are removed first, so a stale index never points at old shards."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("model*.safetensors"), out_dir / INDEX_FILE]:  # neither a stale index nor file
        old.unlink(missing_ok=True)
    limit = max(1, _parse_size(max_shard_size))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    if len(shards) == 1:
        path = out_dir / SINGLE_FILE
        save_file(shards[0], str(path), metadata={"format": "pt"})
        return [path]
    weight_map, paths, total = {}, [], 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        paths.append(out_dir / name)
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return paths


# Bytes hashed per ``update`` call when a tensor must be copied to be read in order (non-contiguous
# or not on the CPU): the fingerprint never holds more than this beyond the tensors themselves.
_HASH_CHUNK_BYTES = 64 * 2**20


def _hash_tensor(h, t: torch.Tensor) -> None:
    """Feed every byte of ``t`` (row-major, its own dtype) into ``h``, in bounded memory.

    A contiguous CPU tensor is hashed in place (no copy); any other tensor is copied slab by slab
    along its first dimension, each slab at most ``_HASH_CHUNK_BYTES`` (or one row, recursively)."""
    t = t.detach()
    if t.dim() == 0:
        t = t.reshape(1)
    if t.device.type == "cpu" and t.is_contiguous():
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        return
    row_bytes = max(1, t[0].numel() * t.element_size()) if len(t) else 1
    if row_bytes > _HASH_CHUNK_BYTES and t.dim() > 1:
        for row in t:
            _hash_tensor(h, row)
        return
    step = max(1, _HASH_CHUNK_BYTES // row_bytes)
    for i in range(0, len(t), step):
        _hash_tensor(h, t[i : i + step].to("cpu").contiguous())


def checkpoint_fingerprint(backbone_state: Mapping[str, torch.Tensor], head_state: Mapping[str, torch.Tensor]) -> str:
    """The identity of a checkpoint's weights: ``"sha256:<32 hex>"``.

    Hashes, in sorted key order, every tensor's name, shape, dtype and *every byte* (backbone
    tensors in the dtype they are stored in, the reward head as float64, which every stored head
    dtype converts to exactly): any change to any weight the model uses changes it. Tensors are
    hashed where they lie (no copy of a contiguous CPU tensor), so memory stays bounded; the cost
    is one SHA-256 pass over the weights, about 0.6 s per GB on one CPU core with SHA extensions,
    less than reading them costs. ``backbone_state`` should use the module's key names (after
    remapping, the unused ``lm_head`` dropped), so the released layout and a re-saved copy of the
    same weights agree; it must hold the weights as stored, not a cast of them (a model loaded in
    bfloat16 from a float32 checkpoint has the checkpoint's fingerprint).
    """
    h = hashlib.sha256(b"multitap-rl checkpoint fingerprint v2\n")
    for prefix, state in (("backbone", backbone_state), ("head", head_state)):
        for key in sorted(state):
            t = state[key] if prefix == "backbone" else state[key].double()
            h.update(f"{prefix}:{json.dumps(key)}|{tuple(t.shape)}|{t.dtype}\n".encode())
            _hash_tensor(h, t)
    return "sha256:" + h.hexdigest()[:32]
