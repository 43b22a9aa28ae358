"""``multitap-rl serve``: the MULTI-TAP reward on Ray Serve (replicas, autoscaling, dynamic batching).

On a laptop it starts Ray locally; ``--address auto`` (or ``ray://...``) joins an existing cluster.
It binds 127.0.0.1 unless ``--host`` says otherwise. A bearer token, when wanted, is read from
``--token-file`` or the ``MULTITAP_SERVE_TOKEN`` environment variable, never from a flag's value
(that would show in process lists). Serves until interrupted (Ctrl-C stops it and leaves Ray).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError
from ._common import add_model_arguments, emit


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", default=None, help="join this Ray cluster ('auto', 'ray://host:10001'); "
                                                   "default: start Ray here")
    p.add_argument("--replicas", type=int, default=1, help="replicas (each loads the model)")
    p.add_argument("--min-replicas", type=int, default=None, help="autoscale from this many replicas...")
    p.add_argument("--max-replicas", type=int, default=None, help="...to this many")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (0.5: two replicas share one)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    p.add_argument("--max-batch-size", type=int, default=16, help="concurrent requests merged into one engine call")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a batch waits for more requests")
    p.add_argument("--allowed-root", default=None,
                   help="accept image paths inside this directory (default: images only as base64 bytes)")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body (MB)")
    p.add_argument("--max-samples", type=int, default=1024, help="most samples per request")
    p.add_argument("--token-file", default=None, help="file holding the bearer token clients must send "
                                                      "(or set MULTITAP_SERVE_TOKEN)")
    p.add_argument("--weights", default=None, help="the OpenRLHF endpoint's weights (its clients send none)")
    p.add_argument("--normalize", default="none", choices=["none", "fixed"], help="the OpenRLHF endpoint's normalisation")
    p.add_argument("--gate", action="append", default=[], help="the OpenRLHF endpoint's gates (repeatable)")
    p.add_argument("--invalid-reward", type=float, default=0.0, help="OpenRLHF reward of a sample that cannot be scored")


def _token(args) -> str | None:
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"--token-file {args.token_file}: cannot read it ({exc})") from None
        if not token:
            raise ConfigError(f"--token-file {args.token_file} is empty")
        return token
    return os.environ.get("MULTITAP_SERVE_TOKEN") or None


def _check(args) -> None:
    for name in ("port", "replicas", "max_batch_size", "max_samples"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.port < 65536:
        raise ConfigError("--port must be in 1..65535")
    if args.batch_wait_ms < 0 or args.max_body_mb <= 0 or args.num_cpus < 0 or args.num_gpus < 0:
        raise ConfigError("--batch-wait-ms, --num-cpus and --num-gpus must be >= 0 and --max-body-mb > 0")
    lo, hi = args.min_replicas, args.max_replicas
    if (lo is not None and lo < 0) or (hi is not None and hi < 1) or (lo is not None and hi is not None and lo > hi):
        raise ConfigError("autoscaling needs 0 <= --min-replicas <= --max-replicas, --max-replicas >= 1")
    if args.allowed_root is not None and not Path(args.allowed_root).is_dir():
        raise ConfigError(f"--allowed-root {args.allowed_root} is not a directory")


def run(args) -> int:
    from ..combiner import RewardCombiner
    from ..errors import require
    from ..heads import RidgeHeads
    from ..serving.app import ServeOptions, build_app, run as serve_run, shutdown
    from ..serving.protocol import ServeLimits
    from ..serving.service import RewardSettings
    from ._common import model_spec

    # 1. Everything checkable before Ray starts or a model loads.
    _check(args)
    require("ray.serve", "serve", "multitap-rl serve")
    spec = model_spec(args)
    token = _token(args)
    heads = RidgeHeads.load(args.heads) if args.heads else None  # weights and gates checked against its names
    RewardCombiner(args.weights, ("overall", *(heads.names if heads is not None else ())), normalize=args.normalize,
                   stats=dict(heads.stats) if heads is not None else {}, gates=args.gate)
    limits = ServeLimits(max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_samples=args.max_samples,
                         allowed_root=None if args.allowed_root is None else str(Path(args.allowed_root).resolve()))
    reward = RewardSettings(weights=args.weights, normalize=args.normalize, gates=tuple(args.gate),
                            on_invalid=args.invalid_reward)
    options = ServeOptions(replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                           num_gpus=args.num_gpus, num_cpus=args.num_cpus, max_batch_size=args.max_batch_size,
                           batch_wait_timeout_s=args.batch_wait_ms / 1000.0)
    # 2. Serve until interrupted.
    app = build_app(spec, limits=limits, token=token, reward=reward, options=options)
    emit(f"serving {spec.checkpoint} on http://{args.host}:{args.port} (GET /health, GET /info, POST /v1/score, "
         "POST /openrlhf); Ctrl-C stops")
    try:
        serve_run(app, host=args.host, port=args.port, address=args.address, blocking=True)
    finally:
        shutdown()
    return 0
