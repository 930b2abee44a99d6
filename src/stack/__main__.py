"""Level-2 stacking over slice sequences (`python -m src.stack --exp EXP`): LightGBM, BiGRU, their blend."""

from __future__ import annotations

import os

# OpenMP threads that wait by spinning turn a busy or shared machine into a standstill: on 2 cores other jobs also
# used (load ~10), a 3,200-row LightGBM fit took 80 s with 2 spinning threads, 2.6 s with 2 passive ones and
# 2.3 s with 1. A value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
from pathlib import Path

import torch

from src.atomic import write_json
from src.errors import InputError, run_cli
from src.predictions import fold_files, run_config
from src.stack.compare import run_compare
from src.stack.run import run_stack
from src.stack.threads import GRU_TORCH_THREADS


def main(argv: list[str] | None = None) -> int:
    from src.config import Config
    from src.data.metadata import load_metadata
    from src.paths import OOF_DIR, resolve_data_dir
    from src.stage_settings import parse_with_section, section_record

    parser = argparse.ArgumentParser(prog="python -m src.stack", description=__doc__)
    parser.add_argument("--exp", required=True, help="experiment name: reads oof/EXP/fold*_{valid,test}.csv")
    parser.add_argument("--data", help="data directory (default: the one in oof/EXP/fold*_run.json, else "
                        "$ICH_DATA, input/, input/synthetic/)")
    # Defaults from the config's `stack` section (--config F / --set stack.key=v); these flags override it.
    parser.add_argument("--k", type=int, help="neighbours on each side for the LightGBM features")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--skip-gru", action=argparse.BooleanOptionalAction, help="LightGBM only (no GRU, no blend)")
    parser.add_argument("--compare", action="store_true", help="only write the comparison of existing outputs")
    parser.add_argument("--n-folds", type=int, help="folds of the CNN's CV (default: from fold*_run.json)")
    parser.add_argument("--n-inner", type=int, help="inner CV folds when some CNN folds are missing")
    parser.add_argument("--device", help="GRU device: cpu, cuda or auto")
    parser.add_argument("--threads", type=int, help="CPU threads for LightGBM and the GRU's torch (0: LightGBM one "
                        "per 20,000 rows, the GRU one; see src/stack/threads.py)")
    parser.add_argument("--seeds", type=int, help="seeds bagged per stacker model (0 = the stacker's default, 5)")
    parser.add_argument("--max-rounds", type=int, help="LightGBM boosting rounds at most (0 = its default, 2000)")
    parser.add_argument("--gru-epochs", type=int, help="GRU epochs at most (0 = its default, 60)")
    parser.add_argument("--oof-root", default=str(OOF_DIR), help=argparse.SUPPRESS)
    args, cfg = parse_with_section(parser, argv, "stack")
    if args.k < 0:
        raise InputError(f"--k must be >= 0, got {args.k}")
    oof_root = Path(args.oof_root)
    run_cfg = run_config(oof_root / args.exp)
    recorded = run_cfg.get("data_dir") or ""
    data_dir = resolve_data_dir(args.data or (recorded if recorded and Path(recorded).is_dir() else None))
    n_folds = args.n_folds or int(run_cfg.get("n_folds") or Config().n_folds)
    meta_train = load_metadata(data_dir, "train")
    if not args.compare:
        has_test = bool(fold_files(oof_root / args.exp, "test"))
        meta_test = load_metadata(data_dir, "test") if has_test else None
        torch.set_num_threads(args.threads or GRU_TORCH_THREADS)
        # LightGBM, unless told, takes threads by the rows it fits (src.stack.threads.lgbm_threads)
        lgbm_params, gru_params = {"n_jobs": args.threads or 0}, {"device": args.device}
        for given, params, key in ((args.seeds, lgbm_params, "n_seeds"), (args.seeds, gru_params, "n_seeds"),
                                   (args.max_rounds, lgbm_params, "n_estimators"),
                                   (args.gru_epochs, gru_params, "epochs")):
            if given < 0:
                raise InputError(f"--seeds, --max-rounds and --gru-epochs must be >= 0 (0 = default), got {given}")
            if given:
                params[key] = given
        run_stack(args.exp, oof_root, meta_train, meta_test, n_folds, args.k, args.seed, args.skip_gru,
                  lgbm_params=lgbm_params, gru_params=gru_params, n_inner=args.n_inner)
        write_json(section_record(cfg, "stack", exp=args.exp, data_dir=str(data_dir)),
                   oof_root / f"{args.exp}_stack_settings.json")
    run_compare(args.exp, oof_root, meta_train, n_folds, args.n_inner, args.seed)
    return 0


if __name__ == "__main__":
    run_cli(main)
