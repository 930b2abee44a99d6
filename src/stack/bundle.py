"""Saved level-2 stackers: write and load the CV models, and apply them to new series (StackerBundle)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import torch

from src import paths
from src.atomic import atomic_path, write_json
from src.constants import ID_COL, LABELS, SERIES_KEYS, VOLUME_COL
from src.errors import InputError
from src.stack.cv import CVResult
from src.stack.features import SERIES_ID, assemble_series, join_series, neighbour_features, sequence_inputs
from src.stack.gru import GRUStacker
from src.stack.lgbm import LGBMStacker

KINDS = ("lgbm", "gru", "blend")  # the saved stackers; blend = the mean of the other two


def mean_by_id(preds: Iterable[tuple[pd.Series, np.ndarray]], ids: pd.Series) -> np.ndarray:
    """[N, 6] for `ids`: the mean over (ids_f, probs_f) pairs, one per CNN fold model, of each ID's probabilities."""
    frames = [pd.DataFrame(p, index=np.asarray(i)) for i, p in preds]
    return pd.concat(frames).groupby(level=0, sort=False).mean().loc[np.asarray(ids)].to_numpy()


def gru_over_folds(model: GRUStacker, fold_inputs: Iterable[tuple[pd.DataFrame, np.ndarray, np.ndarray | None]],
                   ids: pd.Series) -> np.ndarray:
    """One GRU's [N, 6] for `ids`: each fold's (assembled table, inputs, embedding) scored apart, then averaged.

    Each fold's embeddings live in that fold model's space, so the GRU scores them separately (averaging
    embeddings across models would be meaningless)."""
    return mean_by_id(((t[ID_COL], model.predict_proba(Xt, t[SERIES_ID].to_numpy(), emb=emb))
                       for t, Xt, emb in fold_inputs), ids)


def stack_model_dir(exp: str) -> Path:
    """work/models/<exp>/stack/: the fitted CV stackers beside the CNN checkpoints they stack."""
    return paths.WORK / "models" / exp / "stack"


def save_stackers(exp: str, results: dict[str, CVResult], manifest: dict, out_dir: Path | None = None) -> Path:
    """Write the CV models (lgbm.json: model strings; gru.pt: state dicts) and, last, manifest.json; atomic."""
    out_dir = out_dir or stack_model_dir(exp)
    kinds = ["lgbm", "gru", "blend"] if "gru" in results else ["lgbm"]  # the blend is the mean of the two
    write_json([m.to_dict() for m in results["lgbm"].models], out_dir / "lgbm.json")
    if "gru" in results:
        with atomic_path(out_dir / "gru.pt") as tmp:
            torch.save([m.to_state() for m in results["gru"].models], tmp)
    # The manifest goes last: its presence means the model files beside it are complete and belong to it.
    write_json({**manifest, "kinds": kinds, "source": "the CV models of python -m src.stack, averaged (as for "
                "stack_test.csv); no refit on all OOF"}, out_dir / "manifest.json")
    return out_dir


