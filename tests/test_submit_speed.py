"""The submission's speed fixes keep its answers: IDs split as pandas did, the prior read only when it is used."""

from __future__ import annotations

import pandas as pd
from test_submit import IMAGES, _write_data

from src.constants import LABELS
from src.evaluate import submit


def test_split_ids_matches_pandas_rpartition():
    ids = pd.Series(["ID_0a1b_any", "ID_x_y_subdural", "nounderscore", "ID_a_"], index=[5, 6, 7, 8])
    image, subtype = submit.split_ids(ids)
    want = ids.str.rpartition("_")
    assert image.tolist() == want[0].tolist() and subtype.tolist() == want[2].tolist()
    assert image.index.equals(ids.index) and subtype.index.equals(ids.index)


def test_training_metadata_is_not_read_when_every_image_has_a_prediction(tmp_path, monkeypatch):
    data = _write_data(tmp_path)
    pred = tmp_path / "oof" / "full"
    pred.mkdir(parents=True)
    pd.DataFrame({"ID": IMAGES, "fold": 0, **{c: 0.3 for c in LABELS}}).to_csv(pred / "fold0_test.csv", index=False)

    def no_prior(*args, **kwargs):
        raise AssertionError("training prior read although no image lacks a prediction")

    monkeypatch.setattr(submit, "training_prior", no_prior)
    out, missing = submit.make_submission(pred, data, "full", out_dir=tmp_path / "subs")
    assert missing == [] and len(pd.read_csv(out)) == len(IMAGES) * len(LABELS)
