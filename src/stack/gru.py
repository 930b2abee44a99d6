"""Recurrent level-2 stacker: a small bidirectional GRU over each series' ordered slice features."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator
from sklearn.model_selection import GroupShuffleSplit
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence
from tqdm import tqdm

from src.constants import LABEL_WEIGHTS, LABELS
from src.stack.features import clipped_logit
from src.stack.pca import PCA_SAMPLE_ROWS, fit_axes, project

N_LABELS = len(LABELS)
PROB_CLIP = 1e-5  # the CNN probabilities enter as logits; 1e-5 keeps them finite (|logit| <= 11.5)


def series_segments(series: np.ndarray) -> list[np.ndarray]:
    """Row indices of each series, in row order; a series' rows must be contiguous (as `assemble_series` gives)."""
    series = np.asarray(series)
    if len(series) == 0:
        return []
    starts = np.flatnonzero(np.r_[True, series[1:] != series[:-1]])
    if len(starts) != len(np.unique(series)):
        raise ValueError("rows of a series are not contiguous; assemble the series first")
    ends = np.r_[starts[1:], len(series)]
    return [np.arange(a, b) for a, b in zip(starts, ends)]


def pad_batch(rows: list[np.ndarray], *arrays: np.ndarray) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Pad each array's rows per series to [B, T, C] with zeros; returns the lengths [B] and the padded tensors."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    out = [pad_sequence([torch.from_numpy(arr[r]) for r in rows], batch_first=True) for arr in arrays]
    return lengths, out


def length_mask(lengths: torch.Tensor, t_max: int) -> torch.Tensor:
    """[B, T] bool, True on real slices, False on padding."""
    return torch.arange(t_max)[None, :] < lengths[:, None]