@dataclass
class StackerBundle:
    """The saved CV stackers of one experiment; `predict` reproduces the stack_test.csv path on new series."""

    manifest: dict
    lgbm: list[LGBMStacker]
    gru: list[GRUStacker]
    path: Path | None = None

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.manifest["kinds"])

    def describe(self, kind: str) -> str:
        what = {"lgbm": "LightGBM", "gru": "BiGRU", "blend": "mean of LightGBM and BiGRU"}[kind]
        return (f"{kind} stacker ({what}; mean of {self.manifest['n_models']} CV models each) over CNN folds "
                f"{','.join(map(str, self.manifest['cnn_folds']))}")

    def predict(self, tables: Mapping[int, pd.DataFrame], embeddings: Mapping[int, np.ndarray] | None = None,
                kinds: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """{kind: probs [N, 6]} in the row order of the tables.

        tables: CNN fold number -> that fold model's table, same IDs in the same order in each: `ID`, the series
        keys, `position`, the six probabilities (+ `blood_volume_mm3` when the stackers used it). LightGBM reads
        each fold's table, the GRU each fold's table with that fold's embeddings [N, D]; both average over folds.
        """
        kinds = list(kinds or self.kinds)
        unknown = [k for k in kinds if k not in self.kinds]
        if unknown:
            raise InputError(f"stacker(s) {unknown} not saved (have {list(self.kinds)})")
        folds = sorted(tables)
        if not folds:
            raise ValueError("no fold tables")
        ids = tables[folds[0]][ID_COL].reset_index(drop=True)
        cols = [ID_COL, *SERIES_KEYS, "position", *LABELS] + ([VOLUME_COL] if self.manifest["with_volume"] else [])
        parts = []
        for f in folds:
            missing = [c for c in cols if c not in tables[f].columns]
            if missing:
                raise InputError(f"fold {f} table lacks columns {missing} needed by the stackers")
            if not tables[f][ID_COL].reset_index(drop=True).equals(ids):
                raise ValueError(f"fold {f} table rows differ from fold {folds[0]}'s")
            parts.append(tables[f][cols].reset_index(drop=True))
        meta = parts[0][[ID_COL, *SERIES_KEYS, "position"]]
        out = {}
        if {"lgbm", "blend"} & set(kinds):
            # As in stack_test.csv: each fold model's predictions through each stacker, then the mean.
            tables_f = [join_series(meta, p.drop(columns=[*SERIES_KEYS, "position"])) for p in parts]
            fold_feats = [(t[ID_COL], neighbour_features(t, self.manifest["k"])) for t in tables_f]
            out["lgbm"] = np.mean([mean_by_id([(i, m.predict_proba(f)) for i, f in fold_feats], ids)
                                   for m in self.lgbm], axis=0)
        if {"gru", "blend"} & set(kinds):
            fold_inputs = []
            for f, part in zip(folds, parts):
                table = assemble_series(part.assign(_row=np.arange(len(part))))
                emb = None
                if self.manifest["emb_dim"] is not None:
                    if embeddings is None or f not in embeddings:
                        raise InputError(f"the GRU stacker needs fold {f}'s embeddings")
                    emb = np.asarray(embeddings[f])[table["_row"].to_numpy()]
                    if emb.shape[1] != self.manifest["emb_dim"]:
                        raise InputError(f"fold {f} embeddings are {emb.shape[1]}-d; the GRU was fit on "
                                         f"{self.manifest['emb_dim']}-d")
                fold_inputs.append((table, sequence_inputs(table), emb))
            out["gru"] = np.mean([gru_over_folds(m, fold_inputs, ids) for m in self.gru], axis=0)
        if "blend" in kinds:
            out["blend"] = (out["lgbm"] + out["gru"]) / 2
        return {k: out[k] for k in kinds}


def load_stackers(exp: str, device: str = "cpu", model_dir: Path | None = None) -> StackerBundle | None:
    """The stackers saved by `python -m src.stack --exp EXP`, or None when there are none."""
    model_dir = model_dir or stack_model_dir(exp)
    manifest_path = model_dir / "manifest.json"
    if not manifest_path.exists():
        return None

    try:
        manifest = json.loads(manifest_path.read_text())
        lgbm = [LGBMStacker.from_dict(d) for d in json.loads((model_dir / "lgbm.json").read_text())]
        gru = []
        if "gru" in manifest["kinds"]:
            states = torch.load(model_dir / "gru.pt", map_location="cpu", weights_only=True)
            gru = [GRUStacker.from_state(s, device) for s in states]
    except (OSError, json.JSONDecodeError, KeyError, ValueError, RuntimeError, lgb.basic.LightGBMError) as err:
        raise InputError(f"{model_dir}: unreadable saved stackers ({type(err).__name__}: {err}); "
                         f"re-run python -m src.stack --exp {exp}") from err
    return StackerBundle(manifest, lgbm, gru, model_dir)
