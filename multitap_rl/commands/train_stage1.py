"""``multitap-rl train-stage1 RECIPE [KEY=VALUE ...]``: stage-1 training from a YAML recipe.

Single process::

    multitap-rl train-stage1 recipes/stage1/qwen2_vl_2b.yaml train.output_dir=runs/mine

Several processes or DeepSpeed (accelerate picks the set-up from its config file)::

    accelerate launch --config_file recipes/accelerate/zero3.yaml -m multitap_rl.cli \\
        train-stage1 recipes/stage1/qwen2_vl_7b.yaml
"""

from __future__ import annotations

import json
import logging
import os

from ._common import emit
from ._common import stage1_requirements as requirements  # noqa: F401  (cli.main checks them first)

RESUMES = True  # an interrupted run continues from its last checkpoint when run again


def add_arguments(p) -> None:
    p.add_argument("recipe", help="YAML recipe (see recipes/stage1/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe overrides, e.g. train.learning_rate=1e-5 data.max_train_samples=100")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    p.add_argument("--dry-run", action="store_true", help="check the recipe and every data row, then exit")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the checkpoints already in train.output_dir and start again (default: resume the "
                        "newest one, refusing one of a different run)")


def run(args) -> int:
    from ..training.config import load_stage1_config
    from ..training.recipe import config_to_dict
    from ..training.stage1 import build_datasets, train_stage1

    cfg = load_stage1_config(args.recipe, args.overrides)
    if args.print_config:
        import yaml

        emit(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None), end="")
        return 0
    main = int(os.environ.get("RANK", "0")) == 0
    logging.getLogger("multitap_rl.training").setLevel(logging.INFO if main else logging.WARNING)
    if args.dry_run:
        train, evals = build_datasets(cfg)
        emit(f"recipe OK: {len(train)} training rows, {len(evals) if evals is not None else 0} evaluation rows")
        return 0
    result = train_stage1(cfg, overwrite=args.overwrite)
    if main:
        emit(json.dumps({"global_step": result.global_step, "resumed_from": result.resumed_from,
                          "metrics": result.metrics, "models": {k: str(v) for k, v in result.model_dirs.items()}},
                         indent=1))
    return 0
