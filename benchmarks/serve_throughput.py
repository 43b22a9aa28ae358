"""Served reward throughput on Ray Serve (127.0.0.1, started and stopped here), in one run:

* dynamic batching: 8 concurrent clients, each one GRPO group (one image x 8 completions), served
  with ``@serve.batch`` (up to 16 requests per engine call) vs one request at a time;
* served vs in-process: seconds per sample of the same groups scored by the model in this process;
* 1 vs 2 replicas under the same load (on 2 CPU cores expect little: both compete for them).

    OMP_NUM_THREADS=1 python benchmarks/serve_throughput.py [--clients 8] [--g 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import threading
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from multitap_rl import ModelSpec, MultiTapModel  # noqa: E402
from multitap_rl.serving.app import ServeOptions, build_app, run, shutdown  # noqa: E402
from multitap_rl.testing import build_tiny_multitap, make_image  # noqa: E402

WORDS = "a red blue small large circle square tree dog near the left top of picture with grass house".split()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _groups(clients: int, g: int):
    import random

    rng = random.Random(0)
    return [([make_image(k, (640, 480))] * g,
             [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + "." for _ in range(g)])
            for k in range(clients)]


def _served_seconds(url: str, groups, rounds: int) -> float:
    """Wall seconds for ``rounds`` rounds of every client sending its group at once (median round)."""
    import statistics

    from reward_fns import core
    from reward_fns.remote import RemoteScorer

    core.forget_scorers()
    scorer = RemoteScorer(ModelSpec(checkpoint=url))
    scorer.score(*groups[0])  # warm-up (model, connection)
    times = []
    for _ in range(rounds):
        threads = [threading.Thread(target=scorer.score, args=grp) for grp in groups]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=600)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _serve(spec, options: ServeOptions, port: int) -> str:
    """Deploy on the one HTTP proxy Ray Serve runs (its port is fixed when Serve starts)."""
    run(build_app(spec, options=options), host="127.0.0.1", port=port)
    return f"http://127.0.0.1:{port}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--g", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", default="tiny", choices=["tiny", "small"])
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base, ckpt = build_tiny_multitap(tmp, seed=0, size=args.size)
        spec = ModelSpec(checkpoint=str(ckpt), base_model=str(base), device="cpu")
        groups = _groups(args.clients, args.g)
        model = MultiTapModel.from_spec(spec)
        model.score(*groups[0])
        t = time.perf_counter()
        for grp in groups:
            model.score(*grp)
        local = time.perf_counter() - t
        results, port = {}, _port()
        try:
            for name, opts in [("batched, 1 replica", ServeOptions(num_cpus=0.5, max_batch_size=16,
                                                                   batch_wait_timeout_s=0.02)),
                               ("one at a time, 1 replica", ServeOptions(num_cpus=0.5, max_batch_size=1)),
                               ("batched, 2 replicas", ServeOptions(replicas=2, num_cpus=0.5, max_batch_size=16,
                                                                    batch_wait_timeout_s=0.02))]:
                url = _serve(spec, opts, port)
                results[name] = _served_seconds(url, groups, args.rounds)
                from ray import serve

                serve.delete("multitap")
        finally:
            shutdown()
    n = args.clients * args.g
    print(f"{args.clients} clients x (1 image x {args.g} completions) = {n} samples per round, model {args.size}")
    print(f"in-process, groups one after another: {local:.3f} s ({1000 * local / n:.1f} ms/sample)")
    for name, s in results.items():
        print(f"served, {name:26}: {s:.3f} s ({1000 * s / n:.1f} ms/sample)")
    b, one = results["batched, 1 replica"], results["one at a time, 1 replica"]
    print(f"dynamic batching vs one request at a time: {one / b:.2f}x; served (batched) vs in-process: "
          f"{b / local:.2f}x the time; 2 vs 1 replicas: {b / results['batched, 2 replicas']:.2f}x")


if __name__ == "__main__":
    main()