def reverse_sequences(lengths: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Reverse each sequence within its own length (padding stays at the end); inputs and labels move together."""
    t_max = tensors[0].shape[1]
    t = torch.arange(t_max)[None, :]
    idx = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
    return [x.gather(1, idx[:, :, None].expand(-1, -1, x.shape[2])) for x in tensors]


class SliceSequenceNet(nn.Module):
    """Per-slice projection -> BiGRU over the series -> per-slice logits added to the CNN's own logits."""

    def __init__(self, n_in: int, proj_size: int = 64, hidden_size: int = 64, num_layers: int = 1,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(n_in, proj_size), nn.LayerNorm(proj_size), nn.GELU(), nn.Dropout(dropout))
        self.gru = nn.GRU(proj_size, hidden_size, num_layers=num_layers, batch_first=True, bidirectional=True,
                          dropout=dropout if num_layers > 1 else 0.0)
        self.head = nn.Linear(2 * hidden_size + proj_size, N_LABELS)
        # Zero head: training starts exactly at the CNN's predictions and learns a correction to them.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
        """x [B, T, F], lengths [B], base_logits [B, T, 6] -> logits [B, T, 6] (padding positions are junk)."""
        h = self.proj(x)
        # Packing keeps the backward direction from starting on padding.
        packed = pack_padded_sequence(h, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return base_logits + self.head(torch.cat([out, h], dim=2))


def masked_weighted_bce(logits: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Competition-weighted BCE (any = 2) averaged over real slices only."""
    weights = torch.tensor(LABEL_WEIGHTS, dtype=logits.dtype, device=logits.device)
    per = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    per_slice = (per * weights).sum(2) / weights.sum()
    mask = length_mask(lengths, logits.shape[1]).to(logits.device)
    return (per_slice * mask).sum() / mask.sum()


class GRUStacker(BaseEstimator):
    """Six-label sequence stacker. X [N, F] holds the six CNN probabilities in columns 0..5 then any other small
    per-slice features; `series` [N] names each row's series, rows of a series contiguous and ordered along the
    normal; `emb` [N, D] (optional, any float dtype: float16 is read in chunks, never copied whole to float32) is
    the CNN's slice embedding.

    The embedding is reduced to `emb_components` dimensions by a PCA fit on the rows given to `fit` (a float32
    sample of at most `pca_sample` of them) before it reaches the net: on a few thousand slices a learned
    512 -> D projection overfits (on the embedded default, bags of 5 seeds: raw 512-d 0.1966 wll, 8 components
    0.1865, CNN 0.1917). `emb_components=None` feeds the embedding as it is.

    Early stopping on an inner validation split grouped by `groups` (patients); the best epoch's weights are kept.
    `n_seeds` nets, each with its own seed and inner split, are fit and their probabilities averaged.
    """

    def __init__(self, hidden_size: int = 64, proj_size: int = 64, num_layers: int = 1, dropout: float = 0.1,
                 epochs: int = 60, batch_size: int = 16, lr: float = 2e-3, weight_decay: float = 1e-4,
                 reverse_prob: float = 0.5, valid_fraction: float = 0.15, patience: int = 8,
                 emb_components: int | None = 8, pca_sample: int = PCA_SAMPLE_ROWS, n_seeds: int = 5,
                 device: str = "cpu", random_state: int = 0) -> None:
        self.hidden_size = hidden_size
        self.proj_size = proj_size
        self.num_layers = num_layers
        self.dropout = dropout
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.reverse_prob = reverse_prob
        self.valid_fraction = valid_fraction
        self.patience = patience
        self.emb_components = emb_components
        self.pca_sample = pca_sample
        self.n_seeds = n_seeds
        self.device = device
        self.random_state = random_state

    def _fit_pca(self, emb: np.ndarray | None) -> None:
        """Principal axes of the fit rows' embedding; empty arrays when there is none or nothing is reduced."""
        self.emb_dim_ = 0 if emb is None else int(emb.shape[1])
        if emb is None or self.emb_components is None:
            self.emb_mean_, self.emb_axes_ = np.zeros(0, np.float32), np.zeros((0, 0), np.float32)
            return
        self.emb_mean_, self.emb_axes_ = fit_axes(emb, self.emb_components, self.pca_sample, self.random_state)

    def _inputs(self, X: np.ndarray, emb: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Normalised net inputs [N, F'] and the CNN's logits [N, 6], both float32."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"X must have {self.n_features_in_} columns (as in fit), got shape {X.shape}")
        if (emb is None) != (self.emb_dim_ == 0) or (emb is not None and emb.shape != (len(X), self.emb_dim_)):
            got = None if emb is None else emb.shape
            raise ValueError(f"emb must be [{len(X)}, {self.emb_dim_}] as in fit (0 = none), got {got}")
        base = clipped_logit(X[:, :N_LABELS], PROB_CLIP).astype(np.float32)
        rest = [X[:, N_LABELS:]]
        if emb is not None:
            rest.append(project(emb, self.emb_mean_, self.emb_axes_) if self.emb_axes_.size
                        else np.asarray(emb, dtype=np.float32))
        feats = np.concatenate([base, *rest], axis=1)
        feats -= self.mean_
        feats /= self.scale_
        return feats, base

    def fit(self, X: np.ndarray, y: np.ndarray, series: np.ndarray, groups: np.ndarray | None = None,
            emb: np.ndarray | None = None) -> GRUStacker:
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] < N_LABELS or len(y) != len(X) or y.shape[1:] != (N_LABELS,):
            raise ValueError(f"X must be [N, >=6] and y [N, 6]; got {X.shape} and {y.shape}")
        if self.n_seeds < 1:
            raise ValueError(f"n_seeds must be >= 1, got {self.n_seeds}")
        self.n_features_in_ = X.shape[1]
        self._fit_pca(emb)
        self.mean_, self.scale_ = np.float32(0.0), np.float32(1.0)
        feats, base = self._inputs(X, emb)
        self.mean_ = feats.mean(0)
        std = feats.std(0)
        self.scale_ = np.where(std > 1e-6, std, 1.0).astype(np.float32)
        feats = ((feats - self.mean_) / self.scale_).astype(np.float32)
        segments = series_segments(series)
        seg_groups = np.array([groups[s[0]] for s in segments]) if groups is not None else np.arange(len(segments))
        # A bag of seeds, each with its own inner split: on ~100 series one net's OOF log loss swings by +-0.01
        # from seed to seed (embedded default), more than stacking gains; the mean of a few is steadier.
        fits = [self._fit_one(feats, base, y, segments, seg_groups, self.random_state + i) for i in range(self.n_seeds)]
        self.nets_ = [net for net, _, _ in fits]
        self.best_epochs_ = [epoch for _, epoch, _ in fits]
        self.history_ = [history for _, _, history in fits]
        return self

    def _device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def _fit_one(self, feats: np.ndarray, base: np.ndarray, y: np.ndarray, segments: list[np.ndarray],
                 seg_groups: np.ndarray, seed: int) -> tuple[nn.Module, int, list[dict]]:
        rng = np.random.RandomState(seed)
        torch.manual_seed(seed)
        train_seg, valid_seg = np.arange(len(segments)), np.array([], dtype=int)
        if len(np.unique(seg_groups)) >= 4 and self.valid_fraction > 0:
            split = GroupShuffleSplit(n_splits=1, test_size=self.valid_fraction, random_state=seed)
            train_seg, valid_seg = next(split.split(np.zeros(len(segments)), groups=seg_groups))
        device = self._device()
        net = SliceSequenceNet(feats.shape[1], self.proj_size, self.hidden_size, self.num_layers, self.dropout)
        net.to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        best, best_state, best_epoch, stale = np.inf, copy.deepcopy(net.state_dict()), 0, 0
        history = []
        for epoch in tqdm(range(self.epochs), desc=f"gru epochs (seed {seed})", leave=False):
            net.train()
            order = rng.permutation(train_seg)
            train_loss = 0.0
            for start in range(0, len(order), self.batch_size):
                rows = [segments[i] for i in order[start : start + self.batch_size]]
                lengths, (xb, bb, yb) = pad_batch(rows, feats, base, y)
                if rng.rand() < self.reverse_prob:
                    xb, bb, yb = reverse_sequences(lengths, xb, bb, yb)
                loss = masked_weighted_bce(net(xb.to(device), lengths, bb.to(device)), yb.to(device), lengths)
                opt.zero_grad()
                loss.backward()
                opt.step()
                train_loss += loss.item() * len(rows)
            valid_loss = self._loss(net, [segments[i] for i in valid_seg], feats, base, y) if len(valid_seg) else None
            history.append({"epoch": epoch, "train": train_loss / max(len(order), 1), "valid": valid_loss})
            if valid_loss is None:
                best_state, best_epoch = copy.deepcopy(net.state_dict()), epoch
                continue
            if valid_loss < best - 1e-6:
                best, best_state, best_epoch, stale = valid_loss, copy.deepcopy(net.state_dict()), epoch, 0
            else:
                stale += 1
                if stale >= self.patience:
                    break
        net.load_state_dict(best_state)
        return net.eval(), best_epoch, history

    def _loss(self, net: nn.Module, rows: list[np.ndarray], feats: np.ndarray, base: np.ndarray,
              y: np.ndarray) -> float:
        net.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(rows), 64):
                chunk = rows[start : start + 64]
                lengths, (xb, bb, yb) = pad_batch(chunk, feats, base, y)
                dev = self._device()
                n = int(lengths.sum())
                total += float(masked_weighted_bce(net(xb.to(dev), lengths, bb.to(dev)), yb.to(dev), lengths)) * n
                count += n
        return total / count

    def predict_proba(self, X: np.ndarray, series: np.ndarray, emb: np.ndarray | None = None) -> np.ndarray:
        """[N, 6] probabilities in X's row order."""
        feats, base = self._inputs(X, emb)
        out = np.zeros((len(feats), N_LABELS), dtype=np.float64)
        segments = series_segments(series)
        dev = self._device()
        with torch.no_grad():
            for start in range(0, len(segments), 64):
                chunk = segments[start : start + 64]
                lengths, (xb, bb) = pad_batch(chunk, feats, base)
                # Mean of the bag's probabilities (not logits): each net is calibrated on its own.
                xb, bb = xb.to(dev), bb.to(dev)
                prob = np.mean([torch.sigmoid(net(xb, lengths, bb)).cpu().numpy() for net in self.nets_], axis=0)
                out[np.concatenate(chunk)] = prob[length_mask(lengths, prob.shape[1]).numpy()]
        return out

    def to_state(self) -> dict:
        """What a fitted stacker needs to predict again: constructor params, input normalisation, net weights."""
        return {"params": self.get_params(), "n_features_in": int(self.n_features_in_), "emb_dim": self.emb_dim_,
                "mean": torch.from_numpy(np.asarray(self.mean_, np.float32)),
                "scale": torch.from_numpy(np.asarray(self.scale_, np.float32)),
                "emb_mean": torch.from_numpy(self.emb_mean_), "emb_axes": torch.from_numpy(self.emb_axes_),
                "state_dicts": [{k: v.detach().cpu() for k, v in net.state_dict().items()} for net in self.nets_]}

    @classmethod
    def from_state(cls, state: dict, device: str = "cpu") -> GRUStacker:
        """Inverse of `to_state`; predicts on `device` whatever it was fit on."""
        params = dict(state["params"])
        # Bundles saved while the embedding was X's trailing columns (from `emb_start` on) convert exactly: the
        # net's inputs were [logits, other columns, components] then as now.
        emb_start = params.pop("emb_start", None)
        est = cls(**{**params, "device": device})
        est.n_features_in_ = int(state["n_features_in"])
        est.emb_dim_ = int(state.get("emb_dim", 0))
        if "emb_dim" not in state and emb_start is not None:
            est.n_features_in_, est.emb_dim_ = int(emb_start), est.n_features_in_ - int(emb_start)
        elif "emb_dim" not in state and "emb_axes" not in state:
            raise ValueError("GRU stacker saved before its embedding had its own input; re-run python -m src.stack")
        est.mean_ = state["mean"].numpy()
        est.scale_ = state["scale"].numpy()
        est.emb_mean_ = state["emb_mean"].numpy().astype(np.float32)
        est.emb_axes_ = state["emb_axes"].numpy().astype(np.float32)
        est.nets_ = []
        for weights in state.get("state_dicts") or [state["state_dict"]]:  # one net per seed; older bundles: one
            net = SliceSequenceNet(len(est.mean_), est.proj_size, est.hidden_size, est.num_layers, est.dropout)
            net.load_state_dict(weights)
            est.nets_.append(net.to(est._device()).eval())
        return est
