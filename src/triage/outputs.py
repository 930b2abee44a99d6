"""Triage outputs: overlay PNGs, the JSON-safe study record, the files written per run and the one-screen summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pandas as pd

from src.atomic import atomic_path, write_csv, write_json
from src.cnn.model import MASK_CUTOFF
from src.constants import ID_COL, LABELS, SERIES, SLICE_INDEX, STUDY, VOLUME_COL, WINDOWS
from src.predictions import exp_dir

if TYPE_CHECKING:
    from src.triage.ensemble import Ensemble

OVERLAY_MIN_PX = 256  # overlays are drawn at least this large (models often run at 128 px)
SLICE_COLUMNS = [STUDY, SERIES, ID_COL, SLICE_INDEX, "position", *LABELS, VOLUME_COL, "path"]
SUBDURAL = [name for name, _, _ in WINDOWS].index("subdural")
# A volume is called a measurement only when held-out studies put its median error at or under this.
MEASURED_MAX_ERROR_PCT = 25.0


def volume_caveat(ens: Ensemble) -> str | None:
    """What the mL number may be used for, from how the model was trained and what its held-out fold measured
    (oof/<exp>/bloodnet/volume_summary.json, written by python -m src.evaluate.volumes); None without a volume."""
    if not ens.has_seg:
        return None
    if ens.cfg.masks == "none":
        return ("relative only: trained without blood masks (slice labels only), so the mL rank bleeds by size "
                "but are not calibrated")
    try:
        summary = json.loads((exp_dir(ens.exp) / "bloodnet" / "volume_summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    mdape, rho, n = summary.get("mdape_percent"), summary.get("spearman_positive"), summary.get("n_positive_studies")
    if mdape is None or rho is None:
        return "relative only: not checked against true volumes (run python -m src.evaluate.volumes)"
    measured = f"median error {mdape:.0f}%, Spearman {rho:.2f} on {n} held-out positive studies"
    if mdape <= MEASURED_MAX_ERROR_PCT:
        return f"measured: {measured}"
    return f"relative only: {measured}"


def overlay_png(image: np.ndarray, seg: np.ndarray | None, cutoff: float = MASK_CUTOFF) -> bytes:
    """PNG of the subdural window (channel of image [3, S, S]) with predicted blood (p >= cutoff, the one the
    volume counts) in red."""
    gray = image[SUBDURAL].astype(np.float32)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    if seg is not None:
        blood = (seg >= cutoff)[..., None]
        rgb = np.where(blood, 0.45 * rgb + 0.55 * np.array([255.0, 30.0, 30.0]), rgb)  # RGB order
        contours, _ = cv2.findContours((seg >= cutoff).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    bgr = np.ascontiguousarray(rgb[..., ::-1]).clip(0, 255).astype(np.uint8)
    if seg is not None and contours:
        cv2.drawContours(bgr, contours, -1, (0, 255, 255), 1)
    side = max(OVERLAY_MIN_PX, bgr.shape[0])
    bgr = cv2.resize(bgr, (side, side), interpolation=cv2.INTER_NEAREST) if side != bgr.shape[0] else bgr
    ok, buf = cv2.imencode(".png", bgr)
    if not ok:
        raise RuntimeError("cv2 could not encode the overlay PNG")
    return buf.tobytes()


def study_record(result: dict) -> dict:
    """The JSON-safe part of predict_study's result (slice table as records, overlays without their bytes)."""
    rec = {k: v for k, v in result.items() if k not in ("slices", "overlays")}
    table = result["slices"].astype(object).where(result["slices"].notna(), None)
    rec["slices"] = table.to_dict(orient="records")
    rec["overlays"] = [{k: v for k, v in o.items() if k != "png"} for o in result["overlays"]]
    return rec


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:120] or "unnamed"


def write_outputs(results: list[dict], skipped: pd.DataFrame, out_dir: Path, ens: Ensemble) -> dict[str, Path]:
    """studies.csv, slices.csv, skipped.csv, predictions.json and overlays/<study>/<ID>.png, all written atomically."""
    study_rows = []
    for r in results:
        row = {STUDY: r["study"], "PatientID": r["patient"], "n_slices": r["n_slices"], "verdict": r["verdict"]}
        row.update(r["probabilities"])
        row.update({f"flag_{n}": r["flags"][n] for n in LABELS})
        row["blood_volume_ml"] = r["blood_volume_ml"]
        row["top_slices"] = ";".join(t["ID"] for t in r["top_slices"])
        row["probabilities_from"] = r["probabilities_from"]
        study_rows.append(row)
        for o in r["overlays"]:
            png = out_dir / "overlays" / _safe(r["study"]) / f"{_safe(o['ID'])}.png"
            with atomic_path(png) as tmp:
                tmp.write_bytes(o["png"])
            o["file"] = str(png.relative_to(out_dir))
    cols = [*SLICE_COLUMNS, "flag_any"]
    parts = [r["slices"][cols] for r in results]
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=cols)
    files = {
        "studies": write_csv(pd.DataFrame(study_rows), out_dir / "studies.csv"),
        "slices": write_csv(table, out_dir / "slices.csv"),
        "skipped": write_csv(skipped, out_dir / "skipped.csv"),
    }
    payload = {"exp": ens.exp, "model": ens.describe(), "probabilities_from": ens.source(),
               "volume_caveat": volume_caveat(ens),
               "thresholds_source": ens.thresholds_source,
               "checkpoints": [str(p) for p in ens.checkpoints], "studies": [study_record(r) for r in results],
               "skipped": skipped.to_dict(orient="records")}
    files["json"] = write_json(payload, out_dir / "predictions.json")
    return files


def summary_text(results: list[dict], skipped: pd.DataFrame, ens: Ensemble, out_dir: Path | None = None) -> str:
    """One screen: a line per study (verdict, p(any), flagged labels, volume, top slice), skipped files, sources."""
    lines = [f"model: {ens.describe()}", f"probabilities: {ens.source()}", f"flags: {ens.thresholds_source}"]
    caveat = volume_caveat(ens)
    lines += [f"blood volume: {caveat}"] if caveat else []
    lines.append("")
    for r in results:
        flagged = [n for n in LABELS if r["flags"][n] and n != "any"]
        vol = "" if r["blood_volume_ml"] is None else f"  blood {r['blood_volume_ml']:.2f} mL"
        top = r["top_slices"][0]
        lines.append(f"{r['verdict'].upper():<15} {r['study']}  {r['n_slices']} slices  "
                     f"p(any)={r['probabilities']['any']:.3f}{vol}  subtypes: {', '.join(flagged) or '-'}  "
                     f"top slice {top['ID']} (#{top['slice_index']})")
    if not results:
        lines.append("no usable DICOM slices")
    if len(skipped):
        lines += ["", f"{len(skipped)} files skipped:"]
        lines += [f"  {row.path}: {row.reason}" for row in skipped.head(8).itertuples()]
        if len(skipped) > 8:
            lines.append(f"  ... {len(skipped) - 8} more in skipped.csv")
    if out_dir is not None:
        lines += ["", f"written: {out_dir}/studies.csv, slices.csv, skipped.csv, predictions.json, overlays/"]
    return "\n".join(lines)
