"""The served reward without Ray: the protocol, one replica's request handling, and the remote client
through every adapter (the client's HTTP call answered by the replica's handler in this process)."""

import asyncio
import base64
import io
import json

import numpy as np
import pytest
import torch

from multitap_rl import ModelSpec
from multitap_rl.errors import CheckpointError, ConfigError
from multitap_rl.serving.protocol import ServeLimits, encode_image
from multitap_rl.serving.service import RewardSettings, ScoringService
from reward_fns import core

URL = "http://127.0.0.1:8000"
TEXTS = ["A red circle.", "Two dogs on the grass.", "A tree.", "Blue."]


@pytest.fixture()
def service(tiny_dirs, tiny_model, tmp_path):
    base, reward = tiny_dirs
    spec = ModelSpec(checkpoint=str(reward), base_model=str(base), device="cpu")
    return ScoringService(spec, ServeLimits(max_body_bytes=2_000_000, max_samples=8, allowed_root=str(tmp_path)),
                          token="s3cret", reward=RewardSettings(weights="overall=2", on_invalid=-1.0), model=tiny_model)


def _direct(service):
    async def score(item):
        return service.score_many([item])[0]
    return score


def _ask(service, method, path, body=None, token="s3cret"):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    status, doc = asyncio.run(service.handle(method, path, headers, raw, _direct(service)))
    return status, json.loads(json.dumps(doc))  # what goes over the wire


@pytest.fixture()
def served(service, monkeypatch):
    """The client's HTTP call answered by ``service`` (the body JSON-encoded both ways)."""
    import reward_fns.remote as remote

    calls = []

    def request_json(url, path, body=None, *, timeout=30.0, token=None):
        calls.append((url, path))
        return _ask(service, "GET" if body is None else "POST", path, body, token)

    monkeypatch.setattr(remote, "request_json", request_json)
    monkeypatch.setenv("MULTITAP_SERVE_TOKEN", "s3cret")
    core.forget_scorers()
    yield calls
    core.forget_scorers()


def _b64(image) -> str:
    return encode_image(image)


def test_served_scores_equal_local_scores_through_every_adapter(served, tiny_model, images):
    from reward_fns import MultiTapScorer, ddpo_reward, multitap_objective_rewards, multitap_reward, rerank
    from reward_fns.flow_grpo import multitap_score
    from reward_fns.verl import compute_score

    prompts = [[{"role": "user", "content": "Describe this image."}]] * 4
    local = multitap_reward(tiny_model, weights="overall=3")(prompts, TEXTS, image=images)
    remote = multitap_reward(URL, weights="overall=3")(prompts, TEXTS, image=images)
    assert remote == pytest.approx(local, abs=1e-6)
    objective = multitap_objective_rewards(URL)[0](prompts, TEXTS, image=images)
    assert objective == pytest.approx(tiny_model.score(images, TEXTS).overall.tolist(), abs=1e-6)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    want, _ = ddpo_reward(tiny_model)(pixels, ("a", "b"), None)
    got, info = ddpo_reward(URL)(pixels, ("a", "b"), None)
    assert torch.allclose(got, want, atol=1e-6) and set(info) == {"overall"}
    assert torch.allclose(MultiTapScorer(URL)(images[:2], TEXTS[:2]), MultiTapScorer(tiny_model)(images[:2], TEXTS[:2]),
                          atol=1e-6)
    ranked = rerank(URL, images[:1], [TEXTS])[0]
    assert [c.index for c in ranked] == [c.index for c in rerank(tiny_model, images[:1], [TEXTS])[0]]
    scores, _ = multitap_score(None, model_or_path=URL)(pixels, ["a", "b"], [{}, {}])
    np.testing.assert_allclose(scores, want.numpy(), atol=1e-6, rtol=0)
    out = compute_score("d", TEXTS[0], "", {"image": images[0]}, model_or_path=URL)
    assert out["score"] == pytest.approx(float(tiny_model.score(images[:1], TEXTS[:1]).overall[0]), abs=1e-6)
    assert all(path in ("/info", "/v1/score") for _, path in served)


def test_client_side_on_invalid_and_running_normalisation(served, tiny_model, images):
    from reward_fns import multitap_reward

    prompts = [[{"role": "user", "content": "Describe this image."}]] * 3
    fn = multitap_reward(URL, on_invalid=-7.0, normalize="running")
    out = fn(prompts, TEXTS[:3], image=[images[0], b"not an image", images[2]])
    assert out[1] == -7.0 and fn.core.invalid_total == 1
    valid = tiny_model.score([images[0], images[2]], [TEXTS[0], TEXTS[2]]).overall  # statistics kept here
    assert fn.combiner.running.mean["overall"] == pytest.approx(float(valid.double().mean()), abs=1e-6)


