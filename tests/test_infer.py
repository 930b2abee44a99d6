"""Triage CLI on new studies: reading mixed folders and zips, slice order, fold averaging, flags, volume, outputs."""

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from dicom_factory import make_dicom, tilted_orientation

from src import paths
from src.cnn.checkpoints import save_checkpoint
from src.cnn.model import build_model
from src.config import load_config
from src.constants import LABELS
from src.data.dicom import read_hu
from src.data.windows import to_channels
from src.stack.bundle import save_stackers, stack_model_dir
from src.stack.cv import CVResult
from src.stack.features import assemble_series, neighbour_features, sequence_inputs
from src.stack.gru import GRUStacker
from src.stack.lgbm import LGBMStacker
from src.triage import cli, ensemble, inputs
from src.triage import outputs as triage_outputs
from src.triage import predict as triage_predict

EXP = "t_infer"
SIZE = 64
SPACING_MM = 5.0  # distance between slices along the slice normal
PIXEL_MM = 0.5
TILT = tilted_orientation(15.0)
NORMAL = np.cross(np.asarray(TILT[:3]), np.asarray(TILT[3:]))


def _phantom(rng: np.random.Generator, shape: tuple[int, int], blob: bool) -> np.ndarray:
    """Stored values (intercept -1024): air, a 1000 HU skull ring, 35 HU brain, optionally a 70 HU blob."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r = np.hypot((yy - shape[0] / 2) / (shape[0] * 0.42), (xx - shape[1] / 2) / (shape[1] * 0.42))
    hu = np.where(r < 1.0, 1000.0, -1000.0)
    hu = np.where(r < 0.88, 35.0, hu)
    if blob:
        hu = np.where(np.hypot(yy - shape[0] * 0.35, xx - shape[1] * 0.6) < shape[0] * 0.1, 70.0, hu)
    return np.rint(hu + 1024 + rng.normal(0, 3, shape)).astype(np.int16)


def make_study(folder: Path, n: int = 6, study: str = "ID_studyA", patient: str = "ID_patA",
               seed: int = 0) -> list[str]:
    """n tilted slices 5 mm apart on the normal, written under names in a shuffled order; one slice is 80x64 and
    one RLE-compressed.

    Returns the image IDs in true slice order (increasing position along the normal).
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"ID_{study[-1].lower()}{k:02d}{h}" for k, h in zip(range(n), rng.permutation(n))]
    order = rng.permutation(n)  # file k sits at position order[k]
    for k, name in enumerate(names):
        shape = (80, 64) if k == 1 else (SIZE, SIZE)
        # Gantry tilt: the origin also slides in-plane (along the column direction), so z alone would mis-space.
        origin = NORMAL * SPACING_MM * order[k] + np.asarray(TILT[3:]) * 2.0 * order[k]
        make_dicom(folder / f"{name}.dcm", _phantom(rng, shape, blob=order[k] in (2, 3)), image_id=name,
                   patient=patient, study=study, series=f"{study}_s", position=origin, orientation=TILT,
                   pixel_spacing=(PIXEL_MM, PIXEL_MM), syntax="rle" if k == 2 else "explicit")
    return [names[k] for k in np.argsort(order)]


def save_tiny_checkpoints(calib: list[Path], exp: str = EXP, n_folds: int = 2, arch: str = "multitask") -> list[Path]:
    """Randomly initialised fold checkpoints in the training format (work/models/<exp>/fold<k>/best.pt).

    A random network answers ~the same for every slice; the head is rescaled so that on the `calib` files each
    label's logit has mean 0 and std 2: probabilities then spread over ~0.1-0.9 and flags differ by slice.
    """
    cfg = load_config(None, ["backbone=resnet10t", f"image_size={SIZE}", f"arch={arch}", f"exp={exp}", "context=0",
                             "tta_flip=true"])
    x = torch.from_numpy(np.stack([to_channels(read_hu(f), SIZE) for f in calib])).float() / 255.0
    out = []
    for k in range(n_folds):
        torch.manual_seed(k)
        model = build_model(cfg).eval()
        head = model.head if hasattr(model, "head") else model.net.get_classifier()
        with torch.no_grad():
            logits = model(x, torch.ones(len(x)))["logits"]
            mean, std = logits.mean(0), logits.std(0).clamp_min(1e-6)
            head.weight.mul_((2.0 / std)[:, None])
            head.bias.copy_((head.bias - mean) * 2.0 / std)
        path = paths.WORK / "models" / exp / f"fold{k}" / "best.pt"
        save_checkpoint(path, model, cfg, epoch=1)
        out.append(path)
    return out


