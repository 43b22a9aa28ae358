"""Image and prefix sharing change nothing but speed, for every backbone (Qwen2-VL: placeholder
image tokens; Llama-3.2-Vision: cross-attention states cached with the prefix)."""

import copy

import torch

from multitap_rl import EngineConfig, MultiTapModel

CAPTIONS = ["A red circle.", "Two dogs sitting on the grass near a tree.", "A blue square at the top.",
            "Nothing."]


def _plain(backbone_dirs):
    base, reward = backbone_dirs
    return MultiTapModel.from_pretrained(reward, base_model=base, device="cpu",
                                         engine=EngineConfig(share_images=False, share_prefix=False))


class _Spy:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, images):
        self.calls.append(len(images))
        return self.fn(images)


def test_grpo_batch_encodes_each_image_once_with_identical_scores(backbone_model, backbone_dirs, images):
    g = 4
    # GRPO-shaped: each image G times, as *separate* decoded copies (what a dataloader yields)
    imgs = [copy.deepcopy(images[i // g]) for i in range(2 * g)]
    texts = [CAPTIONS[i % g] for i in range(2 * g)]
    spy = _Spy(backbone_model.backbone.encode_images)
    backbone_model.backbone.encode_images = spy
    try:
        shared = backbone_model.score(imgs, texts).overall
    finally:
        del backbone_model.backbone.encode_images
    assert sum(spy.calls) == 2  # two unique images, each through the vision tower once

    plain_model = _plain(backbone_dirs)
    spy = _Spy(plain_model.backbone.encode_images)
    plain_model.backbone.encode_images = spy
    plain = plain_model.score(imgs, texts).overall
    assert sum(spy.calls) == 2 * g
    assert torch.allclose(shared, plain, atol=1e-6, rtol=0), (shared, plain)


def test_prefix_runs_once_per_group(backbone_model, images):
    calls = []
    original = backbone_model.backbone.forward

    def spy(segment, cache=None, use_cache=False):
        calls.append((segment.start, tuple(segment.ids.shape), cache is not None))
        return original(segment, cache=cache, use_cache=use_cache)

    backbone_model.backbone.forward = spy
    try:
        backbone_model.score([images[0]] * 4 + [images[1]] * 4, CAPTIONS * 2)
    finally:
        del backbone_model.backbone.forward
    prefix = [c for c in calls if c[0] == 0]
    suffix = [c for c in calls if c[0] > 0]
    assert len(prefix) == 1 and prefix[0][1][0] == 2  # one call, one row per image group
    assert sum(c[1][0] for c in suffix) == 8 and all(c[2] for c in suffix)
    # the suffix rows hold only caption tokens, not the prefix (Qwen2-VL: its 400 image tokens)
    assert max(c[1][1] for c in suffix) < 40


def test_sharing_respects_question(backbone_model, backbone_dirs, images):
    """Same image, different questions: different prefixes, still exact."""
    imgs = [images[2]] * 4
    texts = ["Red.", "Blue.", "Red.", "Blue."]
    questions = ["What colour?", "What colour?", "Which shape?", "Which shape?"]
    shared = backbone_model.score(imgs, texts, questions).overall
    plain = _plain(backbone_dirs).score(imgs, texts, questions).overall
    assert torch.allclose(shared, plain, atol=1e-6, rtol=0)
    assert not torch.allclose(shared[0], shared[2])


def test_small_token_budget_gives_same_scores(backbone_dirs, backbone_model, images):
    base, reward = backbone_dirs
    small = MultiTapModel.from_pretrained(reward, base_model=base, device="cpu",
                                          engine=EngineConfig(max_batch_tokens=450, max_batch_patches=1600))
    imgs = [images[i % 3] for i in range(7)]
    texts = [CAPTIONS[i % 4] * (1 + i % 3) for i in range(7)]
    assert torch.allclose(small.score(imgs, texts).overall, backbone_model.score(imgs, texts).overall, atol=1e-6)


def test_cache_views_backbones_get_one_group_per_micro_batch_and_no_copies(backbone_model, backbone_dirs, images):
    """Llama-3.2-Vision's cached image keys/values are large per row: each suffix micro-batch
    stays within one prefix group and its cache rows are broadcast views of that group's row
    (stride 0, same storage), with scores equal to the unshared engine. Other backbones keep
    length-sorted micro-batches across groups."""
    bb = backbone_model.backbone
    original = bb.select_cache
    seen = []

    def spy(cache, rows):
        sub = original(cache, rows)
        seen.append((rows.tolist(), [(src.keys, dst.keys) for src, dst in zip(cache.layers, sub.layers)]))
        return sub

    bb.select_cache = spy
    try:
        imgs = [images[0]] * 4 + [images[1]] * 4
        shared = backbone_model.score(imgs, CAPTIONS * 2).overall
    finally:
        del bb.select_cache
    assert torch.allclose(shared, _plain(backbone_dirs).score(imgs, CAPTIONS * 2).overall, atol=1e-6, rtol=0)
    if not bb.cache_views:
        assert any(len(set(rows)) > 1 for rows, _ in seen)  # one micro-batch spans both groups
        return
    assert sorted(len(rows) for rows, _ in seen) == [4, 4]
    for rows, layers in seen:
        assert len(set(rows)) == 1
        for src, dst in layers:
            assert dst.stride(0) == 0 and dst.data_ptr() == src[rows[0]].data_ptr()
