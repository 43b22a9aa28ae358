"""Stage-2 ridge heads: LOO alpha, planted signal, save/load, fingerprints, legacy pickles."""

import json
import logging

import numpy as np
import pytest
import torch

from multitap_rl import MultiTapModel
from multitap_rl.checkpoint import checkpoint_fingerprint
from multitap_rl.heads import HeadsError, RidgeHeads, convert_legacy_heads
from multitap_rl.training.ridge import fit_ridge_heads, fit_ridge_loo
from multitap_rl.testing import make_image

WORDS = ("a the red green blue yellow circle square triangle cross left right top bottom small large dog cat "
         "tree house sky water on in with next to shows picture bright dark").split()
REFERENCE_ALPHAS = [0.001, 0.01, 0.1, 1, 10, 100]  # multi_objective_train.py's grid


@pytest.fixture(scope="module")
def small_model(tiny_dirs):
    base, reward = tiny_dirs
    return MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", image_size=112)


@pytest.fixture(scope="module")
def feats(small_model):
    """(360, 64) float64 last-position features of the tiny model on varied images and captions."""
    rng = np.random.default_rng(0)
    images = [make_image(i, size=(56 + 4 * (i % 5), 48 + 2 * (i % 3))) for i in range(36)]
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(3, 11))) for _ in range(360)]
    return small_model.features([images[i % 36] for i in range(360)], texts).double().numpy()


