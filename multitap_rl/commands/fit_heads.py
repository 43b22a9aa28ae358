"""``multitap-rl fit-heads``: ridge heads on a feature store (cross-validated alpha per dimension)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError, DataError
from ._common import check_output_dir, emit


def add_arguments(p) -> None:
    p.add_argument("--features", default=None, help="feature store directory from `multitap-rl extract`")
    p.add_argument("--targets", default=None,
                   help="JSONL/JSON/CSV of targets, one row per sample in store order or matched by an 'id' column "
                        "(default: the targets the schema stored at extraction)")
    p.add_argument("--dims", default=None, help="comma-separated dimensions to fit (default: all)")
    p.add_argument("--out", required=True, help="heads directory to write (heads.safetensors + heads.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing heads directory at --out")
    p.add_argument("--alphas", default=None, help="comma-separated penalties (default: a scale-free log grid)")
    p.add_argument("--no-standardize", action="store_true", help="do not z-score features before the penalty")
    p.add_argument("--nan-policy", default="error", choices=["error", "drop"],
                   help="NaN (unrated) targets: error (default) or drop those rows from that dimension's fit")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this fraction of data rows, fit on the rest and report held-out metrics")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split (0)")
    p.add_argument("--tolerance", type=float, default=0.5, help="accuracy tolerance in the report (0.5)")
    p.add_argument("--from-legacy", default=None, metavar="PICKLE",
                   help="convert a scikit-learn/joblib pickle of a fitted Ridge instead of fitting")
    p.add_argument("--names", default=None, help="with --from-legacy: comma-separated dimension names")
    p.add_argument("--trust-legacy-pickle", action="store_true",
                   help="with --from-legacy: allow unpickling it (a pickle can run arbitrary code: only trusted files)")


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _stored_columns(fs, name: str) -> list[str]:
    """The data column(s) dimension ``name`` of a feature store was read from (its schema's; the
    dimension's name when the manifest does not say)."""
    from ..schemas import load_schema

    try:
        schema = load_schema(fs.manifest["schema"])
        dim = next(d for d in schema.dimensions if d.name == name)
    except (KeyError, StopIteration, ValueError, TypeError):
        return [name]
    return list(dict.fromkeys(dim.source(v.tag) for v in schema.samples))


def _check_rated(args, fs, targets: dict) -> None:
    """Before fitting, in the command line's terms: a dimension with no rated sample (all NaN: its
    column was missing or empty) cannot be fit under any --nan-policy; one with some NaN needs
    ``--nan-policy drop``. Dimensions the targets lack are left to ``fit_heads`` to name."""
    import numpy as np

    from ..training.stage2 import split_rows

    train = split_rows(fs, args.val_fraction, args.seed)[0] if args.val_fraction > 0 else np.arange(len(fs))
    names = [n for n in (_csv(args.dims) or list(targets)) if n in targets and n != "overall"]
    where = args.targets if args.targets is not None else f"{args.features} (targets stored by extract)"
    for name in names:
        y = np.asarray(targets[name], dtype=np.float64)[train]
        nan = np.isnan(y)
        if y.size and nan.all():
            others = [n for n in names if n != name]
            leave = f", or leave it out: --dims {','.join(others)}" if others else ""
            if args.targets is None:
                cols = _stored_columns(fs, name)
                col = f"column {cols[0]!r} was" if len(cols) == 1 else f"columns {', '.join(map(repr, cols))} were"
                raise DataError(f"{where}: dimension {name!r} has no rated sample (all {y.size} targets are NaN: "
                                f"{col} missing or empty in every row); no --nan-policy can fit it: "
                                f"extract again with the right column{leave}")
            raise DataError(f"{where}: dimension {name!r} has no rated sample (all {y.size} values are empty or "
                            f"null); no --nan-policy can fit it: fill that column{leave}")
        if nan.any() and args.nan_policy == "error":
            rows = sorted({int(r) for r in fs.rows[train[nan]]})
            shown = ", ".join(map(str, rows[:5])) + (" ..." if len(rows) > 5 else "")
            raise DataError(f"{where}: dimension {name!r} is unrated (NaN) for {int(nan.sum())} of {y.size} samples "
                            f"(data rows {shown}); pass --nan-policy drop to fit it on its {int((~nan).sum())} "
                            "rated samples")


def run(args) -> int:
    from ..heads import CONFIG_FILE, convert_legacy_heads
    from ..metrics import format_report
    from ..training.features import load_features
    from ..training.stage2 import fit_heads, read_targets

    # 1. The output first: an existing heads folder is replaced only with --overwrite (as `extract`).
    check_output_dir(args.out, overwrite=args.overwrite, what="heads directory", marker=CONFIG_FILE)
    # 2. Legacy conversion.
    if args.from_legacy is not None:
        fp = None
        if args.features:
            fp = dict(load_features(args.features).fingerprint)
        heads = convert_legacy_heads(args.from_legacy, args.out, names=_csv(args.names),
                                     trust_legacy=args.trust_legacy_pickle, fingerprint=fp)
        emit(f"converted {args.from_legacy} -> {args.out} ({', '.join(heads.names)}; hidden size {heads.hidden_size})")
        return 0
    if args.features is None:
        raise ConfigError("--features is required (or --from-legacy to convert a pickle)")
    if args.names is not None or args.trust_legacy_pickle:
        raise ConfigError("--names/--trust-legacy-pickle go with --from-legacy")

    # 3. Fit.
    alphas = None
    if args.alphas is not None:
        try:
            alphas = [float(a) for a in _csv(args.alphas)]
        except ValueError:
            raise ConfigError(f"--alphas {args.alphas!r}: expected comma-separated numbers") from None
    fs = load_features(args.features)
    if args.targets is None:
        targets = fs.targets_dict() if fs.names else None  # None: fit_heads says the store holds none
    else:
        targets = read_targets(args.targets, len(fs), ids=fs.ids, dims=_csv(args.dims))
    if targets is not None:
        _check_rated(args, fs, targets)
    heads, report = fit_heads(fs, targets, dims=_csv(args.dims), alphas=alphas,
                              standardize=not args.no_standardize, nan_policy=args.nan_policy,
                              val_fraction=args.val_fraction, seed=args.seed, tol=args.tolerance)
    heads.save(args.out)

    # 4. Summary: chosen alpha and leave-one-out error per dimension, held-out metrics if any.
    emit(f"{'dimension':<24}{'alpha':>12}{'LOO MSE':>12}{'n':>8}")
    for name in heads.names:
        loo = min(heads.meta["loo_mse"][name])
        emit(f"{name:<24}{heads.meta['alphas'][name]:>12.4g}{loo:>12.4g}{heads.meta['n_train'][name]:>8d}")
    if report is not None:
        emit(f"\nheld-out rows ({args.val_fraction:g} of the data):")
        emit(format_report(report))
        (Path(args.out) / "val_report.json").write_text(json.dumps(report, indent=2) + "\n")
    emit(f"\nheads -> {args.out}")
    return 0
