"""The colour world (``multitap_rl.world.t2i``): the pixel oracle on synthetic images, and the
report that ``examples/alignprop_t2i.py --tiny`` / ``examples/ddpo_t2i.py --tiny`` write (a
two-epoch run each; the measured runs are in the README).

The trainer runs need trl<=0.22.2 (the ``ddpo`` extra, its own virtualenv) and are skipped
elsewhere, as in ``test_ddpo_trainers.py``; ``MULTITAP_REQUIRE_DDPO=1`` turns the skip into a failure.
"""

import json
import os

import pytest
import torch
from _examples import load_example, t2i_world_dir


def test_oracle_counts_the_dominant_pixel_colour():
    from multitap_rl.world import t2i

    images, colors = t2i.solid_images(3, seed=0)
    assert images.shape == (12, 3, 32, 32) and colors == [c for c in t2i.COLORS for _ in range(3)]
    assert t2i.dominant_colors(images) == colors
    res = t2i.oracle(images, colors)
    assert res["accuracy"] == res["strict"] == 1.0 and res["share"] > 0.99
    shifted = [t2i.COLORS[(t2i.COLORS.index(c) + 1) % len(t2i.COLORS)] for c in colors]
    assert res["confusion"] == {c: {d: 3 * (c == d) for d in t2i.COLORS} for c in t2i.COLORS}
    off = t2i.oracle(images, shifted)
    assert off["accuracy"] == 0.0
    assert off["confusion"]["red"] == {"red": 0, "green": 0, "blue": 0, "yellow": 3}  # yellow images named "red"
    # half the image red, a third blue, the rest grey: red dominates; grey images count as grey only when strict
    mixed = torch.full((1, 3, 6, 6), 0.5)
    mixed[0, :, :3] = t2i.PALETTE[0].view(3, 1, 1)
    mixed[0, :, 3:5] = t2i.PALETTE[2].view(3, 1, 1)
    assert t2i.dominant_colors(mixed) == ["red"]
    grey = torch.full((1, 3, 6, 6), 0.5)
    assert t2i.dominant_colors(grey, strict=True) == ["grey"]
    assert t2i.oracle(grey, ["red"])["strict"] == 0.0
    with pytest.raises(ValueError, match="2 colours"):
        t2i.oracle(images[:1], ["red", "blue"])


def test_prompts_name_their_colour_and_held_out_templates_are_unseen():
    from multitap_rl.world import t2i

    assert not set(t2i.TRAIN_TEMPLATES) & set(t2i.HELDOUT_TEMPLATES)
    fn = t2i.prompt_fn(seed=0)
    drawn = [fn() for _ in range(8)]
    assert [t2i.prompt_color(p) for p, _ in drawn] == list(t2i.COLORS) * 2  # colours in turn
    assert all(meta == {} for _, meta in drawn)
    again = t2i.prompt_fn(seed=0)
    assert [p for p, _ in drawn] == [again()[0] for _ in range(8)]  # seeded
    assert all(t2i.prompt_color(p) == c for p, c in t2i.prompts())


def _require_trainers():
    if os.environ.get("MULTITAP_REQUIRE_DDPO") == "1":
        import trl

        assert trl.AlignPropTrainer and trl.DDPOTrainer
        return
    trl = pytest.importorskip("trl")
    pytest.importorskip("diffusers")
    try:
        assert trl.AlignPropTrainer and trl.DDPOTrainer
    except (ImportError, AttributeError):
        pytest.skip("DDPOTrainer/AlignPropTrainer need trl<=0.22.2 (pip install 'multitap-rl[ddpo]' in its own "
                    "virtualenv)")


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    _require_trainers()
    return t2i_world_dir(tmp_path_factory)


@pytest.mark.integration
@pytest.mark.parametrize("name,extra", [("alignprop_t2i", []), ("ddpo_t2i", ["--batches-per-epoch", "1"])])
def test_tiny_run_writes_the_report_and_plots(tmp_path, world_dir, name, extra):
    ex = load_example(name)
    out = tmp_path / "out"
    summary = ex.main(["--tiny", "--epochs", "2", "--batch-size", "2", *extra, "--cache-dir", world_dir,
                       "--output-dir", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert set(report["oracle"]) == {"before", "after"} and set(report["reward"]) == {"first", "last", "window"}
    assert all(isinstance(report["oracle"][k], float) for k in ("before", "after"))
    assert all(0.0 <= v <= 1.0 for v in report["oracle"].values())
    assert all(0.0 < report["reward"][k] < 1.0 for k in ("first", "last"))
    assert report["n_eval"] == 64 and report["reward_calls"] == 2
    for k in ("before", "after"):  # prompt colour -> dominant colour: the diagonal is the oracle
        cm = report["confusion"][k]
        assert sum(n for row in cm.values() for n in row.values()) == 64
        assert sum(cm[c][c] for c in cm) / 64 == report["oracle"][k]
    assert report["reward"]["window"] == 1  # a tenth of 2 calls, at least one
    assert report["reward"]["first"] == summary["reward_means"][0]
    assert summary["oracle"] == report["oracle"]
    assert report["config"]["seed"] == 0 and report["config"]["epochs"] == 2
    assert report["seconds"]["train"] > 0
    for png in ("grid.png", "reward_curve.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the untrained pipeline: fixed seeds, the same oracle every time
    assert report["oracle"]["before"] == 0.25
