"""Kaggle submission from the mean of the fold test files (sample order, clipped) and its validator."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from src.atomic import write_csv
from src.constants import ID_COL, LABELS
from src.errors import InputError, run_cli
from src.paths import SAMPLE_SUBMISSION_CSV, SUBMISSIONS_DIR, TRAIN_CSV, resolve_data_dir
from src.predictions import load_test_predictions

DEFAULT_CLIP = 1e-5  # top solutions clipped at 1e-5..1e-6; Kaggle's own 1e-15 makes a confident miss cost ~34.5
# Last-resort prior when neither the metadata nor stage_2_train.csv can be read: the stage-1 train label
# prevalences (docs: /work/shared/RSNA_FACTS.md), in LABELS order.
PUBLISHED_PRIOR: dict[str, float] = {
    "epidural": 0.0041,
    "intraparenchymal": 0.048,
    "intraventricular": 0.035,
    "subarachnoid": 0.048,
    "subdural": 0.063,
    "any": 0.144,
}


def training_prior(data_dir: Path | None = None, meta_train: pd.DataFrame | None = None) -> tuple[pd.Series, str]:
    """Label means of the training set and where they came from: metadata labels, else stage_2_train.csv, else
    the published stage-1 prevalences (PUBLISHED_PRIOR)."""
    if meta_train is None and data_dir is not None:
        try:
            from src.data.metadata import load_metadata

            meta_train = load_metadata(data_dir, "train")
        except (ImportError, InputError, OSError, ValueError, KeyError):
            meta_train = None  # fall through to the raw label CSV
    if meta_train is not None and all(c in meta_train.columns for c in LABELS) and len(meta_train):
        return meta_train[list(LABELS)].astype(float).mean(), "metadata train labels"
    if data_dir is not None and (Path(data_dir) / TRAIN_CSV).exists():
        from src.data.metadata import read_labels

        try:
            return read_labels(Path(data_dir) / TRAIN_CSV)[list(LABELS)].astype(float).mean(), str(
                Path(data_dir) / TRAIN_CSV
            )
        except InputError:
            pass  # malformed label CSV: the published prior is still a sane fill
    return pd.Series(PUBLISHED_PRIOR)[list(LABELS)], "published stage-1 prevalences (fallback)"


def split_ids(ids: pd.Series) -> tuple[pd.Series, pd.Series]:
    """`ID_<image>_<subtype>` -> (`ID_<image>`, subtype)."""
    # Plain str.rpartition: pandas' .str.rpartition took 1.7 s per call on 182k rows (bench/scale.py, N/4).
    parts = [s.rpartition("_") for s in ids.astype(str).to_numpy()]
    return (pd.Series([p[0] for p in parts], index=ids.index, dtype=object),
            pd.Series([p[2] for p in parts], index=ids.index, dtype=object))


def build_submission(
    sample: pd.DataFrame, preds: pd.DataFrame, prior: pd.Series, clip: float = DEFAULT_CLIP
) -> tuple[pd.DataFrame, list[str]]:
    """Kaggle rows in the sample's order; images without a prediction get the prior. Returns (submission, missing).

    Predictions for images absent from the sample are ignored; none matching at all is an error (wrong split).
    """
    images, subtypes = split_ids(sample[ID_COL])
    col = subtypes.map({name: j for j, name in enumerate(LABELS)})
    if col.isna().any():
        raise InputError(f"sample submission: unknown subtype in ID {sample[ID_COL][col.isna()].iloc[0]}")
    table = preds.set_index(ID_COL)[list(LABELS)].to_numpy(dtype=np.float64)
    row = pd.Index(preds[ID_COL]).get_indexer(images)
    if (row < 0).all():
        raise InputError("no prediction ID matches the sample submission: are these test predictions?")
    prior_values = np.asarray(prior[list(LABELS)], dtype=np.float64)
    col = col.to_numpy(dtype=np.int64)
    values = np.where(row >= 0, table[np.maximum(row, 0), col], prior_values[col])
    missing = sorted(set(images[row < 0]))
    submission = pd.DataFrame({ID_COL: sample[ID_COL].to_numpy(), "Label": np.clip(values, clip, 1.0 - clip)})
    return submission, missing


def check_submission(sub: pd.DataFrame, sample: pd.DataFrame | None = None, name: str = "submission") -> int:
    """Raise InputError (one line, naming the defect) unless sub is a valid Kaggle file; returns its row count."""
    if list(sub.columns) != [ID_COL, "Label"]:
        raise InputError(f"{name}: header is {','.join(map(str, sub.columns))}, expected ID,Label")
    if sub[ID_COL].isna().any():
        raise InputError(f"{name}: empty ID at row {int(sub[ID_COL].isna().to_numpy().argmax()) + 2}")
    labels = pd.to_numeric(sub["Label"], errors="coerce")
    if labels.isna().any():
        first = int(labels.isna().to_numpy().argmax())
        raise InputError(f"{name}: Label is NaN or not a number at row {first + 2} (ID {sub[ID_COL].iloc[first]})")
    outside = (labels < 0) | (labels > 1)
    if outside.any():
        first = int(outside.to_numpy().argmax())
        raise InputError(
            f"{name}: Label {labels.iloc[first]} outside [0, 1] at row {first + 2} (ID {sub[ID_COL].iloc[first]})"
        )
    dup = sub[ID_COL].duplicated()
    if dup.any():
        raise InputError(f"{name}: ID {sub[ID_COL][dup].iloc[0]} appears more than once ({int(dup.sum())} duplicates)")
    images, subtypes = split_ids(sub[ID_COL])
    unknown = ~subtypes.isin(LABELS)
    if unknown.any():
        raise InputError(f"{name}: ID {sub[ID_COL][unknown].iloc[0]} has no known subtype suffix")
    if sample is not None:
        expected = pd.Index(sample[ID_COL].astype(str))
        got = pd.Index(sub[ID_COL].astype(str))
        absent = expected.difference(got)
        if len(absent):
            raise InputError(f"{name}: {len(absent)} sample ID(s) missing, e.g. {absent[0]}")
        extra = got.difference(expected)
        if len(extra):
            raise InputError(f"{name}: {len(extra)} ID(s) not in the sample submission, e.g. {extra[0]}")
    per_image = images.value_counts()
    if (per_image != len(LABELS)).any():
        bad = per_image[per_image != len(LABELS)]
        raise InputError(
            f"{name}: image {bad.index[0]} has {bad.iloc[0]} rows, expected {len(LABELS)} "
            f"({len(bad)} image(s) affected)"
        )
    return len(sub)


def read_submission_csv(path: str | Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype={ID_COL: str, "Label": str}, keep_default_na=False, na_values=[""])
    except FileNotFoundError as err:
        raise InputError(f"{path}: no such file") from err
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read CSV ({err})") from err


def check_file(path: str | Path, sample_path: str | Path | None = None) -> int:
    """Validate a submission CSV on disk (against the sample when given); returns its row count."""
    sample = read_submission_csv(sample_path) if sample_path else None
    return check_submission(read_submission_csv(path), sample, name=str(path))


def make_submission(
    pred_dir: Path, data_dir: Path, name: str, clip: float = DEFAULT_CLIP, out_dir: Path = SUBMISSIONS_DIR
) -> tuple[Path, list[str]]:
    """The whole stage: predictions -> submissions/<name>.csv (+ <name>_missing.csv when images lack one)."""
    sample_path = data_dir / SAMPLE_SUBMISSION_CSV
    if not sample_path.exists():
        raise InputError(f"{sample_path}: sample submission not found (use --data)")
    sample = read_submission_csv(sample_path)
    preds = load_test_predictions(pred_dir)
    sample_images = split_ids(sample[ID_COL])[0]
    # The prior fills images without a prediction only; reading 752k rows of training metadata for it is skipped
    # when every image has one.
    if sample_images.isin(set(preds[ID_COL])).all():
        prior, source = pd.Series(PUBLISHED_PRIOR)[list(LABELS)], "unused: every image has a prediction"
    else:
        prior, source = training_prior(data_dir)
    submission, missing = build_submission(sample, preds, prior, clip)
    unused = len(preds) - preds[ID_COL].isin(set(sample_images)).sum()
    if unused:
        print(f"note: {unused} predicted image(s) are not in the sample submission and were left out")
    check_submission(submission, sample, name="built submission")
    out = write_csv(submission, out_dir / f"{name}.csv")
    sidecar = out_dir / f"{name}_missing.csv"
    if missing:
        write_csv(pd.DataFrame({ID_COL: missing, "filled_with": source}), sidecar)
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        print(f"{len(missing)} test image(s) without a prediction, filled with the prior ({source}): {shown}")
        print(f"listed in {sidecar}")
    elif sidecar.exists():
        sidecar.unlink()  # a stale list from an earlier run would contradict this submission
    print(f"wrote {out}: {len(submission)} rows from {len(preds)} predicted images, clip {clip:g}")
    return out, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.evaluate.submit", description=__doc__)
    parser.add_argument("--pred", help="prediction directory holding *_test.csv (oof/<exp> or oof/<exp>_stack_blend)")
    parser.add_argument("--name", help="submission name (default: the prediction directory's name)")
    parser.add_argument("--clip", type=float, default=DEFAULT_CLIP, help="clip to [clip, 1 - clip] (default 1e-5)")
    parser.add_argument("--data", help="data directory (default: $ICH_DATA, input/, input/synthetic/)")
    parser.add_argument("--out-dir", default=str(SUBMISSIONS_DIR), help="where <name>.csv goes (default submissions/)")
    parser.add_argument("--check", metavar="FILE", help="validate FILE instead of building a submission")
    parser.add_argument("--sample", help="sample submission for --check (default: the data directory's)")
    args = parser.parse_args(argv)
    if not 0 <= args.clip < 0.5:
        raise InputError(f"--clip {args.clip}: must be in [0, 0.5)")
    if args.check:
        sample = Path(args.sample) if args.sample else resolve_data_dir(args.data) / SAMPLE_SUBMISSION_CSV
        if not args.sample and not sample.exists():
            print(f"note: {sample} not found; checking the format only", file=sys.stderr)
            sample = None
        print(f"OK: {check_file(args.check, sample)} rows")
        return 0
    if not args.pred:
        raise InputError("give --pred DIR (or --check FILE)")
    pred_dir = Path(args.pred)
    if not pred_dir.is_dir():
        raise InputError(f"{pred_dir}: not a directory")
    make_submission(
        pred_dir, resolve_data_dir(args.data), args.name or pred_dir.resolve().name, args.clip, Path(args.out_dir)
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
