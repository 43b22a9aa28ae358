"""The served reward on a real Ray Serve, on 127.0.0.1 (slow: Ray starts). Every request loop is
bounded in count and time; the test starts and stops Ray itself."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.slow

TEXTS = ["A red circle.", "Two dogs on the grass.", "A tree near a house.", "Blue.", "A cat.", "Red.", "Sky.", "Dog."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, seconds: float = 120.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:  # noqa: S310 - loopback
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not become healthy in {seconds} s")


@pytest.fixture(scope="module")
def server(tiny_dirs):
    pytest.importorskip("ray.serve")
    from multitap_rl import ModelSpec
    from multitap_rl.serving.app import ServeOptions, build_app, run, shutdown
    from multitap_rl.serving.protocol import ServeLimits

    base, reward = tiny_dirs
    port = _free_port()
    app = build_app(ModelSpec(checkpoint=str(reward), base_model=str(base), device="cpu"),
                    limits=ServeLimits(max_body_bytes=4_000_000, max_samples=64),
                    options=ServeOptions(num_cpus=0.5, max_batch_size=16, batch_wait_timeout_s=0.02))
    try:
        run(app, host="127.0.0.1", port=port)
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url)
        yield url
    finally:
        shutdown()


def _post(url: str, body: bytes) -> int:
    req = urllib.request.Request(url + "/v1/score", data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:  # noqa: S310 - loopback
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_served_on_ray_equals_local_and_concurrent_clients_get_their_own_rows(server, tiny_model, images,
                                                                               monkeypatch):
    from reward_fns import core, multitap_reward

    core.forget_scorers()
    prompts = [[{"role": "user", "content": "Describe this image."}]] * 8
    want = {k: multitap_reward(tiny_model)(prompts, TEXTS[k:] + TEXTS[:k], image=[images[k % 4]] * 8)
            for k in range(8)}
    fn = multitap_reward(server)
    got, problems = {}, []

    def client(k: int) -> None:  # one GRPO group: one image x 8 completions
        try:
            got[k] = fn(prompts, TEXTS[k:] + TEXTS[:k], image=[images[k % 4]] * 8)
        except Exception as exc:  # reported below, never swallowed
            problems.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not problems and sorted(got) == list(range(8))
    for k in range(8):
        assert got[k] == pytest.approx(want[k], abs=1e-6), k


def test_bad_requests_on_ray_are_4xx_and_it_keeps_serving(server, tiny_model, images):
    assert _post(server, b"{nope") == 400
    assert _post(server, json.dumps({"images": ["a"] * 65, "texts": ["a"] * 65}).encode()) == 413
    assert _post(server, b"x" * 4_000_001) == 413
    from reward_fns import MultiTapScorer

    assert MultiTapScorer(server)(images[:1], TEXTS[:1]).shape == (1,)


def test_a_replica_killed_mid_run_is_restarted_and_every_sample_is_scored_once(server, tiny_model, images,
                                                                             monkeypatch):
    import ray

    from reward_fns import MultiTapScorer, core

    monkeypatch.setenv("MULTITAP_REMOTE_RETRIES", "12")
    core.forget_scorers()
    scorer = MultiTapScorer(server)
    want = MultiTapScorer(tiny_model)(images[:2], TEXTS[:2])
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "MultiTapReward" in a["name"] and "REPLICA" in a["name"].upper()]
    assert replicas, ray.util.list_named_actors(all_namespaces=True)
    results, stop = [], time.monotonic() + 240
    killer = threading.Timer(0.5, lambda: ray.kill(ray.get_actor(replicas[0]["name"], replicas[0]["namespace"]),
                                                   no_restart=False))
    killer.start()
    for _ in range(6):  # bounded: six calls, each retried by the client while the replica restarts
        assert time.monotonic() < stop
        results.append(scorer(images[:2], TEXTS[:2]))
    killer.join()
    assert len(results) == 6 and all(r.shape == (2,) for r in results)
    for r in results:
        assert r.tolist() == pytest.approx(want.tolist(), abs=1e-6)


def test_trl_grpo_trains_against_the_served_reward(server, tmp_path):
    """The README's example: TRL GRPO (tiny, offline) with the reward scored by the server."""
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import grpo_captioner

    args = grpo_captioner.parse_args(["--tiny", "--reward-url", server, "--max-steps", "1", "--num-generations", "2",
                                      "--batch-size", "4", "--max-completion-length", "6", "--learning-rate", "1e-2",
                                      "--output-dir", str(tmp_path / "out")])
    torch.manual_seed(0)
    trainer, reward = grpo_captioner.build(args, workdir=str(tmp_path))
    assert reward.spec.is_remote
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    assert any("rewards/multitap/mean" in h for h in trainer.state.log_history)


def test_an_openrlhf_request_on_ray(server, tiny_model, images):
    import base64
    import io

    prompts = ["<|im_start|>user\nDescribe this image.<|im_end|>\n<|im_start|>assistant\n"] * 2
    labels = []
    for im in images[:2]:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        labels.append(json.dumps({"image": base64.b64encode(buf.getvalue()).decode()}))
    body = json.dumps({"query": [p + t for p, t in zip(prompts, TEXTS)], "prompts": prompts, "labels": labels})
    req = urllib.request.Request(server + "/openrlhf", data=body.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:  # noqa: S310 - loopback
        doc = json.loads(r.read())
    want = tiny_model.score(images[:2], TEXTS[:2]).overall.tolist()
    assert doc["rewards"] == pytest.approx(want, abs=1e-6) and set(doc["extra_logs"]) == {"overall", "invalid"}