def expected_outputs(files: list[Path], ckpts: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Independent of src.triage.cli: probs [n, 6] and volume_mm3 [n], mean over models and the flip view."""
    from src.cnn.checkpoints import load_model

    x = torch.from_numpy(np.stack([to_channels(read_hu(f), SIZE) for f in files])).float() / 255.0
    shapes = [read_hu(f).shape for f in files]
    voxel = torch.tensor([PIXEL_MM**2 * (max(s) / SIZE) ** 2 * SPACING_MM for s in shapes], dtype=torch.float32)
    probs, vol = [], []
    with torch.no_grad():
        for path in ckpts:
            model, _ = load_model(path)
            for view in (x, torch.flip(x, dims=[-1])):
                out = model(view, voxel)
                probs.append(torch.sigmoid(out["logits"]).numpy())
                vol.append(out["mask_volume_mm3"].numpy())
    return np.mean(probs, axis=0), np.mean(vol, axis=0)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("calib")
    make_study(folder)  # the same slices as messy_folder's study (same seed)
    return save_tiny_checkpoints(sorted(folder.glob("*.dcm")))


@pytest.fixture()
def messy_folder(tmp_path) -> tuple[Path, list[str]]:
    folder = tmp_path / "study"
    order = make_study(folder)
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "sub").mkdir()
    make_dicom(folder / "sub" / "ID_trunc.dcm", _phantom(np.random.default_rng(1), (SIZE, SIZE), False),
               study="ID_studyA", series="ID_studyA_s", orientation=TILT, truncate_to=1000)
    make_dicom(folder / "ID_nopos.dcm", _phantom(np.random.default_rng(2), (SIZE, SIZE), False),
               study="ID_studyA", series="ID_studyA_s", with_position=False)
    return folder, order


def test_folder_with_bad_files_orders_slices_and_lists_the_rest(messy_folder):
    folder, order = messy_folder
    slices, images, skipped = inputs.load_study_files([folder], SIZE)
    assert list(slices["ID"]) == order
    assert list(slices["slice_index"]) == list(range(len(order)))
    np.testing.assert_allclose(np.diff(slices["position"]), SPACING_MM, atol=1e-4)
    np.testing.assert_allclose(slices["slice_spacing"], SPACING_MM, atol=1e-4)
    assert images.shape == (len(order), 3, SIZE, SIZE) and images.dtype == np.uint8
    # Row i of images is slice i: compare with a direct read of that slice's file.
    for i in (0, 3):
        np.testing.assert_array_equal(images[i], to_channels(read_hu(slices["path"].iloc[i]), SIZE))
    assert set(slices["rows"]) == {SIZE, 80}
    reasons = dict(zip(skipped["path"].map(lambda p: Path(p).name), skipped["reason"]))
    assert set(reasons) == {"notes.txt", "ID_trunc.dcm", "ID_nopos.dcm"}
    assert "not a readable DICOM" in reasons["notes.txt"]
    assert "pixel data too short" in reasons["ID_trunc.dcm"]
    assert "ImagePositionPatient" in reasons["ID_nopos.dcm"]


def test_zip_input_gives_the_same_slices(messy_folder, tmp_path):
    folder, order = messy_folder
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(folder.parent))
    slices, images, skipped = inputs.load_study_files([archive], SIZE)
    _, ref_images, _ = inputs.load_study_files([folder], SIZE)
    assert list(slices["ID"]) == order
    np.testing.assert_array_equal(images, ref_images)
    assert all(p.startswith(f"{archive}!study/") for p in slices["path"])
    assert len(skipped) == 3 and skipped["path"].str.contains("!study/notes.txt").any()
    # The same file given twice is used once.
    twice, _, dup = inputs.load_study_files([folder, archive], SIZE)
    assert len(twice) == len(order) and dup["reason"].str.contains("duplicate SOPInstanceUID").sum() == len(order)


def test_cli_averages_folds_flags_at_saved_thresholds_and_writes_outputs(messy_folder, ckpts, tmp_path, capsys):
    folder, order = messy_folder
    files = [folder / f"{i}.dcm" for i in order]
    want_p, want_vol = expected_outputs(files, ckpts)
    any_j = LABELS.index("any")
    # Thresholds between the 2nd and 3rd highest p(any): exactly two slices pass, and so does the study.
    ranked = np.sort(want_p[:, any_j])[::-1]
    assert ranked[1] - ranked[2] > 1e-3  # far from float noise between the two code paths
    cut = float((ranked[1] + ranked[2]) / 2)
    report = paths.OOF_DIR / EXP / "report" / "thresholds.json"
    saved = ensemble.default_thresholds(0.8, cut)
    saved["levels"]["study_max"]["epidural"]["0.8"] = None  # unreachable on the OOF data: never flagged
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(saved))
    out = tmp_path / "out"
    try:
        assert cli.main([str(folder), "--exp", EXP, "--out", str(out), "--set", "triage.batch_size=5"]) == 0
    finally:
        report.unlink()
    screen = capsys.readouterr().out
    settings = json.loads((out / "triage_settings.json").read_text())  # the config section, saved with the outputs
    assert settings["triage"]["batch_size"] == 5 and settings["triage"]["threshold_precision"] == 0.8
    assert "ICH SUSPECTED" in screen and "3 files skipped" in screen and str(report) in screen

    slices = pd.read_csv(out / "slices.csv")
    assert list(slices.columns) == [*triage_outputs.SLICE_COLUMNS, "flag_any"]
    assert list(slices["ID"]) == order
    np.testing.assert_allclose(slices[list(LABELS)].to_numpy(), want_p, atol=1e-5)
    np.testing.assert_allclose(slices["blood_volume_mm3"], want_vol, rtol=1e-4)
    assert slices["flag_any"].sum() == 2

    studies = pd.read_csv(out / "studies.csv")
    assert list(studies.columns) == ["StudyInstanceUID", "PatientID", "n_slices", "verdict", *LABELS,
                                     *[f"flag_{n}" for n in LABELS], "blood_volume_ml", "top_slices",
                                     "probabilities_from"]
    assert studies["probabilities_from"].str.contains("no stacker").all()
    row = studies.iloc[0]
    assert row["n_slices"] == len(order) and row["verdict"] == "ICH suspected" and bool(row["flag_any"])
    assert not bool(row["flag_epidural"])
    np.testing.assert_allclose(row[list(LABELS)].to_numpy(float), want_p.max(axis=0), atol=1e-5)
    np.testing.assert_allclose(row["blood_volume_ml"], want_vol.sum() / 1000.0, rtol=1e-4)
    top = np.argsort(-want_p[:, any_j], kind="stable")[:5]
    assert row["top_slices"].split(";") == [order[i] for i in top]

    payload = json.loads((out / "predictions.json").read_text())
    study = payload["studies"][0]
    assert payload["exp"] == EXP and "mean of 2 CNN fold models" in payload["model"]
    assert study["thresholds"]["study_max"]["epidural"] is None
    assert {o["ID"] for o in study["overlays"]} == {order[i] for i in top[:2]}
    for o in study["overlays"]:
        png = out / o["file"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(payload["skipped"]) == 3
    skipped = pd.read_csv(out / "skipped.csv")
    assert list(skipped.columns) == ["path", "reason"] and len(skipped) == 3


def test_default_thresholds_two_studies_and_nothing_usable(tmp_path, ckpts, capsys):
    make_study(tmp_path / "a", n=4, study="ID_studyA", seed=1)
    make_study(tmp_path / "b", n=3, study="ID_studyB", patient="ID_patB", seed=2)
    ens = ensemble.load_ensemble(EXP)
    assert "default p >= 0.5" in ens.thresholds_source
    results, skipped = cli.run([tmp_path / "a", tmp_path / "b"], ens, tmp_path / "out", tta=False)
    assert [r["study"] for r in results] == ["ID_studyA", "ID_studyB"] and len(skipped) == 0
    assert [r["n_slices"] for r in results] == [4, 3]
    for r in results:
        p_any = r["slices"]["any"].to_numpy()
        assert r["flags"]["any"] == bool(p_any.max() >= 0.5)
    assert len(pd.read_csv(tmp_path / "out" / "studies.csv")) == 2
    (tmp_path / "junk.txt").write_text("x")
    assert cli.main([str(tmp_path / "junk.txt"), "--exp", EXP, "--out", str(tmp_path / "o2")]) == 2
    assert "no usable DICOM slices" in capsys.readouterr().out
    with pytest.raises(ensemble.InputError, match="no fold"):
        ensemble.load_ensemble("no_such_exp")


def per_fold_outputs(files: list[Path], ckpts: list[Path]) -> tuple[dict, dict]:
    """Independent of src.triage.cli: fold -> table (keys, position, probs, volume) and fold -> float16 embeddings."""
    from src.cnn.checkpoints import load_model

    x = torch.from_numpy(np.stack([to_channels(read_hu(f), SIZE) for f in files])).float() / 255.0
    voxel = torch.tensor([PIXEL_MM**2 * (max(read_hu(f).shape) / SIZE) ** 2 * SPACING_MM for f in files])
    tables, embs = {}, {}
    with torch.no_grad():
        for k, path in enumerate(ckpts):
            model, _ = load_model(path)
            outs = [model(view, voxel) for view in (x, torch.flip(x, dims=[-1]))]
            table = pd.DataFrame({"ID": [f.stem for f in files], "PatientID": "ID_patA",
                                  "StudyInstanceUID": "ID_studyA", "SeriesInstanceUID": "ID_studyA_s",
                                  "position": SPACING_MM * np.arange(len(files))})
            probs = np.mean([torch.sigmoid(o["logits"]).numpy() for o in outs], axis=0)
            for j, name in enumerate(LABELS):
                table[name] = probs[:, j]
            table["blood_volume_mm3"] = np.mean([o["mask_volume_mm3"].numpy() for o in outs], axis=0)
            tables[k] = table
            embs[k] = np.mean([o["embedding"].numpy() for o in outs], axis=0).astype(np.float16)
    return tables, embs


def fit_tiny_stackers(exp: str, tables: dict, embs: dict, with_gru: bool = True) -> None:
    """Two 'CV' models per stacker fit on the study's own slices with made-up labels (bleeding = slices 2, 3)."""
    rng = np.random.default_rng(0)
    parts = []
    for copy in range(6):  # six fake patients, so the stackers' grouped early-stopping split has groups
        t = tables[0].assign(PatientID=f"P{copy}", SeriesInstanceUID=f"S{copy}", ID=tables[0]["ID"] + f"_{copy}")
        t[list(LABELS)] = np.clip(t[list(LABELS)].to_numpy() + rng.normal(0, 0.05, (len(t), 6)), 0.01, 0.99)
        parts.append(t)
    table = assemble_series(pd.concat(parts, ignore_index=True))
    y = np.zeros((len(table), 6))
    y[table["slice_pos"].isin([2, 3]).to_numpy()] = 1.0
    feats, groups = neighbour_features(table, 1), table["PatientID"].to_numpy()
    emb = np.tile(embs[0][np.argsort(tables[0]["position"].to_numpy())], (6, 1))
    X = sequence_inputs(table)
    halves = [table["PatientID"].isin(["P0", "P1", "P2", "P3"]).to_numpy(), table["PatientID"].ne("P0").to_numpy()]
    lgbm = [LGBMStacker(n_estimators=20, min_child_samples=2, early_stopping_rounds=5, n_jobs=1).fit(
        feats[r], y[r], groups[r]) for r in halves]
    results = {"lgbm": CVResult(y, None, models=lgbm)}
    if with_gru:
        gru = [GRUStacker(epochs=2, hidden_size=8, proj_size=8, random_state=i).fit(
            X[r], y[r], table["series_id"].to_numpy()[r], groups[r], emb=emb[r]) for i, r in enumerate(halves)]
        results["gru"] = CVResult(y, None, models=gru)
    save_stackers(exp, results, {"exp": exp, "cv_mode": "same_folds", "n_models": 2, "k": 1, "seed": 0,
                                 "cnn_folds": [0, 1], "folds_available": [0, 1], "with_volume": True,
                                 "lgbm_features": list(feats.columns), "emb_dim": int(emb.shape[1]),
                                 "gru_n_features": int(X.shape[1])})


def test_saved_stacker_runs_after_the_fold_models_with_its_thresholds(ckpts, tmp_path, capsys):
    exp = "t_infer_stack"
    mine = []
    for k, path in enumerate(ckpts):
        mine.append(paths.WORK / "models" / exp / f"fold{k}" / "best.pt")
        mine[-1].parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, mine[-1])
    folder = tmp_path / "study"
    order = make_study(folder)
    files = [folder / f"{i}.dcm" for i in order]
    tables, embs = per_fold_outputs(files, mine)
    fit_tiny_stackers(exp, tables, embs)
    bundle = ensemble.load_stackers(exp)
    want = bundle.predict(tables, embs)
    cnn = np.mean([t[list(LABELS)].to_numpy() for t in tables.values()], axis=0)
    assert np.abs(want["blend"] - cnn).max() > 1e-2  # the stacker moves the numbers: the check below can fail
    stack_thr = paths.OOF_DIR / f"{exp}_stack_gru" / "report" / "thresholds.json"
    stack_thr.parent.mkdir(parents=True, exist_ok=True)
    stack_thr.write_text(json.dumps(ensemble.default_thresholds(0.8, 0.3)))

    for kind in ("blend", "gru"):
        out = tmp_path / f"out_{kind}"
        assert cli.main([str(folder), "--exp", exp, "--out", str(out), "--stacker", kind]) == 0
        slices = pd.read_csv(out / "slices.csv")
        assert list(slices["ID"]) == order
        np.testing.assert_allclose(slices[list(LABELS)], want[kind], atol=1e-5, err_msg=kind)
        source = pd.read_csv(out / "studies.csv")["probabilities_from"].iloc[0]
        payload = json.loads((out / "predictions.json").read_text())
        assert payload["probabilities_from"] == source and source in capsys.readouterr().out
        assert source.startswith(f"{kind} stacker") and "CNN folds 0,1" in source
        # The GRU has its own thresholds.json; the blend has none, nor has the CNN: the documented default.
        assert ("gru stacker's" in payload["thresholds_source"]) == (kind == "gru")
        assert ("default p >= 0.5" in payload["thresholds_source"]) == (kind == "blend")
    ens = ensemble.load_ensemble(exp)
    assert ens.stacker_kind == "blend" and ens.stacker_folds() == [0, 1]
    off = ensemble.load_ensemble(exp, stacker="none")
    assert off.stacker is None and "no stacker (turned off" in off.source()
    slices, images, _ = inputs.load_study_files([folder], SIZE)
    np.testing.assert_allclose(triage_predict.run_models(off, slices, images)["probs"], cnn, atol=1e-5)

    fit_tiny_stackers(exp, tables, embs, with_gru=False)  # LightGBM only: the default falls back, a request fails
    ens = ensemble.load_ensemble(exp)
    assert ens.stacker_kind == "lgbm" and "blend not saved" in ens.stacker_note
    with pytest.raises(ensemble.InputError, match="--stacker gru: gru not saved"):
        ensemble.load_ensemble(exp, stacker="gru")
    shutil.rmtree(stack_model_dir(exp))
    assert ensemble.load_ensemble(exp).stacker is None
    with pytest.raises(ensemble.InputError, match="none saved"):
        ensemble.load_ensemble(exp, stacker="blend")
