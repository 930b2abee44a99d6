"""Fixed-precision threshold tables, RADnet's consecutive-slice rule, the report files and test triage."""

import json

import numpy as np
import pandas as pd
import pytest

from src.constants import LABELS
from src.errors import InputError
from src.evaluate.report import build_report, load_valid_predictions, main, triage
from src.evaluate.thresholds import (
    ANY_SWEEP,
    aggregate_studies,
    apply_thresholds,
    level_tables,
    run_scores,
    threshold_table,
    thresholds_to_dict,
)

SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
Y = np.array([1, 1, 0, 1, 0, 1, 0, 0, 0, 0])


def test_threshold_table_by_hand():
    # Flag top k: (tp, fp) = (1,0) (2,0) (2,1) (3,1) (3,2) (4,2) (4,3) ... ; 4 positives, 6 negatives.
    t = threshold_table(Y, SCORES, [0.6, 0.7, 0.8, 1.0]).set_index("target_precision")
    assert t.loc[0.7, "threshold"] == 0.6  # precision 3/4, recall 3/4: the best recall at precision >= 0.7
    row = t.loc[0.7]
    assert (row["precision"], row["recall"]) == (0.75, 0.75)
    assert row["specificity"] == pytest.approx(5 / 6)
    assert row["accuracy"] == pytest.approx(0.8)
    assert row["f1"] == pytest.approx(0.75)
    assert (row["support"], row["n"], row["tp"], row["fp"], row["n_flagged"]) == (4, 10, 3, 1, 4)
    assert t.loc[0.6, "threshold"] == 0.4 and t.loc[0.6, "recall"] == 1.0  # 4/6 >= 0.6
    assert t.loc[0.8, "threshold"] == 0.8 and t.loc[0.8, "recall"] == 0.5
    assert t.loc[1.0, "threshold"] == 0.8  # highest recall among precision-1 thresholds
    assert t["reachable"].all()


def test_exact_precision_boundary_is_accepted():
    y = np.array([1] * 7 + [0] * 3 + [0] * 5)
    s = np.r_[np.full(10, 0.9), np.full(5, 0.1)]
    row = threshold_table(y, s, [0.7]).iloc[0]
    assert row["reachable"] and row["precision"] == 0.7 and row["recall"] == 1.0


def test_unreachable_targets_and_ties():
    # Ties are flagged together: 0.5 gives precision 2/3 and cannot be split to reach 0.7.
    t = threshold_table(np.array([1, 1, 0, 0]), np.array([0.5, 0.5, 0.5, 0.1]), [0.6, 0.7])
    assert t.loc[0, "reachable"] and t.loc[0, "threshold"] == 0.5
    assert not t.loc[1, "reachable"] and np.isnan(t.loc[1, "threshold"]) and np.isnan(t.loc[1, "recall"])
    assert pd.isna(t.loc[1, "tp"])
    none = threshold_table(np.zeros(5), np.arange(5.0), [0.7]).iloc[0]
    assert not none["reachable"] and none["support"] == 0


def test_threshold_table_matches_brute_force():
    rng = np.random.default_rng(5)
    y = rng.random(400) < 0.2
    s = np.round(rng.random(400) * 0.6 + 0.4 * y, 2)
    targets = [0.5, 0.6, 0.7, 0.8, 0.9]
    fast = threshold_table(y, s, targets)
    for target, got in zip(targets, fast.itertuples()):
        best = None
        for t in np.unique(s):
            flag = s >= t
            tp, fp = int((flag & y).sum()), int((flag & ~y).sum())
            if tp and tp / (tp + fp) >= target and (best is None or tp > best[1] or (tp == best[1] and fp < best[2])):
                best = (t, tp, fp)
        if best is None:
            assert not got.reachable
        else:
            assert (got.threshold, got.tp, got.fp) == best


def test_any_sweep_trades_recall_for_precision(tmp_path):
    meta, preds = _crafted(n_studies=40, seed=7)
    build_report(preds.assign(source="fold0_valid.csv"), meta, tmp_path, [0.7], n_boot=20)
    for name in ("any_sweep", "any_sweep_heldout"):
        sweep = pd.read_csv(tmp_path / f"{name}.csv")
        for level, part in sweep.groupby("level"):
            assert part["target_precision"].tolist() == list(ANY_SWEEP), (name, level)
            reached = part[part["precision"].notna()]
            if name == "any_sweep":  # in-sample: each point meets its target, higher targets never gain recall
                assert (reached["precision"] >= reached["target_precision"] - 1e-9).all()
                assert reached["recall"].is_monotonic_decreasing and len(reached) >= 3


