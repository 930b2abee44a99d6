"""BloodNet: volume arithmetic, masked segmentation, the frozen head step, volume error, ablation table, overlays."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from src.cnn import ablation, checkpoints, overlays
from src.cnn.checkpoints import save_checkpoint
from src.cnn.loop import make_optimizer
from src.cnn.losses import masked_seg_loss
from src.cnn.model import VOLUME_SCALE_MM3, build_model
from src.cnn.study_volumes import slab_total_mm3 as volumes_total
from src.config import load_config
from src.constants import LABELS, VOLUME_COL
from src.data.dataset import SliceDataset, voxel_volume_mm3
from src.errors import InputError
from src.evaluate import volumes
from src.metric import weighted_log_loss

S = 32


def _cfg(*sets: str):
    return load_config(None, ["backbone=resnet10t", "arch=bloodnet", "drop_rate=0", "context=0", *sets])


def _meta(n: int, any_labels: list[int], mask_rows: list[int], rows: int = 512, cols: int = 400) -> pd.DataFrame:
    frame = pd.DataFrame({
        "ID": [f"ID_{i:09x}" for i in range(n)], "PatientID": "ID_p", "StudyInstanceUID": "ID_s",
        "SeriesInstanceUID": "ID_r", "slice_index": np.arange(n), "cache_row": np.arange(n), "mask_row": mask_rows,
        "rows": rows, "cols": cols, "pixel_spacing_row": 0.45, "pixel_spacing_col": 0.5, "slice_spacing": 5.0,
    })
    for name in LABELS:
        frame[name] = any_labels
    return frame


def test_voxel_volume_of_padded_non_square_image_matches_hand_calculation():
    # 512 x 400 native pixels are padded to 512 x 512, then resized to 128: one cached pixel = 4 x 4 native pixels.
    meta = _meta(1, [0], [-1])
    voxel = float(voxel_volume_mm3(meta, 128)[0])
    assert math.isclose(voxel, 0.45 * 0.5 * 16 * 5.0, rel_tol=1e-6)  # 18 mm³
    # A 40 x 40 native-pixel bleed (1800 mm³) is a 10 x 10 cached-pixel bleed: the same volume either way.
    assert math.isclose(40 * 40 * 0.45 * 0.5 * 5.0, 100 * voxel, rel_tol=1e-6)


def test_model_volume_is_probability_sum_times_voxel_and_feeds_the_head():
    torch.manual_seed(0)
    model = build_model(_cfg()).eval()
    with torch.no_grad():
        model.seg_head.weight.zero_()
        model.seg_head.bias.fill_(0.0)  # every pixel p = 0.5
        model.head.weight.zero_()
        # The head reads [embedding, volume feature, pooled map (map_evidence_r > 0)]: logits = the volume alone.
        model.head.weight[:, model.head.in_features - (2 if model.map_evidence_r else 1)] = 1.0
        model.head.bias.zero_()
        if model.any_head is not None:  # any_from_map: `any` reads [volume feature, pooled map] alone
            model.any_head.weight.zero_()
            model.any_head.weight[0, 0] = 1.0
            model.any_head.bias.zero_()
        voxel = torch.tensor([18.0, 2.0])
        out = model(torch.rand(2, 3, S, S), voxel)
    expected = 0.5 * S * S * voxel  # 9216 and 1024 mm³
    assert torch.allclose(out["volume_mm3"], expected, rtol=1e-5)
    feature = torch.log1p(expected / VOLUME_SCALE_MM3)
    assert torch.allclose(out["logits"], feature[:, None].expand(2, len(LABELS)), rtol=1e-5)
    with torch.no_grad():
        model.seg_head.bias.fill_(-30.0)  # no blood anywhere: zero volume
        assert float(model(torch.rand(1, 3, S, S), torch.tensor([18.0]))["volume_mm3"]) < 1e-6


def test_reported_volume_counts_confident_pixels_only():
    """A faint background (p = 0.03 everywhere) adds to the soft feature but not to the reported mask volume."""
    model = build_model(_cfg()).eval()
    with torch.no_grad():
        model.seg_head.weight.zero_()
        model.seg_head.bias.fill_(math.log(0.03 / 0.97))
        out = model(torch.rand(1, 3, S, S), torch.tensor([18.0]))
        assert math.isclose(float(out["volume_mm3"]), 0.03 * S * S * 18.0, rel_tol=1e-4)
        assert float(out["mask_volume_mm3"]) == 0.0
        model.seg_head.bias.fill_(3.0)  # confident everywhere: every pixel counts, S * S voxels of 18 mm³
        assert float(model(torch.rand(1, 3, S, S), torch.tensor([18.0]))["mask_volume_mm3"]) == S * S * 18.0


def test_positive_slice_without_mask_is_unknown_and_left_out_of_seg_loss():
    meta = _meta(3, [1, 0, 1], [0, -1, -1])  # painted positive, negative, positive without a mask
    images = np.random.default_rng(0).integers(0, 255, (3, 3, S, S), dtype=np.uint8)
    masks = np.zeros((1, S, S), np.uint8)
    masks[0, 4:12, 4:12] = 1
    ds = SliceDataset(meta, images, masks=masks)
    assert ds.mask_state.tolist() == [1, 0, -1]
    batch = {k: torch.stack([ds[i][k] for i in range(3)]) for k in ("mask", "mask_state")}
    assert int(batch["mask"][0].sum()) == 64 and int(batch["mask"][2].sum()) == 0
    logits = torch.randn(3, 1, S, S)
    base = masked_seg_loss(logits, batch["mask"], batch["mask_state"])
    assert torch.isclose(base, masked_seg_loss(logits[:2], batch["mask"][:2], batch["mask_state"][:2]))
    logits[2] = 40.0  # "blood everywhere" on the unknown slice must cost nothing
    assert torch.isclose(base, masked_seg_loss(logits, batch["mask"], batch["mask_state"]))


def _head_step(model, cfg, head_only_phase: bool, steps: int = 2) -> None:
    """The real training code (src.cnn.loop.train_one_epoch) for `steps` batches of BloodNet's step 2: an optimizer
    over the head only, the phase that puts the model in eval mode (head_only=True) or, as a control, one that
    leaves it in train mode."""
    from torch.utils.data import DataLoader

    from src.cnn.loop import Runtime, train_one_epoch
    from src.cnn.schedule import Phase

    rng = np.random.default_rng(0)
    n = 4 * steps
    meta = _meta(n, rng.integers(0, 2, n).tolist(), [-1] * n)
    images = rng.integers(0, 255, (n, 3, S, S), dtype=np.uint8)
    loader = DataLoader(SliceDataset(meta, images), batch_size=4, shuffle=False)
    optimizer = make_optimizer(cfg, model, head_only=True)
    phase = Phase("head", 1, 0.0, head_only=head_only_phase)
    rt = Runtime(0, 1, torch.device("cpu"), None, False)
    train_one_epoch(model, loader, optimizer, torch.amp.GradScaler("cuda", enabled=False), phase, 0, cfg, rt,
                    torch.tensor(cfg.class_weights), "head")


def test_head_phase_changes_only_the_head():
    torch.manual_seed(0)
    cfg = _cfg("lr=1e-2")
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _head_step(model, cfg, head_only_phase=True)
    after = model.state_dict()
    heads = ("head", "any_head") if model.any_head is not None else ("head",)
    head = {f"{name}.{p}" for name in heads for p in ("weight", "bias")}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == head, f"non-head tensors changed: {sorted(changed - head)[:5]}"
    assert any("running_mean" in k for k in before)  # the check above covered BatchNorm statistics
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.split(".")[0] not in heads)
    # Control: in train mode the frozen encoder's BatchNorm statistics would drift, so the check above can fail.
    torch.manual_seed(0)
    drifting = build_model(cfg)
    _head_step(drifting, cfg, head_only_phase=False, steps=1)
    assert not torch.equal(drifting.state_dict()["encoder.bn1.running_mean"],
                           before["encoder.bn1.running_mean"])


def test_load_model_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = _cfg("context=1", "pretrained_path=/nowhere/gone.pth")  # the file is never read back
    model = build_model(load_config(None, ["backbone=resnet10t", "arch=bloodnet", "drop_rate=0", "context=1"]))
    save_checkpoint(tmp_path / "best.pt", model, cfg, epoch=3)
    loaded, loaded_cfg = checkpoints.load_model(tmp_path / "best.pt")
    assert loaded_cfg == cfg and not loaded.training
    x, voxel = torch.rand(2, 9, S, S), torch.tensor([1.0, 3.0])
    with torch.no_grad():
        a, b = model.eval()(x, voxel), loaded(x, voxel)
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["volume_mm3"], b["volume_mm3"])
    with pytest.raises(InputError, match="checkpoint not found"):
        checkpoints.load_model(tmp_path / "missing.pt")


def _volume_inputs():
    # Studies A, B, C positive (true 1000, 2000, 500 mm³), D negative; predictions 1100, 1000, 500, 30 mm³.
    ids = [f"ID_{i}" for i in range(8)]
    studies = ["A", "A", "B", "B", "C", "C", "D", "D"]
    true = pd.DataFrame({"ID": ids, "StudyInstanceUID": studies,
                         VOLUME_COL: [600.0, 400.0, 2000.0, 0.0, 250.0, 250.0, 0.0, 0.0]})
    pred = pd.DataFrame({"ID": ids, VOLUME_COL: [1000.0, 100.0, 700.0, 300.0, 500.0, 0.0, 10.0, 20.0]})
    meta = pd.DataFrame({"ID": ids, "StudyInstanceUID": studies, "any": [1, 1, 1, 0, 1, 1, 0, 0],
                         "PatientID": studies, "SeriesInstanceUID": studies, "position": [0.0, 5.0] * 4})
    return pred, meta, true


def test_study_volumes_and_mdape_over_positive_studies(tmp_path):
    pred, meta, true = _volume_inputs()
    table = volumes.study_volumes(pred, meta, true).set_index("StudyInstanceUID")
    assert table["pred_volume_mm3"].tolist() == [1100.0, 1000.0, 500.0, 30.0]
    assert table["true_volume_ml"].tolist() == [1.0, 2.0, 0.5, 0.0]
    assert table["n_positive_slices"].tolist() == [2, 1, 2, 0]
    assert np.allclose(table["abs_pct_error"].iloc[:3], [10.0, 50.0, 0.0]) and np.isnan(table.loc["D", "abs_pct_error"])
    summary = volumes.volume_summary(table.reset_index())
    assert summary["mdape_percent"] == pytest.approx(10.0)  # median of 10, 50, 0; the negative study is left out
    assert summary["n_positive_studies"] == 3 and summary["median_pred_ml_negative_studies"] == pytest.approx(0.03)
    png = volumes.plot_volume_scatter(table.reset_index(), tmp_path / "scatter.png")
    assert png.stat().st_size > 5000
    no_truth = volumes.study_volumes(pred, meta)
    assert "mdape_percent" not in volumes.volume_summary(no_truth)
    with pytest.raises(InputError, match="not in the train metadata"):
        volumes.study_volumes(pred, meta.iloc[:-1])


def test_read_volume_predictions_needs_the_volume_column(tmp_path):
    pred, _, _ = _volume_inputs()
    pred.iloc[:4].to_csv(tmp_path / "fold0_valid.csv", index=False)
    pred.iloc[4:].to_csv(tmp_path / "fold1_valid.csv", index=False)
    assert len(volumes.read_volume_predictions(tmp_path)) == 8
    pred.drop(columns=VOLUME_COL).to_csv(tmp_path / "fold1_valid.csv", index=False)
    with pytest.raises(InputError, match="no blood_volume_mm3 column"):
        volumes.read_volume_predictions(tmp_path)


def _ablation_inputs(n_studies: int = 12, per_study: int = 10):
    rng = np.random.default_rng(0)
    n = n_studies * per_study
    labels = pd.DataFrame({"ID": [f"ID_{i:04d}" for i in range(n)],
                           "StudyInstanceUID": np.repeat([f"S{s}" for s in range(n_studies)], per_study)})
    y = (rng.random((n, len(LABELS))) < 0.3).astype(int)
    y[:, -1] = y[:, :-1].max(axis=1)
    labels[list(LABELS)] = y
    perfect = 0.1 + 0.8 * y
    noisy = np.clip(0.5 * y + rng.random(y.shape) * 0.6, 0.01, 0.99)
    preds = {}
    for name, p in (("classifier", noisy), ("multitask", np.full(y.shape, 0.3)), ("bloodnet", perfect)):
        frame = pd.DataFrame(p, columns=list(LABELS))
        frame.insert(0, "ID", labels["ID"])
        preds[name] = frame.sample(frac=1.0, random_state=1)  # rows in another order: joined on ID
    return preds, labels, y, noisy


def test_ablation_table_and_markdown():
    preds, labels, y, noisy = _ablation_inputs()
    table = ablation.ablation_table(preds, labels, n_boot=200).set_index("variant")
    assert table.loc["bloodnet", "auc_any"] == 1.0 and table.loc["bloodnet", "ci_low"] == 1.0
    assert table.loc["multitask", "auc_any"] == 0.5
    expected = roc_auc_score(y[:, -1], noisy[:, -1])
    row = table.loc["classifier"]
    assert row["auc_any"] == pytest.approx(expected) and row["ci_low"] < expected < row["ci_high"]
    assert row["weighted_log_loss"] == pytest.approx(weighted_log_loss(y, noisy))
    assert row["n_studies"] == 12 and row["n_slices"] == 120 and row["n_boot_valid"] == 200
    md = ablation.ablation_markdown(table.reset_index(), "caption here")
    assert f"| Single task, classification (`classifier`) | {expected:.4f} |" in md and md.endswith("caption here\n")
    assert sum(line.startswith("| ") for line in md.splitlines()) == 4 and "epochs run" not in md  # header + 3 variants
    table["epochs_run"] = [6, 6, 5]
    assert md.splitlines()[2] + " 6 |" == ablation.ablation_markdown(table.reset_index(), "c").splitlines()[2]
    with pytest.raises(InputError, match="predicts other images"):
        ablation.ablation_table({**preds, "multitask": preds["multitask"].iloc[1:]}, labels, n_boot=10)


def test_ablation_configs_share_an_epoch_budget():
    variants = ablation.ablation_configs(_cfg("seg_epochs=2", "head_epochs=1", "joint_epochs=4", "context=2"))
    assert list(variants) == ["classifier", "multitask", "bloodnet", "bloodnet_nomask"]
    assert [v.arch for v in variants.values()] == ["classifier", "multitask", "bloodnet", "bloodnet"]
    assert [v.masks for v in variants.values()] == ["auto", "auto", "auto", "none"]
    nomask, bloodnet = variants["bloodnet_nomask"].exp_name, variants["bloodnet"].exp_name
    assert nomask.startswith(f"bloodnet-resnet10t-{load_config().image_size}px-c2-") and nomask != bloodnet
    assert variants["classifier"].epochs == 7 and len({v.exp_name for v in variants.values()}) == 4
    assert all(v.context == 2 and v.backbone == "resnet10t" for v in variants.values())


def test_ablation_volume_columns():
    """Variants that predict a volume get its median abs % error and Spearman over positive studies; others get NaN,
    drawn as a dash."""
    pred, meta, true = _volume_inputs()
    labels = meta.copy()
    for name in LABELS:
        labels[name] = labels["any"]
    probs = pd.DataFrame({"ID": pred["ID"], **{name: 0.2 + 0.6 * labels[name] for name in LABELS}})
    preds = {"classifier": probs, "bloodnet": probs.assign(**{VOLUME_COL: pred[VOLUME_COL]})}
    table = ablation.ablation_table(preds, labels, n_boot=20, true_volumes=true).set_index("variant")
    assert np.isnan(table.loc["classifier", "volume_mdape_percent"])
    assert table.loc["bloodnet", "volume_mdape_percent"] == pytest.approx(10.0)  # as in the study volume test
    assert table.loc["bloodnet", "volume_spearman"] == pytest.approx(0.5)  # ranks (3, 2, 1) vs (2, 3, 1): 1 - 6·2/(3·8)
    md = ablation.ablation_markdown(table.reset_index(), "c")
    assert "| – | – |" in md and "| 10% | 0.50 |" in md


def test_pick_studies_and_overlay_png(tmp_path):
    meta = _meta(6, [1, 1, 0, 0, 1, 0], [0, 1, -1, -1, -1, -1])
    meta["StudyInstanceUID"] = ["P1", "P1", "N1", "N2", "P2", "P2"]
    oof = pd.DataFrame({"ID": meta["ID"], "any": [0.9, 0.8, 0.2, 0.6, 0.7, 0.1]})
    picks = overlays.pick_studies(meta, 1, oof)
    assert picks[0][0] == "P1" and picks[1][0] == "N2" and "0.600" in picks[1][1]
    assert [s for s, _ in overlays.pick_studies(meta, 5)] == ["P1", "P2", "N1"]
    rows = meta[meta["StudyInstanceUID"] == "P1"].reset_index(drop=True)
    images = np.random.default_rng(0).integers(0, 255, (6, 3, S, S), dtype=np.uint8)
    masks = np.zeros((2, S, S), np.uint8)
    masks[:, 8:16, 8:16] = 1
    torch.manual_seed(0)
    cfg = _cfg()
    pred = overlays.predict_study(build_model(cfg).eval(), cfg, rows, images, masks, torch.device("cpu"))
    assert pred["seg"].shape == (2, S, S) and pred["mask_state"].tolist() == [1, 1]
    png = overlays.plot_study_overlay(rows, pred, images, masks, 2, 0, "P1", tmp_path / "o.png")
    assert png.stat().st_size > 5000


def test_volumes_cli_writes_table_summary_and_plot(tmp_path, monkeypatch):
    import json

    import src.data.metadata

    pred, meta, true = _volume_inputs()
    exp, data = tmp_path / "oof" / "exp", tmp_path / "data"
    exp.mkdir(parents=True)
    data.mkdir()
    pred.to_csv(exp / "fold0_valid.csv", index=False)
    true.to_csv(data / "true_volumes.csv", index=False)
    monkeypatch.setattr(src.data.metadata, "load_metadata", lambda data_dir, split: meta)
    assert volumes.main(["--pred", str(exp), "--data", str(data)]) == 0
    summary = json.loads((exp / "bloodnet" / "volume_summary.json").read_text())
    assert summary["mdape_percent"] == pytest.approx(10.0) and summary["n_studies"] == 4
    assert len(pd.read_csv(exp / "bloodnet" / "study_volumes.csv")) == 4
    assert (exp / "bloodnet" / "volume_scatter.png").stat().st_size > 5000
    # One fold's file: its own names beside the experiment's, which it must not overwrite (triage reads those).
    (exp / "fold0_valid.csv").rename(exp / "fold3_valid.csv")
    pred.iloc[:4].to_csv(exp / "fold3_valid.csv", index=False)
    assert volumes.main(["--pred", str(exp / "fold3_valid.csv"), "--data", str(data)]) == 0
    assert json.loads((exp / "bloodnet" / "volume_summary_fold3_valid.json").read_text())["n_studies"] == 2
    assert len(pd.read_csv(exp / "bloodnet" / "study_volumes_fold3_valid.csv")) == 2
    assert (exp / "bloodnet" / "volume_scatter_fold3_valid.png").exists()
    assert json.loads((exp / "bloodnet" / "volume_summary.json").read_text())["n_studies"] == 4
    with pytest.raises(InputError, match="not found"):
        volumes.main(["--pred", str(tmp_path / "nope"), "--data", str(data)])


def test_two_images_at_one_position_count_their_volume_once():
    """Study A gets a third image at position 5.0 (a re-scan of slice 2): its slab is counted once, as the mean."""
    pred, meta, true = _volume_inputs()
    extra = pd.DataFrame({"ID": ["ID_8"], VOLUME_COL: [300.0]})
    pred2 = pd.concat([pred, extra], ignore_index=True)
    true2 = pd.concat([true, pd.DataFrame({"ID": ["ID_8"], "StudyInstanceUID": ["A"], VOLUME_COL: [400.0]})])
    meta2 = pd.concat([meta, pd.DataFrame({"ID": ["ID_8"], "StudyInstanceUID": ["A"], "any": [1], "PatientID": ["A"],
                                           "SeriesInstanceUID": ["A"], "position": [5.0 + 1e-4]})], ignore_index=True)
    row = volumes.study_volumes(pred2, meta2, true2).set_index("StudyInstanceUID").loc["A"]
    assert row["n_slices"] == 3 and row["n_positive_slices"] == 3
    assert row["pred_volume_mm3"] == pytest.approx(1000.0 + (100.0 + 300.0) / 2)  # not 1400
    assert row["true_volume_mm3"] == pytest.approx(1000.0)  # 600 + mean(400, 400), not 1400
    meta2.loc[meta2["ID"] == "ID_8", "position"] = 10.0  # a real third slice: counted in full
    assert volumes.study_volumes(pred2, meta2, true2).set_index("StudyInstanceUID").loc["A", "pred_volume_mm3"] == 1400


def test_slab_total_counts_a_repeated_position_once():
    """What triage reports per study: slices 0 and 1 share a position (their mean counts), slice 2 is its own slab."""
    meta = pd.DataFrame({"PatientID": "P", "StudyInstanceUID": "S", "SeriesInstanceUID": "R",
                         "position": [10.0, 10.0, 15.0]})
    assert volumes_total(np.array([100.0, 300.0, 50.0]), meta) == pytest.approx(250.0)
    meta["position"] = [5.0, 10.0, 15.0]
    assert volumes_total(np.array([100.0, 300.0, 50.0]), meta) == pytest.approx(450.0)


def test_slice_dice_and_fold_dice_on_painted_slices():
    seg = np.zeros((3, 4, 4))
    truth = np.zeros((3, 4, 4), np.uint8)
    seg[0, :2, :2], truth[0, :2, :] = 0.9, 255  # 4 predicted, 8 true, 4 shared: 2·4 / 12
    truth[1, 0, 0] = 255  # a painted pixel missed entirely: 0
    assert np.allclose(overlays.slice_dice(seg, truth), [8 / 12, 0.0, 1.0])  # both empty: perfect
    # fold_dice: every painted slice of the fold, predicted with its whole study (neighbours are real neighbours).
    meta = _meta(4, [1, 1, 0, 1], [0, -1, -1, 1])
    images = np.random.default_rng(0).integers(0, 255, (4, 3, S, S), dtype=np.uint8)
    masks = np.zeros((2, S, S), np.uint8)
    masks[:, :8, :] = 1  # a quarter of each slice
    cfg = _cfg("context=1")
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.seg_head.weight.zero_()
        model.seg_head.bias.fill_(30.0)  # blood everywhere: Dice = 2·(S²/4) / (S² + S²/4) = 0.4
    dice = overlays.fold_dice(model, cfg, meta, images, masks, torch.device("cpu"))
    assert dice["n_slices"] == 2 and dice["mean_dice"] == pytest.approx(0.4)
    assert overlays.fold_dice(model, cfg, meta, images, None, torch.device("cpu"))["n_slices"] == 0


def test_volume_intervals_bracket_the_figures_and_collapse_when_exact():
    rng = np.random.default_rng(3)
    true = rng.uniform(500.0, 50_000.0, 12)
    noisy = true * rng.uniform(0.5, 1.6, 12)
    table = pd.DataFrame({"true_volume_mm3": [*true, 0.0], "pred_volume_mm3": [*noisy, 900.0]})
    table["pred_volume_ml"] = table["pred_volume_mm3"] / 1000.0
    table["abs_pct_error"] = (100 * (table["pred_volume_mm3"] - table["true_volume_mm3"]).abs()
                              / table["true_volume_mm3"].where(table["true_volume_mm3"] > 0))
    summary = volumes.volume_summary(table)
    lo, hi = summary["mdape_ci95"]
    assert lo <= summary["mdape_percent"] <= hi and hi - lo > 1.0  # 12 noisy studies: a real width
    lo, hi = summary["spearman_ci95"]
    assert -1.0 <= lo <= summary["spearman_positive"] <= hi <= 1.0
    assert summary == volumes.volume_summary(table)  # seeded: the same intervals every time
    exact = table.assign(pred_volume_mm3=table["true_volume_mm3"], abs_pct_error=table["abs_pct_error"] * 0)
    summary = volumes.volume_summary(exact)
    assert summary["mdape_ci95"] == [0.0, 0.0] and summary["spearman_ci95"] == pytest.approx([1.0, 1.0])
    assert "mdape_ci95" not in volumes.volume_summary(table.iloc[[0, 1, 12]])  # two positive studies: no interval


def test_volume_error_by_size_splits_at_the_median_true_volume():
    """Small bleeds read at half their size and large ones exactly: the halves say so, the pooled median cannot."""
    true = np.array([1000.0, 2000.0, 3000.0, 10000.0, 20000.0, 30000.0])
    pred = np.where(true < 5000, true / 2, true)
    table = pd.DataFrame({"true_volume_mm3": [*true, 0.0], "pred_volume_mm3": [*pred, 50.0]})
    table["pred_volume_ml"] = table["pred_volume_mm3"] / 1000.0
    table["abs_pct_error"] = 100 * (table["pred_volume_mm3"] / table["true_volume_mm3"] - 1).abs()
    by_size = volumes.volume_summary(table, n_boot=0)["by_size"]
    assert by_size["small"] == {"n_studies": 3, "mdape_percent": pytest.approx(50.0), "median_ratio": 0.5,
                                "median_true_ml": 2.0}
    assert by_size["large"] == {"n_studies": 3, "mdape_percent": 0.0, "median_ratio": 1.0, "median_true_ml": 20.0}
    assert "by_size" not in volumes.volume_summary(table.iloc[[0, 1, 2, 6]], n_boot=0)  # three positive studies


def test_volume_error_by_hemorrhage_type():
    """Per type, over the positive studies that have it (B has two types and counts in both): A 10%, B 50%, C 0%."""
    pred, meta, true = _volume_inputs()
    meta = meta.assign(subdural=[1, 0, 1, 0, 0, 0, 0, 0], subarachnoid=[0, 0, 0, 1, 1, 0, 0, 0], epidural=0)
    table = volumes.study_volumes(pred, meta, true).set_index("StudyInstanceUID")
    assert table["subdural"].tolist() == [1, 1, 0, 0] and table["subarachnoid"].tolist() == [0, 1, 1, 0]
    by_type = volumes.volume_summary(table.reset_index(), n_boot=0)["by_type"]
    assert set(by_type) == {"subdural", "subarachnoid"}  # no study has an epidural bleed
    assert by_type["subdural"] == {"n_studies": 2, "mdape_percent": pytest.approx(30.0), "median_true_ml": 1.5}
    assert by_type["subarachnoid"]["mdape_percent"] == pytest.approx(25.0)
    assert by_type["subarachnoid"]["median_true_ml"] == pytest.approx(1.25)
    assert "by_type" not in volumes.volume_summary(volumes.study_volumes(pred, meta.drop(
        columns=["subdural", "subarachnoid", "epidural"]), true), n_boot=0)