def test_a_bad_sample_is_that_samples_error_and_the_request_still_answers(service, images, tmp_path):
    big = io.BytesIO()
    from PIL import Image

    Image.new("L", (12000, 12000)).save(big, format="PNG")  # 144 M pixels: above the bomb limit
    (tmp_path / "ok.png").write_bytes(base64.b64decode(_b64(images[1])))
    body = {"images": [_b64(images[0]), "%%%", base64.b64encode(big.getvalue()).decode(), {"path": "ok.png"},
                       {"path": "../outside.png"}],
            "texts": TEXTS + ["x"]}
    status, doc = _ask(service, "POST", "/v1/score", body)
    assert status == 200 and len(doc["results"]) == 5
    r = doc["results"]
    assert set(r[0]) == {"overall"} and set(r[3]) == {"overall"}
    assert r[1]["error"]["field"] == "image" and "base64" in r[1]["error"]["message"]
    assert r[2]["error"]["field"] == "image" and "decompression bomb" in r[2]["error"]["message"]
    assert r[4]["error"]["index"] == 4 and "outside the server's allowed root" in r[4]["error"]["message"]


@pytest.mark.parametrize("body, token, status, reason", [
    (b"{not json", "s3cret", 400, "not JSON"),
    ({"images": [], "texts": "abc"}, "s3cret", 400, "'texts' must be a list"),
    ({"images": ["a"], "texts": ["a", "b"]}, "s3cret", 400, "'images' holds 1 entries for 2 samples"),
    ({"images": ["a"] * 9, "texts": ["a"] * 9}, "s3cret", 413, "limit is 8 per request"),
    (b"x" * 2_000_001, "s3cret", 413, "exceeds the limit"),
    ({"images": [], "texts": [], "extra": 1}, "s3cret", 400, "unknown field"),
    ({"images": [], "texts": []}, None, 401, "bearer token"),
    ({"images": [], "texts": []}, "wrong", 401, "bearer token"),
])
def test_bad_requests_are_4xx_with_a_reason(service, body, token, status, reason):
    got, doc = _ask(service, "POST", "/v1/score", body, token)
    assert got == status and reason in doc["error"]
    assert _ask(service, "GET", "/health", token=None)[0] == 200  # and the server keeps serving
    assert _ask(service, "GET", "/nowhere")[0] == 404 and _ask(service, "GET", "/v1/score")[0] == 405


def test_info_names_the_model(service, tiny_model):
    status, info = _ask(service, "GET", "/info")
    assert status == 200 and info["dimensions"] == ["overall"] and info["family"] == "qwen2_vl"
    assert info["fingerprint"] == tiny_model.info["fingerprint"] and info["dtype"] == "float32"


def test_openrlhf_endpoint(service, tiny_model, images):
    """OpenRLHF's remote reward: the image in the label column (base64 or a path under the root)."""
    prompts = ["<|im_start|>user\nDescribe this image.<|im_end|>\n<|im_start|>assistant\n"] * 3
    queries = [p + t for p, t in zip(prompts, TEXTS)]
    labels = [json.dumps({"image": _b64(images[0])}), {"image": _b64(images[1])}, "not json"]
    status, doc = _ask(service, "POST", "/openrlhf", {"query": queries, "prompts": prompts, "labels": labels})
    want = (2 * tiny_model.score(images[:2], TEXTS[:2]).overall).tolist()
    assert status == 200 and doc["rewards"][:2] == pytest.approx(want, abs=1e-6) and doc["rewards"][2] == -1.0
    assert doc["scores"] == doc["rewards"] and doc["extra_logs"]["invalid"] == 1.0
    assert doc["extra_logs"]["overall"] == pytest.approx(sum(want) / 4, abs=1e-6)


def test_client_checks_the_fingerprint_and_names_the_url_when_none_answers(served, monkeypatch, tiny_model):
    from reward_fns import multitap_reward
    from reward_fns.remote import ServerError

    with pytest.raises(CheckpointError, match="not the sha256:0000"):
        multitap_reward(ModelSpec(checkpoint=URL, fingerprint="sha256:0000"))
    multitap_reward(ModelSpec(checkpoint=URL, fingerprint=tiny_model.info["fingerprint"]))  # the right one
    import reward_fns.remote as remote

    def refused(url, path, body=None, *, timeout=30.0, token=None):
        raise ConnectionRefusedError("connection refused")

    monkeypatch.setattr(remote, "request_json", refused)
    monkeypatch.setattr(remote.time, "sleep", lambda s: None)
    core.forget_scorers()
    with pytest.raises(ServerError, match=r"no MULTI-TAP server answered /info after 6 tries over "
                                          r"\['http://a:1', 'http://b:2'\]"):
        multitap_reward("http://a:1,http://b:2")
    with pytest.raises(ConfigError, match="load a model here"):
        ModelSpec(checkpoint=URL, heads="h")


def test_several_urls_share_the_requests_and_a_dead_one_is_skipped(served, monkeypatch, images):
    import reward_fns.remote as remote
    from reward_fns import MultiTapScorer

    answered = remote.request_json
    seen = []

    def flaky(url, path, body=None, *, timeout=30.0, token=None):
        seen.append(url)
        if url == "http://dead:1":
            raise ConnectionRefusedError("refused")
        return answered(url, path, body, timeout=timeout, token=token)

    monkeypatch.setattr(remote, "request_json", flaky)
    monkeypatch.setattr(remote.time, "sleep", lambda s: None)
    scorer = MultiTapScorer("http://dead:1,http://live:2")
    for _ in range(3):
        assert scorer(images[:2], TEXTS[:2]).shape == (2,)
    assert "http://dead:1" in seen and seen.count("http://live:2") >= 4