def _series_frame():
    """Study A: one run of three 0.9s; B: high slices never three in a row; C: two slices; D: two series of 2 + 1."""
    rows = []
    for study, series, probs in [
        ("A", "A1", [0.9, 0.8, 0.2, 0.9, 0.9, 0.9]),
        ("B", "B1", [0.95, 0.95, 0.1, 0.95, 0.95]),
        ("C", "C1", [0.99, 0.99]),
        ("D", "D1", [0.9, 0.9]),
        ("D", "D2", [0.9]),
    ]:
        for k, p in enumerate(probs):
            rows.append(
                {
                    "ID": f"ID_{series}_{k}",
                    "StudyInstanceUID": study,
                    "SeriesInstanceUID": series,
                    "slice_index": k,
                    "p": p,
                }
            )
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0).reset_index(drop=True)  # order must not matter


def test_radnet_windows_follow_slice_order():
    df = _series_frame()
    window = pd.Series(run_scores(df["SeriesInstanceUID"], df["slice_index"], df["p"].to_numpy()), index=df["ID"])
    assert window["ID_A1_0"] == 0.2 and window["ID_A1_3"] == 0.9
    assert window["ID_A1_4"] == -np.inf and window["ID_B1_0"] == 0.1
    studies = aggregate_studies(df, df[["p"]].to_numpy(), None, names=["x"]).set_index("StudyInstanceUID")
    assert studies["max_x"].to_dict() == {"A": 0.9, "B": 0.95, "C": 0.99, "D": 0.9}
    # B never has three consecutive slices above 0.1; C and D are too short (no run crosses series).
    assert studies["radnet_x"].to_dict() == {"A": 0.9, "B": 0.1, "C": 0.0, "D": 0.0}
    assert studies["n_slices"].to_dict() == {"A": 6, "B": 5, "C": 2, "D": 3}


def test_apply_thresholds_flags_images_and_studies():
    df = _series_frame()
    p = np.tile(df[["p"]].to_numpy(), (1, 6))
    point = {"threshold": 0.5, "precision": 1.0, "recall": 1.0, "specificity": 1.0, "support": 1}
    levels = {lv: {c: {"0.7": point, "0.9": None} for c in LABELS} for lv in ("slice", "study_max", "study_radnet")}
    images, studies = apply_thresholds(df, p, {"radnet_run": 3, "levels": levels})
    assert images["any_p70"].sum() == (df["p"] >= 0.5).sum() and "any_p90" not in images
    st = studies.set_index("StudyInstanceUID")
    assert st["max_any_p70"].to_dict() == {"A": True, "B": True, "C": True, "D": True}
    assert st["radnet_any_p70"].to_dict() == {"A": True, "B": False, "C": False, "D": False}
    assert st["triage_any"].tolist() == [0.7] * 4


def _crafted(n_studies=30, per_study=12, seed=0):
    rng = np.random.default_rng(seed)
    meta, preds = [], []
    for s in range(n_studies):
        positive = s % 3 == 0
        for k in range(per_study):
            bleed = positive and 3 <= k < 8
            y = np.zeros(6)
            if bleed:
                y[[1, 5]] = 1
            meta.append(
                {
                    "ID": f"ID_{s:03d}{k:02d}",
                    "PatientID": f"P{s}",
                    "StudyInstanceUID": f"S{s}",
                    "SeriesInstanceUID": f"R{s}",
                    "slice_index": k,
                    **dict(zip(LABELS, y.astype(int))),
                }
            )
            p = np.clip(0.5 * y + 0.6 * rng.random(6) ** 2, 0, 1)
            preds.append({"ID": f"ID_{s:03d}{k:02d}", "fold": s % 2, **dict(zip(LABELS, p))})
    return pd.DataFrame(meta).sample(frac=1.0, random_state=1), pd.DataFrame(preds)


