"""Submission round trip (fold mean, sample order, clip, prior fill for missing images) and the validator."""

import numpy as np
import pandas as pd
import pytest

from src.constants import LABELS
from src.errors import InputError, run_cli
from src.evaluate.submit import (
    PUBLISHED_PRIOR,
    build_submission,
    check_submission,
    load_test_predictions,
    main,
    make_submission,
    training_prior,
)

IMAGES = ["ID_00000000c", "ID_00000000a", "ID_00000000b"]  # deliberately not sorted: the sample's order rules


def _sample() -> pd.DataFrame:
    return pd.DataFrame({"ID": [f"{i}_{c}" for i in IMAGES for c in LABELS], "Label": 0.5})


def _write_data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _sample().to_csv(data / "stage_2_sample_submission.csv", index=False)
    # Training labels (one duplicated row, as in Kaggle's file): means 1/4 for `any` and subdural, 0 elsewhere.
    train = [(f"ID_t{k}_{c}", int(k == 0 and c in ("subdural", "any"))) for k in range(4) for c in LABELS]
    pd.DataFrame(train + train[:1], columns=["ID", "Label"]).to_csv(data / "stage_2_train.csv", index=False)
    return data


def _write_preds(tmp_path):
    pred = tmp_path / "oof" / "exp"
    pred.mkdir(parents=True)
    a = pd.DataFrame(
        {"ID": ["ID_00000000a", "ID_00000000b", "ID_extra0000"], "fold": 0, **{c: [0.2, 0.0, 0.5] for c in LABELS}}
    )
    b = pd.DataFrame({"ID": ["ID_00000000b", "ID_00000000a"], "fold": 1, **{c: [0.0, 0.4] for c in LABELS}})
    b["any"] = [1.0, 0.4]
    a.to_csv(pred / "fold0_test.csv", index=False)
    b.to_csv(pred / "fold1_test.csv", index=False)
    (pred / "fold0_valid.csv").write_text("ignored by submit\n")
    return pred


def test_round_trip_with_missing_image_filled_by_prior(tmp_path, capsys):
    data, pred = _write_data(tmp_path), _write_preds(tmp_path)
    out, missing = make_submission(pred, data, "exp", clip=1e-5, out_dir=tmp_path / "subs")
    sub = pd.read_csv(out)
    assert list(sub["ID"]) == list(_sample()["ID"])  # sample order, every ID once
    values = sub.set_index("ID")["Label"]
    assert values["ID_00000000a_epidural"] == pytest.approx(0.3)  # mean of 0.2 and 0.4
    assert values["ID_00000000b_epidural"] == pytest.approx(1e-5)  # 0 clipped up
    assert values["ID_00000000b_any"] == pytest.approx(0.5)  # mean of 0.0 and 1.0
    # The image without a prediction gets the training prior (label means of stage_2_train.csv, duplicates dropped).
    assert missing == ["ID_00000000c"]
    assert values["ID_00000000c_any"] == pytest.approx(0.25) and values["ID_00000000c_subdural"] == pytest.approx(0.25)
    assert values["ID_00000000c_epidural"] == pytest.approx(1e-5)
    sidecar = pd.read_csv(tmp_path / "subs" / "exp_missing.csv")
    assert sidecar["ID"].tolist() == ["ID_00000000c"]
    printed = capsys.readouterr().out
    assert "ID_00000000c" in printed and "1 predicted image(s) are not in the sample" in printed
    assert sorted(p.name for p in (tmp_path / "subs").iterdir()) == ["exp.csv", "exp_missing.csv"]  # no temp files
    assert main(["--check", str(out), "--sample", str(data / "stage_2_sample_submission.csv")]) == 0
    assert capsys.readouterr().out.strip() == "OK: 18 rows"


def test_cli_builds_and_clips(tmp_path):
    data, pred = _write_data(tmp_path), _write_preds(tmp_path)
    main(["--pred", str(pred), "--data", str(data), "--name", "x", "--clip", "0.01", "--out-dir", str(tmp_path)])
    sub = pd.read_csv(tmp_path / "x.csv")
    assert sub["Label"].min() == pytest.approx(0.01) and sub["Label"].max() <= 0.99


def test_load_test_predictions_means_per_id_and_rejects_bad_files(tmp_path):
    pred = _write_preds(tmp_path)
    mean = load_test_predictions(pred).set_index("ID")
    assert mean.loc["ID_00000000a", "any"] == pytest.approx(0.3) and len(mean) == 3
    pd.DataFrame({"ID": ["ID_x"], "any": [0.5]}).to_csv(pred / "fold2_test.csv", index=False)
    with pytest.raises(InputError, match=r"fold2_test\.csv: missing column"):
        load_test_predictions(pred)


def test_prior_sources():
    meta = pd.DataFrame({c: [0, 1] for c in LABELS})
    prior, source = training_prior(meta_train=meta)
    assert source == "metadata train labels" and (prior == 0.5).all()
    prior, source = training_prior(None)
    assert "fallback" in source and prior["any"] == PUBLISHED_PRIOR["any"] and list(prior.index) == list(LABELS)


def test_no_matching_prediction_is_an_error():
    preds = pd.DataFrame({"ID": ["ID_zzz"], **{c: [0.1] for c in LABELS}})
    with pytest.raises(InputError, match="no prediction ID matches"):
        build_submission(_sample(), preds, pd.Series(PUBLISHED_PRIOR))


def _good() -> pd.DataFrame:
    return _sample().assign(Label=np.linspace(0, 1, 18).round(3).astype(str))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.rename(columns={"Label": "label"}), "header"),
        (lambda d: d.assign(Label=d["Label"].where(d.index != 3, "nan")), "NaN or not a number at row 5"),
        (lambda d: d.assign(Label=d["Label"].where(d.index != 4, "abc")), "not a number"),
        (lambda d: d.assign(Label=d["Label"].where(d.index != 5, "1.5")), "outside"),
        (lambda d: d.assign(Label=d["Label"].where(d.index != 5, "-0.1")), "outside"),
        (lambda d: pd.concat([d, d.iloc[[2]]], ignore_index=True), "appears more than once"),
        (lambda d: d.drop(index=7), "sample ID"),  # with the sample: the missing row is named
        (
            lambda d: pd.concat([d, pd.DataFrame({"ID": [f"ID_new_{c}" for c in LABELS], "Label": "0.1"})]),
            "not in the sample",
        ),
        (lambda d: d.assign(ID=d["ID"].str.replace("_epidural", "_epi")), "no known subtype"),
    ],
)
def test_validator_names_each_defect(mutate, message):
    with pytest.raises(InputError, match=message):
        check_submission(mutate(_good()), _sample())


def test_validator_without_sample_counts_rows_per_image():
    assert check_submission(_good()) == 18
    with pytest.raises(InputError, match="has 5 rows, expected 6"):
        check_submission(_good().drop(index=7))


def test_check_cli_exit_status_and_one_line_message(tmp_path, capsys):
    sample = tmp_path / "sample.csv"
    _sample().to_csv(sample, index=False)
    bad = tmp_path / "bad.csv"
    _good().drop(index=0).to_csv(bad, index=False)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--check", str(bad), "--sample", str(sample)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "bad.csv" in err
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(InputError, match="cannot read"):
        main(["--check", str(empty), "--sample", str(sample)])
