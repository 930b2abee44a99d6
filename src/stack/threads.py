"""How many CPU threads the stackers may use: the cores this process may run on, and for LightGBM no more than the
rows keep busy."""

from __future__ import annotations

from src.cpus import machine_threads

# LightGBM splits each boosting round into many short parallel steps; its (passive, see src/stack/__main__.py)
# OpenMP threads sleep between them and waking them costs more than a thread saves until each has enough rows.
# `python bench/stack_threads.py`, one stacker fit, 40 features: 2-core AMD EPYC, quiet: 10k rows 9.5 s on 1
# thread, 24.8 s on 2; 30k rows 21 s and 38 s; 16-core host of an H100: 30k rows 33.9 s on 1, 22.9 s on 4.
# Spinning threads (OMP_WAIT_POLICY=ACTIVE) would be faster on a quiet machine (10k rows on 2: 5.8 s) and stall
# a busy one (3 other busy processes on 2 cores: 42 s on 2 spinning threads, 27 s on 2 passive, 20 s on 1).
ROWS_PER_LGBM_THREAD = 20_000


def lgbm_threads(rows: int) -> int:
    """Threads for a LightGBM fit or prediction over `rows` rows: one per ROWS_PER_LGBM_THREAD, at least 1, at most
    the CPUs available."""
    return max(1, min(machine_threads(), rows // ROWS_PER_LGBM_THREAD))


# The GRU's operations are sized by its batch (16 series) and hidden width (64), not by the data, so more rows
# bring more small steps, never bigger ones: torch's intra-op threads only add hand-offs. `python -m src.stack`
# on the embedded default's five-fold OOF, 2-core AMD EPYC: GRU 2 min 21 s on 2 torch threads, 41 s on 1, the
# same predictions.
GRU_TORCH_THREADS = 1