def test_build_report_writes_consistent_files(tmp_path):
    meta, preds = _crafted()
    out = tmp_path / "report"
    summary = build_report(preds.assign(source="fold0_valid.csv"), meta, out, [0.7, 0.9], n_boot=50, seed=0)
    for stem in (
        "scores",
        "folds",
        "thresholds_slice",
        "thresholds_study_max",
        "thresholds_study_radnet",
        "any_sweep",
        "any_variants",
    ):
        assert len(pd.read_csv(out / f"{stem}.csv")) > 0 and "|---|" in (out / f"{stem}.md").read_text()
    pngs = sorted((out / "plots").glob("*.png"))
    assert len(pngs) == 2 * 2 * 2  # PR + ROC, slice + study, for the two labels with positives
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    text = (out / "report.md").read_text()
    assert f"{summary['weighted_log_loss']:.5f}" in text and "plots/pr_any.png" in text
    saved = json.loads((out / "thresholds.json").read_text())
    slice_any = pd.read_csv(out / "thresholds_slice.csv").query("label == 'any' and target_precision == 0.7").iloc[0]
    assert saved["levels"]["slice"]["any"]["0.7"]["threshold"] == pytest.approx(slice_any["threshold"])
    assert saved["levels"]["slice"]["epidural"]["0.7"] is None  # no epidural positives: not reachable
    assert "not reachable" in (out / "thresholds_slice.md").read_text()
    sweep = pd.read_csv(out / "any_sweep.csv")
    assert len(sweep) == 20 and set(sweep["level"]) == {"slice", "study_max"}
    assert len(pd.read_csv(out / "folds.csv")) == 3
    # Held-out figures beside the in-sample ones, and report.md says how each was made.
    point = saved["levels"]["slice"]["any"]["0.7"]
    held = pd.read_csv(out / "heldout_thresholds.csv").query("level == 'slice' and label == 'any' and "
                                                            "target_precision == 0.7").iloc[0]
    assert point["heldout"]["precision"] == pytest.approx(held["precision"])
    assert point["heldout"]["precision_ci"] == pytest.approx([held["precision_lo"], held["precision_hi"]])
    assert held["tp"] + held["fp"] + held["fn"] + held["tn"] == len(preds)
    assert "leave one CNN fold out (2 folds" in saved["heldout_method"]
    assert "How each threshold was chosen" in text and "Where its figures were measured" in text
    assert "precision held-out [95% CI]" in text and "optimistic" in text
    both = pd.read_csv(out / "operating_points.csv")
    assert len(both) == len(pd.read_csv(out / "heldout_thresholds.csv")) == 3 * 6 * 2


def test_thresholds_reproduce_their_table_when_applied(tmp_path):
    meta, preds = _crafted(seed=3)
    frame = preds.merge(
        meta[["ID", "StudyInstanceUID", "SeriesInstanceUID", "slice_index", *LABELS]].rename(
            columns={c: f"true_{c}" for c in LABELS}
        ),
        on="ID",
    )
    y = frame[[f"true_{c}" for c in LABELS]].to_numpy()
    p = frame[list(LABELS)].to_numpy()
    tables = level_tables(y, p, aggregate_studies(frame, p, y), [0.7, 0.8])
    images, studies = apply_thresholds(frame, p, thresholds_to_dict(tables))
    for row in tables[tables["reachable"]].itertuples():
        name = f"{row.label}_p{round(row.target_precision * 100)}"
        got = images[name].sum() if row.level == "slice" else studies[f"{row.level[6:]}_{name}"].sum()
        assert got == row.n_flagged


def test_duplicate_oof_id_names_both_files(tmp_path):
    _, preds = _crafted(n_studies=2, per_study=3)
    preds.to_csv(tmp_path / "fold0_valid.csv", index=False)
    preds.iloc[:1].to_csv(tmp_path / "fold1_valid.csv", index=False)
    with pytest.raises(InputError, match=r"fold0_valid\.csv, fold1_valid\.csv"):
        load_valid_predictions(tmp_path)


def test_unknown_oof_id_is_an_error(tmp_path):
    meta, preds = _crafted(n_studies=3, per_study=4)
    with pytest.raises(InputError, match="not in the metadata"):
        build_report(preds.assign(source="x"), meta.iloc[1:], tmp_path, n_boot=5)


