"""The LightGBM level-2 stacker: one booster per label on neighbour features, boosting from the CNN's logit."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.model_selection import GroupShuffleSplit

from src.constants import LABELS
from src.stack.features import clipped_logit
from src.stack.threads import lgbm_threads

# Fixed, so that the one binning of the fit rows (shared by every seed and label) does not depend on the seed.
DATA_SEED = 1


class LGBMStacker(BaseEstimator):
    """One LightGBM binary model per label; early stopping on an inner validation split grouped by patient.

    `n_seeds` such sets, each with its own inner split and bagging seed, are fit and their probabilities averaged:
    on ~100 training series one set's OOF log loss swings by ±0.005 from seed to seed and each set is
    overconfident in its own way (embedded default: single seeds 0.199-0.208 wll, their mean of five 0.188).
    `boosters_[s][j]` is seed s's model of label j (a float: a constant rate where the label had one class).

    The fit rows are binned once (one LightGBM Dataset) and every seed's train/valid part of every label is a
    subset of it: binning 600k x 160 features costs about as much as 50 boosting rounds, 60 times per fit before.
    `n_jobs=0` picks the threads by the rows (src.stack.threads.lgbm_threads): one per 20,000, within the CPUs.
    """

    def __init__(
        self,
        n_estimators: int = 2000,
        learning_rate: float = 0.03,
        num_leaves: int = 15,
        min_child_samples: int = 20,
        subsample: float = 0.8,
        colsample_bytree: float = 0.5,
        reg_lambda: float = 1.0,
        valid_fraction: float = 0.2,
        early_stopping_rounds: int = 100,
        n_jobs: int = 0,
        verbose: bool = False,
        n_seeds: int = 5,
        random_state: int = 0,
    ) -> None:
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.reg_lambda = reg_lambda
        self.valid_fraction = valid_fraction
        self.early_stopping_rounds = early_stopping_rounds
        self.n_jobs = n_jobs
        self.verbose = verbose
        self.n_seeds = n_seeds
        self.random_state = random_state

    def fit(self, X: pd.DataFrame, y: np.ndarray, groups: np.ndarray | None = None) -> LGBMStacker:
        y = np.asarray(y, dtype=np.float64)
        if y.shape != (len(X), len(LABELS)):
            raise ValueError(f"y must be [{len(X)}, {len(LABELS)}], got {y.shape}")
        groups = np.arange(len(X)) if groups is None else np.asarray(groups)
        if len(np.unique(groups)) < 2:
            raise ValueError("need at least two groups (patients) for the early-stopping split")
        self.feature_names_in_ = np.asarray(X.columns, dtype=object)
        self.n_features_in_ = X.shape[1]
        if self.n_seeds < 1:
            raise ValueError(f"n_seeds must be >= 1, got {self.n_seeds}")
        # Boost from the CNN's own logit (init_score): trees learn a correction to the slice's probability, so
        # with little OOF (one fold) early stopping keeps the CNN rather than a worse model from scratch.
        base = np.stack([clipped_logit(X[name].to_numpy()) for name in LABELS], axis=1)
        threads = self.n_jobs or lgbm_threads(len(X))
        binned = lgb.Dataset(X.to_numpy(dtype=np.float32), y[:, 0], feature_name=[str(c) for c in X.columns],
                             params=self._params(self.random_state, threads), free_raw_data=True).construct()
        fits = [self._fit_seed(binned, y, base, groups, self.random_state + s, threads) for s in range(self.n_seeds)]
        self.boosters_ = [boosters for boosters, _ in fits]
        self.best_iterations_ = [best for _, best in fits]
        return self

    def _params(self, seed: int, threads: int = 0) -> dict:
        return {
            "objective": "binary",
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_child_samples,
            "bagging_fraction": self.subsample,
            "bagging_freq": 1,
            "feature_fraction": self.colsample_bytree,
            "lambda_l2": self.reg_lambda,
            "num_threads": threads or self.n_jobs or 1,
            "seed": seed,
            "data_random_seed": DATA_SEED,
            "feature_pre_filter": False,
            "deterministic": True,
            "verbosity": -1,
        }

    def _fit_seed(self, binned: lgb.Dataset, y: np.ndarray, base: np.ndarray, groups: np.ndarray,
                  seed: int, threads: int) -> tuple[list[lgb.Booster | float], list[int]]:
        split = GroupShuffleSplit(n_splits=1, test_size=self.valid_fraction, random_state=seed)
        tr, va = next(split.split(np.zeros(len(y)), groups=groups))
        params = self._params(seed, threads)
        boosters: list[lgb.Booster | float] = []
        best_iterations: list[int] = []
        for j, name in enumerate(LABELS):
            if len(np.unique(y[tr, j])) < 2:
                # One class only: LightGBM cannot learn a split; predict the (smoothed) training rate.
                boosters.append(float((y[:, j].sum() + 0.5) / (len(y) + 1.0)))
                best_iterations.append(0)
                continue
            # Subsets share the parent's bins; label and init score are set on each after it is built.
            train_set, valid_set = binned.subset(tr, params).construct(), binned.subset(va, params).construct()
            for part, rows in ((train_set, tr), (valid_set, va)):
                part.set_label(y[rows, j])
                part.set_init_score(base[rows, j])
            booster = lgb.train(
                params,
                train_set,
                num_boost_round=self.n_estimators,
                valid_sets=[valid_set],
                valid_names=[f"inner_{name}"],
                callbacks=[
                    lgb.early_stopping(self.early_stopping_rounds, verbose=self.verbose),
                    lgb.log_evaluation(period=100 if self.verbose else 0),
                ],
            )
            boosters.append(booster)
            best_iterations.append(int(booster.best_iteration or booster.current_iteration()))
        return boosters, best_iterations

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        """[N, 6] probabilities in LABELS order."""
        if list(X.columns) != list(self.feature_names_in_):
            raise ValueError("feature columns differ from those seen in fit")
        out = np.zeros((len(X), len(LABELS)))
        values = X.to_numpy(dtype=np.float32)  # once, not once per booster
        threads = self.n_jobs or lgbm_threads(len(X))
        for boosters, best_iterations in zip(self.boosters_, self.best_iterations_):
            for j, (booster, best) in enumerate(zip(boosters, best_iterations)):
                if isinstance(booster, float):
                    out[:, j] += booster
                else:
                    base = clipped_logit(X[LABELS[j]].to_numpy())
                    raw = booster.predict(values, num_iteration=best, raw_score=True,
                                          num_threads=threads) + base
                    out[:, j] += 1.0 / (1.0 + np.exp(-raw))
        return out / len(self.boosters_)

    def to_dict(self) -> dict:
        """JSON-safe fitted state: feature names, best iterations, LightGBM model strings (or constant rates)."""
        return {
            "features": [str(c) for c in self.feature_names_in_],
            "best_iterations": [list(best) for best in self.best_iterations_],
            "boosters": [[b if isinstance(b, float) else b.model_to_string() for b in seed] for seed in self.boosters_],
        }

    @classmethod
    def from_dict(cls, state: dict) -> LGBMStacker:
        est = cls()
        est.feature_names_in_ = np.asarray(state["features"], dtype=object)
        est.n_features_in_ = len(est.feature_names_in_)
        boosters, best = state["boosters"], state["best_iterations"]
        if boosters and not isinstance(boosters[0], list):  # saved before seeds were bagged: one set of six
            boosters, best = [boosters], [best]
        est.best_iterations_ = [[int(b) for b in seed] for seed in best]
        est.boosters_ = [
            [float(b) if isinstance(b, (int, float)) else lgb.Booster(model_str=b) for b in seed] for seed in boosters
        ]
        est.n_seeds = len(est.boosters_)
        return est
