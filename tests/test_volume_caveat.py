"""Triage states what its blood volume (mL) is good for: measured, or relative only, from the training mode and the
held-out volume check."""

from types import SimpleNamespace

from src.atomic import write_json
from src.config import load_config
from src.predictions import exp_dir
from src.triage.outputs import volume_caveat


def _ens(exp: str, *sets: str) -> SimpleNamespace:
    cfg = load_config(None, list(sets))
    return SimpleNamespace(exp=exp, cfg=cfg, has_seg=cfg.arch != "classifier")


def test_volume_caveat_follows_training_mode_and_measured_error():
    assert volume_caveat(_ens("t_cav_cls", "arch=classifier")) is None
    assert volume_caveat(_ens("t_cav_weak", "masks=none")).startswith("relative only: trained without blood masks")
    full = _ens("t_cav_full", "masks=full")
    assert "not checked against true volumes" in volume_caveat(full)
    summary = exp_dir("t_cav_full") / "bloodnet" / "volume_summary.json"
    write_json({"mdape_percent": 18.4, "spearman_positive": 0.93, "n_positive_studies": 12}, summary)
    assert volume_caveat(full) == "measured: median error 18%, Spearman 0.93 on 12 held-out positive studies"
    write_json({"mdape_percent": 94.0, "spearman_positive": 0.57, "n_positive_studies": 58}, summary)
    assert volume_caveat(full).startswith("relative only: median error 94%")
