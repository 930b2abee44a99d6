"""Triage new head-CT studies: DICOM files, folders or zips -> per-study verdict, probabilities, volume, overlays."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from src import paths
from src.atomic import write_json
from src.constants import STUDY
from src.errors import InputError
from src.stack.bundle import KINDS
from src.stage_settings import parse_with_section, section_record
from src.triage.ensemble import DEFAULT_PRECISION, DEFAULT_STACKER, Ensemble, check_stacker, load_ensemble
from src.triage.inputs import load_study_files
from src.triage.outputs import summary_text, write_outputs
from src.triage.predict import predict_study


def run(inputs: Sequence[str | os.PathLike], ens: Ensemble, out_dir: Path, precision: float = DEFAULT_PRECISION,
        batch_size: int = 32, tta: bool | None = None) -> tuple[list[dict], pd.DataFrame]:
    """Load, predict every study, write the outputs; returns (results, skipped)."""
    slices, images, skipped = load_study_files(inputs, ens.cfg.image_size, progress=True)
    results = []
    groups = slices.groupby(STUDY, sort=True).indices if len(slices) else {}
    for _, rows in tqdm(groups.items(), desc="studies", disable=len(groups) < 2, leave=False):
        results.append(predict_study(ens, slices.iloc[rows], images[rows], precision, batch_size, tta))
    write_outputs(results, skipped, out_dir, ens)
    return results, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.triage", description=__doc__)
    parser.add_argument("inputs", nargs="+", help="study folders, DICOM files or zips")
    parser.add_argument("--exp", help="experiment under work/models/ (default: the one with the newest checkpoint)")
    parser.add_argument("--out", type=Path, help="output folder (default: work/infer/<time>)")
    # Defaults from the config's `triage` section (--config F / --set triage.key=v); these flags override it.
    parser.add_argument("--threshold-precision", type=float,
                        help="flag at the thresholds saved for this precision (oof/<exp>/report/thresholds.json)")
    parser.add_argument("--batch-size", type=int, help="slices per forward pass")
    parser.add_argument("--no-tta", action="store_true", help="skip the flip view even if validation used it")
    parser.add_argument("--stacker", choices=[*KINDS, "none"],
                        help=f"saved level-2 stacker applied after the CNN folds (default: {DEFAULT_STACKER} when "
                        "python -m src.stack saved one, else the CNN fold mean)")
    args, cfg = parse_with_section(parser, argv, "triage", not_here=("port", "max_upload_mb"))
    if args.batch_size < 1:
        raise InputError("--batch-size must be >= 1")
    check_stacker(args.stacker)
    ens = load_ensemble(args.exp, args.threshold_precision, args.stacker or None)
    out_dir = args.out or paths.WORK / "infer" / time.strftime("%Y%m%d-%H%M%S")
    results, skipped = run(args.inputs, ens, out_dir, args.threshold_precision, args.batch_size,
                           False if args.no_tta else None)
    write_json(section_record(cfg, "triage", exp=ens.exp), out_dir / "triage_settings.json")
    print(summary_text(results, skipped, ens, out_dir))
    return 0 if results else 2
