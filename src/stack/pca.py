"""Principal axes of the CNN's slice embeddings for the GRU stacker, fit without a float64 copy of the matrix."""

from __future__ import annotations

import numpy as np

# 20k rows pin the top few axes of a 2048-d embedding well (their sample error is ~1/sqrt(n) of the spectrum gap)
# and cost ~80 MB of float32 whatever N is; a full SVD of 600k x 2048 in float64 would be ~10 GB.
PCA_SAMPLE_ROWS = 20_000
CHUNK_ROWS = 16_384  # rows converted to float32 at a time when projecting: ~130 MB at 2048-d


def fit_axes(emb: np.ndarray, n_components: int, sample_rows: int = PCA_SAMPLE_ROWS,
             random_state: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D] float32, axes [D, n_components] float32) of `emb` [N, D] (any float dtype, memmap welcome).

    Fit on a random sample of at most `sample_rows` rows (all rows when N is smaller), as float32; the
    eigenvectors of the sample's D x D scatter matrix are the principal axes (that matrix is the only float64).
    """
    n, d = emb.shape
    if n == 0:
        raise ValueError("no rows to fit the embedding PCA on")
    rows = np.arange(n) if n <= sample_rows else np.sort(np.random.RandomState(random_state).choice(n, sample_rows,
                                                                                                    replace=False))
    sample = np.asarray(emb[rows], dtype=np.float32)
    mean = sample.mean(0, dtype=np.float64).astype(np.float32)
    sample -= mean
    if len(rows) >= d:
        cov = (sample.T @ sample).astype(np.float64)
        vectors = np.linalg.eigh(cov)[1][:, ::-1]  # eigh's eigenvalues ascend
    else:  # fewer rows than dimensions: the thin SVD of the sample is the cheaper route
        vectors = np.linalg.svd(sample, full_matrices=False)[2].T
    k = min(n_components, d, len(rows))
    axes = vectors[:, :k].astype(np.float64)
    # A sign convention, so that two fits on the same rows agree exactly (eigh's signs are arbitrary).
    axes = axes * np.where(axes[np.abs(axes).argmax(0), np.arange(k)] < 0, -1.0, 1.0)
    return mean, axes.astype(np.float32)


def project(emb: np.ndarray, mean: np.ndarray, axes: np.ndarray, chunk_rows: int | None = None) -> np.ndarray:
    """[N, k] float32 = (emb - mean) @ axes, chunk by chunk so that no float32 copy of the whole of `emb` exists."""
    chunk_rows = chunk_rows or CHUNK_ROWS
    out = np.empty((len(emb), axes.shape[1]), dtype=np.float32)
    for start in range(0, len(emb), chunk_rows):
        block = np.asarray(emb[start : start + chunk_rows], dtype=np.float32)
        out[start : start + len(block)] = (block - mean) @ axes
    return out