def test_cli_report_then_triage(tmp_path, monkeypatch, capsys):
    meta, preds = _crafted(n_studies=24, per_study=10, seed=4)
    pred_dir = tmp_path / "oof" / "exp"
    pred_dir.mkdir(parents=True)
    for fold in (0, 1):
        preds[preds["fold"] == fold].to_csv(pred_dir / f"fold{fold}_valid.csv", index=False)
    test_meta, test_preds = _crafted(n_studies=4, per_study=10, seed=5)
    test_meta = test_meta.drop(columns=list(LABELS))
    for fold, scale in ((0, 0.6), (1, 1.0)):  # two fold models: the thresholds move to their mean's scale
        test_preds.assign(fold=fold, **{c: test_preds[c] * scale for c in LABELS}).to_csv(
            pred_dir / f"fold{fold}_test.csv", index=False)
    fake = lambda data_dir, split: meta if split == "train" else test_meta  # noqa: E731
    monkeypatch.setattr("src.evaluate.report.load_meta", fake)
    argv = ["--pred", str(pred_dir), "--data", str(tmp_path), "--set", "report.n_boot=500", "--n-boot", "20",
            "--set", "report.precisions=0.9,0.7", "--triage"]
    assert main(argv) == 0
    settings = json.loads((pred_dir / "report" / "report_settings.json").read_text())["report"]
    assert settings["n_boot"] == 20 and settings["precisions"] == [0.9, 0.7]  # flag over --set; the section saved
    images = pd.read_csv(pred_dir / "report" / "triage_images.csv")
    studies = pd.read_csv(pred_dir / "report" / "triage_studies.csv")
    assert len(images) == 40 and len(studies) == 4
    saved = json.loads((pred_dir / "report" / "thresholds.json").read_text())
    point = saved["levels"]["study_max"]["any"]["0.7"]
    assert (studies["max_any_p70"] == (studies["max_any"] >= point["threshold"])).all()
    assert point["threshold"] < point["threshold_oof"] and saved["deployed"]["members"] == [0, 1]
    assert "mean of 2 fold models" in (pred_dir / "report" / "report.md").read_text()
    assert "weighted log loss" in capsys.readouterr().out
    # --triage-only reuses the saved thresholds; the result is the same.
    assert triage(test_preds, test_meta, saved, tmp_path)["n_studies"] == 4
    assert pd.read_csv(tmp_path / "triage_studies.csv").shape[0] == 4
    with pytest.raises(InputError, match="--precisions"):
        main(["--pred", str(pred_dir), "--precisions", "0.7,abc"])


def test_cli_reports_several_directories_side_by_side(tmp_path, monkeypatch):
    """--pred A B: one report each, written by worker processes (forked here, so that they see the faked
    metadata; the CLI spawns them), the same files as one directory at a time; --out takes one directory only."""
    import multiprocessing

    import src.evaluate.report as report

    meta, preds = _crafted(n_studies=16, per_study=8, seed=6)
    dirs = [tmp_path / name for name in ("pred_one", "pred_two", "pred_alone")]
    for d in dirs:
        d.mkdir()
        for fold in (0, 1):
            preds[preds["fold"] == fold].to_csv(d / f"fold{fold}_valid.csv", index=False)
    monkeypatch.setattr(report, "load_meta", lambda data_dir, split: meta)
    monkeypatch.setattr(report, "get_context", lambda method: multiprocessing.get_context("fork"))
    pools = []
    real_pool = report.ProcessPoolExecutor
    monkeypatch.setattr(report, "ProcessPoolExecutor", lambda *a, **k: pools.append(a) or real_pool(*a, **k))
    monkeypatch.setattr(report, "machine_threads", lambda: 2)
    common = ["--data", str(tmp_path), "--n-boot", "20"]
    assert main(["--pred", str(dirs[0]), str(dirs[1]), *common]) == 0
    assert pools == [(2,)]
    monkeypatch.setattr(report, "machine_threads", lambda: 1)
    assert main(["--pred", str(dirs[2]), *common]) == 0 and len(pools) == 1
    for name in ("thresholds.json", "report.md"):
        texts = [(d / "report" / name).read_text().replace(d.name, "X") for d in dirs]
        assert texts[0] == texts[1] == texts[2], name
    with pytest.raises(InputError, match="--out names one report folder"):
        main(["--pred", str(dirs[0]), str(dirs[1]), "--out", str(tmp_path / "r"), *common])