def _planted(X, n_dims=3, noise=0.1, seed=1):
    """Targets = X w + b + noise (noise as a fraction of each target's signal std)."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(X.shape[1], n_dims))
    signal = X @ W + rng.normal(size=n_dims) * 3
    return signal + noise * signal.std(0) * rng.normal(size=signal.shape)


# -- the solver ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, p", [(80, 30), (30, 80)])
def test_loo_ridge_matches_sklearn_ridgecv(n, p):
    from sklearn.linear_model import RidgeCV

    rng = np.random.default_rng(n)
    X = rng.normal(size=(n, p)) * rng.uniform(0.1, 3, size=p) + rng.normal(size=p)
    Y = X @ rng.normal(size=(p, 3)) + rng.normal(size=(n, 3)) * [0.1, 1.0, 5.0] + [1.0, 2.0, 3.0]
    alphas = np.logspace(-3, 3, 13)
    ours = fit_ridge_loo(X, Y, alphas)
    sk = RidgeCV(alphas=alphas, alpha_per_target=True, store_cv_results=True).fit(X, Y)
    np.testing.assert_allclose(ours.alpha, sk.alpha_)
    np.testing.assert_allclose(ours.coef.T, sk.coef_, atol=1e-9)
    np.testing.assert_allclose(ours.intercept, sk.intercept_, atol=1e-9)
    np.testing.assert_allclose(ours.loo_mse, sk.cv_results_.mean(0).T, rtol=1e-8)
    assert len(set(ours.alpha.tolist())) > 1  # noise levels differ: one alpha per dimension


# -- planted signal -------------------------------------------------------------------------------------
def test_planted_signal_is_recovered_on_held_out_rows(feats):
    Y = _planted(feats, noise=0.1)
    heads = fit_ridge_heads(torch.from_numpy(feats[:240]), Y[:240], names=["a", "b", "c"])
    pred = heads.predict_array(torch.from_numpy(feats[240:]).float())
    for d in range(3):
        y = Y[240:, d]
        r2 = 1 - ((pred[:, d] - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()
        assert r2 > 0.95, (d, r2)


def test_alpha_by_loo_is_no_worse_than_the_reference_choice(feats):
    """The reference picks alpha by training MSE over its grid (always the smallest) on raw features."""
    from sklearn.linear_model import Ridge

    Y = _planted(feats, noise=0.6, seed=2)
    train, test = slice(0, 90), slice(90, 360)  # few rows per feature: the regime where alpha matters
    train_mse = {a: ((Ridge(alpha=a).fit(feats[train], Y[train]).predict(feats[train]) - Y[train]) ** 2).mean()
                 for a in REFERENCE_ALPHAS}
    ref_alpha = min(train_mse, key=train_mse.get)
    assert ref_alpha == min(REFERENCE_ALPHAS)
    ref_pred = Ridge(alpha=ref_alpha).fit(feats[train], Y[train]).predict(feats[test])
    ours = fit_ridge_heads(feats[train], Y[train], names=["a", "b", "c"]).predict_array(feats[test])
    for d in range(3):
        ours_mse = ((ours[:, d] - Y[test, d]) ** 2).mean()
        ref_mse = ((ref_pred[:, d] - Y[test, d]) ** 2).mean()
        assert ours_mse <= ref_mse, (d, ours_mse, ref_mse)


def test_standardisation_is_folded_into_the_saved_coefficients(feats):
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    Y = _planted(feats, n_dims=2, noise=0.3)
    heads = fit_ridge_heads(feats[:200], Y[:200], names=["a", "b"], standardize=True)
    for d, name in enumerate(heads.names):
        pipe = make_pipeline(StandardScaler(), Ridge(alpha=heads.meta["alphas"][name])).fit(feats[:200], Y[:200, d])
        np.testing.assert_allclose(heads.predict_array(feats[200:])[:, d], pipe.predict(feats[200:]), atol=1e-8)
    raw = fit_ridge_heads(feats[:200], Y[:200], names=["a", "b"], standardize=False)
    assert raw.meta["standardize"] is False and heads.meta["standardize"] is True


# -- persistence ------------------------------------------------------------------------------------------
def test_save_load_gives_identical_predictions_and_metadata(feats, tmp_path):
    Y = _planted(feats, noise=0.2)
    heads = fit_ridge_heads(feats[:200], {"safety": Y[:200, 0], "clarity": Y[:200, 1]},
                           fingerprint={"hidden_size": 64, "checkpoint": "sha256:abc"},
                           target_ranges={"safety": (-100, 100)}, overall=np.linspace(0, 1, 200))
    out = heads.save(tmp_path / "heads")
    assert sorted(p.name for p in out.iterdir()) == ["heads.json", "heads.safetensors"]
    loaded = RidgeHeads.load(out)
    h = torch.from_numpy(feats[200:]).float()
    a, b = heads.predict(h), loaded.predict(h)
    assert list(b) == ["safety", "clarity"] and loaded.names == heads.names
    for k in a:
        assert a[k].dtype == torch.float32 and a[k].shape == (160,)
        assert torch.equal(a[k], b[k])
    cfg = json.loads((out / "heads.json").read_text())
    assert cfg["fingerprint"] == {"hidden_size": 64, "checkpoint": "sha256:abc"}
    assert set(cfg["alphas"]) == {"safety", "clarity"}
    assert cfg["target_ranges"]["safety"] == [-100, 100]
    assert cfg["target_ranges"]["clarity"] == [pytest.approx(Y[:200, 1].min()), pytest.approx(Y[:200, 1].max())]
    assert loaded.stats == heads.stats and set(loaded.stats) == {"safety", "clarity", "overall"}
    assert RidgeHeads.load(out / "heads.json").names == heads.names  # a file inside the directory works too
    state = heads.to_bytes()  # the in-memory form (what a pickled reward carries)
    again = RidgeHeads.from_bytes(state)
    assert hash(state) and again.names == heads.names and again.stats == heads.stats
    assert again.fingerprint == heads.fingerprint and again.meta["alphas"] == heads.meta["alphas"]
    assert all(torch.equal(again.predict(h)[k], a[k]) for k in a)
    with pytest.raises(HeadsError, match="in-memory heads: cannot read safetensors"):
        RidgeHeads.from_bytes((state[0], b"not safetensors"))


def test_stats_are_the_training_prediction_moments_and_feed_fixed_normalisation(feats):
    from multitap_rl.combiner import RewardCombiner

    Y = _planted(feats, n_dims=2, noise=0.2)
    overall = np.random.default_rng(0).uniform(size=200)
    heads = fit_ridge_heads(feats[:200], Y[:200], names=["a", "b"], overall=overall)
    pred = heads.predict_array(feats[:200])
    assert heads.stats["a"] == pytest.approx((pred[:, 0].mean(), pred[:, 0].std()), rel=1e-6)
    assert heads.stats["overall"] == pytest.approx((overall.mean(), overall.std()))
    comb = RewardCombiner({"overall": 1, "a": 2}, ("overall", *heads.names), normalize="fixed", stats=heads.stats)
    dims = {"overall": torch.tensor(overall[:5]).float(), **heads.predict(torch.from_numpy(feats[:5]))}
    out = comb(dims)
    (mo, so), (ma, sa) = heads.stats["overall"], heads.stats["a"]
    expect = (dims["overall"] - mo) / so + 2 * (dims["a"] - ma) / sa
    torch.testing.assert_close(out.reward, expect.float(), atol=1e-5, rtol=1e-5)


# -- bad input --------------------------------------------------------------------------------------------
def test_nan_targets_error_by_default_and_drop_per_dimension(feats):
    Y = _planted(feats[:120], n_dims=2, noise=0.2)
    Y[[3, 7], 1] = np.nan
    with pytest.raises(HeadsError, match=r"target 'b' is NaN at row\(s\) \[3, 7\].*nan_policy='drop'"):
        fit_ridge_heads(feats[:120], Y, names=["a", "b"])
    heads = fit_ridge_heads(feats[:120], Y, names=["a", "b"], nan_policy="drop")
    keep = np.ones(120, bool)
    keep[[3, 7]] = False
    only_b = fit_ridge_heads(feats[:120][keep], Y[keep, 1], names=["b"])
    only_a = fit_ridge_heads(feats[:120], Y[:, 0], names=["a"])
    torch.testing.assert_close(heads.coef[:, 1], only_b.coef[:, 0])  # b: rows 3 and 7 left out
    torch.testing.assert_close(heads.coef[:, 0], only_a.coef[:, 0])  # a: every row
    assert heads.meta["n_train"] == {"a": 120, "b": 118}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(targets=np.zeros((99, 1)), names=["a"]), "99 target rows but 100 feature rows"),
        (dict(targets={"a": np.zeros(100), "b": np.zeros(98)}), "target 'b' has 98 rows"),
        (dict(targets=np.zeros((100, 2)), names=["a"]), r"targets must be \(N, 1\)"),
        (dict(targets=np.zeros((100, 1)), names=["overall"]), "reserved for the stage-1 head"),
        (dict(targets=np.zeros((100, 2)), names=["a", "a"]), "repeat"),
        (dict(targets=np.full((100, 1), np.inf), names=["a"]), "target 'a' is infinite at row 0"),
        (dict(targets=np.zeros((100, 1)), names=["a"], nan_policy="zero"), "nan_policy"),
        (dict(targets=np.zeros((100, 1)), names=["a"], alphas=[0.0, 1.0]), "alphas must be finite and > 0"),
    ],
)
def test_fit_bad_input_is_a_clear_error(feats, kwargs, match):
    with pytest.raises(HeadsError, match=match):
        fit_ridge_heads(feats[:100], **kwargs)


def test_non_finite_features_and_wrong_width_are_errors(feats):
    X = feats[:50].copy()
    X[17, 3] = np.nan
    with pytest.raises(HeadsError, match="features of row 17 are not finite"):
        fit_ridge_heads(X, np.zeros(50), names=["a"])
    heads = fit_ridge_heads(feats[:50], _planted(feats[:50], 1), names=["a"])
    with pytest.raises(HeadsError, match=r"features must be \(N, 64\), got \(4, 32\)"):
        heads.predict(torch.zeros(4, 32))
    bad = torch.zeros(3, 64)
    bad[2, 0] = float("inf")
    with pytest.raises(HeadsError, match="sample 2"):
        heads.predict(bad)


def test_corrupt_or_foreign_heads_directory(tmp_path, feats):
    heads = fit_ridge_heads(feats[:50], _planted(feats[:50], 2), names=["a", "b"])
    out = heads.save(tmp_path / "h")
    cfg = json.loads((out / "heads.json").read_text())
    cfg["names"] = ["a"]
    (out / "heads.json").write_text(json.dumps(cfg))
    with pytest.raises(HeadsError, match="does not match 1 names"):
        RidgeHeads.load(out)
    (out / "heads.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(HeadsError, match="not a multitap-rl heads file"):
        RidgeHeads.load(out)
    with pytest.raises(HeadsError, match="no such directory"):
        RidgeHeads.load(tmp_path / "missing")


# -- with the model -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted_dir(small_model, feats, tmp_path_factory):
    Y = _planted(feats, n_dims=2, noise=0.1)
    fp = {"hidden_size": small_model.hidden_size, "checkpoint": small_model.info["fingerprint"]}
    heads = fit_ridge_heads(feats, {"safety": Y[:, 0], "clarity": Y[:, 1]}, fingerprint=fp)
    return heads.save(tmp_path_factory.mktemp("heads") / "h")


def test_model_with_heads_fills_dims(tiny_dirs, fitted_dir, images):
    base, reward = tiny_dirs
    model = MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", image_size=112, heads=fitted_dir)
    assert model.dimension_names == ("overall", "safety", "clarity")
    assert model.spec.heads == str(fitted_dir)
    texts = ["A red circle.", "Two dogs.", "A tree.", "Sky."]
    out = model.score(images, texts)
    h = model.features(images, texts)
    expect = RidgeHeads.load(fitted_dir).predict(h)
    assert list(out.dims) == ["safety", "clarity"]
    for k in expect:
        torch.testing.assert_close(out.dims[k], expect[k])
    assert set(out.rows()[0]) == {"overall", "safety", "clarity"}


def test_heads_of_another_checkpoint_or_width_are_refused(tmp_path, fitted_dir, small_model, caplog):
    from multitap_rl.testing import build_tiny_multitap

    base, reward = build_tiny_multitap(tmp_path / "other", seed=1)
    other = MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", image_size=112)
    assert other.info["fingerprint"] != small_model.info["fingerprint"]
    with pytest.raises(HeadsError, match="fit on features of checkpoint .* refit them with `multitap-rl fit-heads`"):
        other.load_heads(fitted_dir)
    assert other.heads is None and other.dimension_names == ("overall",)
    with caplog.at_level(logging.WARNING, logger="multitap_rl.heads"):
        other.load_heads(fitted_dir, strict=False)
    assert other.heads is not None and "refit" in caplog.text
    narrow = RidgeHeads(["a"], torch.zeros(32, 1), torch.zeros(1))
    with pytest.raises(HeadsError, match="hidden size 32, but the loaded backbone has hidden size 64"):
        small_model.load_heads(narrow)


def test_checkpoint_fingerprint_is_cheap_and_identifies_weights(tiny_dirs, small_model):
    base, reward = tiny_dirs
    bf16 = MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", dtype="bf16")
    assert bf16.info["fingerprint"] == small_model.info["fingerprint"]  # hash of the stored weights, not the cast
    state = {"model.norm.weight": torch.ones(4), "model.layers.0.w": torch.zeros(4, 4)}
    head = {"weight": torch.ones(1, 4), "bias": torch.zeros(1)}
    fp = checkpoint_fingerprint(state, head)
    assert fp.startswith("sha256:") and fp == checkpoint_fingerprint(dict(reversed(state.items())), head)
    assert fp != checkpoint_fingerprint(state, {"weight": torch.ones(1, 4), "bias": torch.ones(1)})
    assert fp != checkpoint_fingerprint({**state, "model.norm.weight": torch.full((4,), 2.0)}, head)


# -- legacy pickles ---------------------------------------------------------------------------------------------
def test_legacy_pickle_needs_opt_in_and_converts_to_the_safe_format(tmp_path, feats, tiny_dirs):
    import joblib
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    Y = _planted(feats[:150], n_dims=2, noise=0.2)
    plain = Ridge(alpha=1.0).fit(feats[:150], Y)
    piped = make_pipeline(StandardScaler(), Ridge(alpha=3.0)).fit(feats[:150], Y)
    for name, est in (("plain", plain), ("piped", piped)):
        path = tmp_path / f"{name}.joblib"
        joblib.dump(est, path)
        with pytest.raises(HeadsError, match="pickle.*runs arbitrary code.*trust_legacy=True"):
            RidgeHeads.load(path)
        heads = RidgeHeads.load(path, trust_legacy=True, legacy_names=["a", "b"])
        np.testing.assert_allclose(heads.predict_array(feats[150:]), est.predict(feats[150:]), atol=1e-4)
        safe = convert_legacy_heads(path, tmp_path / f"{name}_safe", names=["a", "b"], trust_legacy=True,
                                    fingerprint={"checkpoint": "sha256:x"})
        again = RidgeHeads.load(tmp_path / f"{name}_safe")  # no opt-in needed any more
        assert again.fingerprint["checkpoint"] == "sha256:x"
        for k, v in safe.predict(torch.from_numpy(feats[150:])).items():
            assert torch.equal(v, again.predict(torch.from_numpy(feats[150:]))[k])
    with pytest.raises(HeadsError, match="predicts 2 dimensions but 3 names"):
        RidgeHeads.load(tmp_path / "plain.joblib", trust_legacy=True, legacy_names=["a", "b", "c"])
    pickles = tmp_path / "only_pickle"
    pickles.mkdir()
    joblib.dump(plain, pickles / "heads.pkl")
    with pytest.raises(HeadsError, match="found pickle file"):
        RidgeHeads.load(pickles)
    base, reward = tiny_dirs
    with pytest.raises(HeadsError, match="arbitrary code"):
        MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", heads=tmp_path / "plain.joblib")


def test_heads_fit_with_other_extraction_settings_warn(tiny_model, small_model, feats, caplog):
    fp = {"hidden_size": 64, "checkpoint": small_model.info["fingerprint"], "image_size": 112, "rope": "reference"}
    heads = fit_ridge_heads(feats[:100], _planted(feats[:100], 1), names=["a"], fingerprint=fp)
    try:
        with caplog.at_level(logging.WARNING, logger="multitap_rl.heads"):
            small_model.load_heads(heads)  # same settings: quiet
            assert "image_size" not in caplog.text
            tiny_model.load_heads(heads)  # scores at 560 px
        assert "extracted with image_size=112 but the model scores with image_size=560" in caplog.text
    finally:  # shared fixtures: leave them without heads
        small_model.heads = tiny_model.heads = None
