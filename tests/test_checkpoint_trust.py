"""Checkpoints that would give silent wrong results or raw errors: a fingerprint blind to weight
changes, a folder holding two different models, and wrongly typed metadata or shard-index fields."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from multitap_rl import MultiTapModel
from multitap_rl.checkpoint import _hash_tensor, checkpoint_fingerprint, read_state_dict, save_sharded
from multitap_rl.cli import main
from multitap_rl.errors import CheckpointError, HeadsError
from multitap_rl.heads import RidgeHeads

EMBED = "backbone_model.model.embed_tokens.weight"  # the tiny model's largest tensor (released layout)


def _copy(reward, dst, change=None):
    """A copy of the checkpoint folder ``reward`` at ``dst``, each tensor passed through ``change(key, t)``."""
    dst.mkdir()
    for f in reward.iterdir():
        if f.suffix == ".safetensors" and change is not None:
            state = load_file(str(f))
            save_file({k: change(k, v) for k, v in state.items()}, str(dst / f.name), metadata={"format": "pt"})
        else:
            shutil.copy(f, dst / f.name)
    return dst


def _load(reward, base, **kwargs):
    return MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", image_size=112, **kwargs)


def _split(state):
    backbone = {k[len("backbone_model."):]: v for k, v in state.items() if k.startswith("backbone_model.")}
    head = {k[len("reward_head."):]: v for k, v in state.items() if k.startswith("reward_head.")}
    return backbone, head


# -- 1. the fingerprint sees every weight -----------------------------------------------------------------
def test_a_rescaled_embedding_changes_the_fingerprint_and_old_heads_are_refused(tiny_dirs, tmp_path, images):
    base, reward = tiny_dirs
    largest = max(read_state_dict(reward).items(), key=lambda kv: kv[1].numel())[0]
    assert largest == EMBED
    changed = _copy(reward, tmp_path / "rescaled", lambda k, v: v * 3.0 if k == EMBED else v)
    original, other = _load(reward, base), _load(changed, base)
    texts = ["A red circle.", "Two dogs."]
    assert not torch.equal(original.score(images[:2], texts).overall, other.score(images[:2], texts).overall)
    assert other.info["fingerprint"] != original.info["fingerprint"]
    heads = RidgeHeads(["a"], torch.zeros(original.hidden_size, 1), torch.zeros(1),
                       fingerprint={"hidden_size": original.hidden_size, "checkpoint": original.info["fingerprint"]})
    original.load_heads(heads)  # the checkpoint they were fit on takes them
    with pytest.raises(HeadsError, match="fit on features of checkpoint"):
        other.load_heads(heads)


def test_a_one_bit_change_in_any_tensor_changes_the_fingerprint(tiny_dirs):
    _, reward = tiny_dirs
    backbone, head = _split(read_state_dict(reward))
    fp = checkpoint_fingerprint(backbone, head)
    for part, state in (("backbone", backbone), ("head", head)):
        for key, t in state.items():
            flipped = t.clone()
            bits = flipped.view(-1).view(torch.int32)  # float32 weights: flip the lowest mantissa bit
            bits[bits.numel() // 2] ^= 1
            changed = {**state, key: flipped}
            if part == "backbone":
                got = checkpoint_fingerprint(changed, head)
            else:
                got = checkpoint_fingerprint(backbone, changed)
            assert got != fp, f"{part} tensor {key} changed by one bit, fingerprint did not"


def test_the_fingerprint_is_the_stored_weights_in_any_layout(tiny_dirs, tmp_path):
    """Released and re-saved (either layout, sharded or not) copies of the same stored weights agree."""
    base, reward = tiny_dirs
    model = _load(reward, base)
    fps = {model.info["fingerprint"]}
    for layout, shard in (("multitap", "5GB"), ("released", 20_000)):
        out = model.save_pretrained(tmp_path / layout, layout, max_shard_size=shard)
        fps.add(_load(out, base).info["fingerprint"])
    assert len(fps) == 1


def test_tensors_hash_as_their_bytes_in_order_however_they_lie(monkeypatch):
    import hashlib

    def digest(t):
        h = hashlib.sha256()
        _hash_tensor(h, t)
        return h.hexdigest()

    g = torch.Generator().manual_seed(0)
    for t in (torch.randn(7, 5, 3, generator=g), torch.randn(6, 4, generator=g).bfloat16(), torch.tensor(2.5),
              torch.zeros(0, 3)):
        want = hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        assert digest(t) == want
        if t.numel() and t.dim() >= 2:
            strided = t.transpose(0, 1).contiguous().transpose(0, 1)  # same values, column-major storage
            assert not strided.is_contiguous() and digest(strided) == want
            monkeypatch.setattr("multitap_rl.checkpoint._HASH_CHUNK_BYTES", 8)  # slab by slab, row by row
            assert digest(strided) == want
            monkeypatch.undo()


# -- 2. one folder, one model -------------------------------------------------------------------------------
def test_a_folder_with_an_index_and_a_single_file_is_refused(tiny_dirs, tmp_path):
    base, reward = tiny_dirs
    both = _copy(reward, tmp_path / "both")
    save_file(read_state_dict(reward), str(both / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"both model\.safetensors\.index\.json .* and model\.safetensors.*"
                                              r"remove one of them"):
        _load(both, base)
    (both / "model.safetensors").unlink()
    assert _load(both, base).info["fingerprint"] == _load(reward, base).info["fingerprint"]


def test_an_index_naming_only_the_single_file_is_one_model(tiny_dirs, tmp_path):
    _, reward = tiny_dirs
    state = read_state_dict(reward)
    d = tmp_path / "one"
    d.mkdir()
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    index = {"weight_map": dict.fromkeys(state, "model.safetensors")}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    assert read_state_dict(d).keys() == state.keys()


def test_save_sharded_never_leaves_an_index_and_a_single_file(tmp_path):
    state = {f"backbone_model.w{i}": torch.full((100,), float(i)) for i in range(4)}
    out = tmp_path / "ckpt"
    save_sharded(state, out)  # single file
    save_sharded(state, out, max_shard_size=500)  # then sharded over it
    assert not (out / "model.safetensors").exists() and (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("model-*.safetensors"))) == 4
    assert all(torch.equal(read_state_dict(out)[k], v) for k, v in state.items())
    save_sharded(state, out)  # then a single file over the shards
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert all(torch.equal(read_state_dict(out)[k], v) for k, v in state.items())


# -- 3. every metadata field is checked for type ------------------------------------------------------------
BAD_FIELDS = [
    ("backbone_options", "x"), ("backbone_options", [1]), ("backbone_options", {"rope": "mrope"}),
    ("backbone_options", {"not a name": 1}),
    ("image_size", "big"), ("image_size", 0), ("image_size", 11.5), ("image_size", True),
    ("max_length", 1.5), ("max_length", "1024"), ("max_length", -3),
    ("rope", 3), ("rope", ""), ("rope", ["mrope"]),
    ("base_model", 7), ("base_model", ""), ("base_model", {"path": "x"}),
    ("layout", []), ("layout", "sideways"),
    ("family", 2), ("hidden_size", "64"), ("hidden_size", 0),
    ("format", "other-tool"), ("format_version", "1"), ("format_version", 2),
]


@pytest.fixture(scope="module")
def saved(tiny_dirs, tmp_path_factory):
    """Our format: the tiny model re-saved with its multitap_config.json."""
    base, reward = tiny_dirs
    return _load(reward, base).save_pretrained(tmp_path_factory.mktemp("saved") / "m")


def _with_meta(saved, dst, **fields):
    d = _copy(saved, dst)
    meta = json.loads((d / "multitap_config.json").read_text())
    (d / "multitap_config.json").write_text(json.dumps({**meta, **fields}))
    return d


@pytest.mark.parametrize("field, value", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v in BAD_FIELDS])
def test_a_wrongly_typed_metadata_field_names_the_file_and_the_field(saved, tiny_dirs, tmp_path, field, value):
    base, _ = tiny_dirs
    d = _with_meta(saved, tmp_path / "bad", **{field: value})
    with pytest.raises(CheckpointError, match=rf"multitap_config\.json: field '{field}'"):
        MultiTapModel.from_pretrained(d, base_model=base, device="cpu")


def test_null_metadata_fields_mean_not_recorded_or_none(saved, tiny_dirs, tmp_path):
    base, _ = tiny_dirs
    d = _with_meta(saved, tmp_path / "nulls", rope=None, backbone_options=None, image_size=None, max_length=None,
                   base_model=None)
    model = MultiTapModel.from_pretrained(d, base_model=base, device="cpu")
    s = model.backbone.settings
    assert (s.rope, s.image_size, s.max_length, s.options) == ("reference", None, None, ())


def test_the_cli_reports_a_bad_metadata_field_in_one_line(saved, tiny_dirs, tmp_path, images, capsys):
    base, _ = tiny_dirs
    d = _with_meta(saved, tmp_path / "bad", image_size="big")
    images[0].save(tmp_path / "a.png")
    code = main(["score", "--checkpoint", str(d), "--base-model", str(base), "--device", "cpu",
                 "--image", str(tmp_path / "a.png"), "--text", "x"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "multitap_config.json: field 'image_size' must be a positive integer or null, got 'big'" in err


# -- 3b. the shard index's fields -----------------------------------------------------------------------------
BAD_INDEXES = [
    ([1, 2], "not a safetensors index"),
    ({"metadata": {}}, "not a safetensors index"),
    ({"weight_map": ["model-00001-of-00002.safetensors"]}, "'weight_map' must be a non-empty object"),
    ({"weight_map": {}}, "'weight_map' must be a non-empty object"),
    ({"weight_map": {EMBED: 3}}, f"'weight_map' entry '{EMBED}' must be a shard file name"),
    ({"weight_map": {EMBED: None}}, "'weight_map' entry .* must be a shard file name"),
    ({"weight_map": {EMBED: ""}}, "'weight_map' entry .* must be a shard file name"),
    ({"weight_map": {EMBED: "sub/model.safetensors"}}, "lies outside the checkpoint folder"),
    ({"weight_map": {EMBED: "/tmp/model.safetensors"}}, "lies outside the checkpoint folder"),
]


@pytest.mark.parametrize("doc, match", BAD_INDEXES, ids=[str(i) for i in range(len(BAD_INDEXES))])
def test_a_bad_shard_index_names_the_file_and_the_problem(tiny_dirs, tmp_path, doc, match):
    base, reward = tiny_dirs
    d = _copy(reward, tmp_path / "idx")
    if isinstance(doc, dict) and isinstance(doc.get("weight_map"), dict) and doc["weight_map"]:
        good = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        doc = {"weight_map": {**good, **doc["weight_map"]}}  # one bad entry among good ones
    (d / "model.safetensors.index.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json: .*{match}"):
        MultiTapModel.from_pretrained(d, base_model=base, device="cpu")


def test_an_option_the_backbone_does_not_take_is_a_config_error(tiny_dirs):
    base, reward = tiny_dirs
    from multitap_rl.errors import ConfigError

    with pytest.raises(ConfigError, match=r"backbone_options \{'foo': 1\} do not fit the qwen2_vl backbone"):
        MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", backbone_options={"foo": 1})
