"""The one typed config: dataclass defaults, YAML overrides under configs/, `--set key=value`; unknown keys raise."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from src.config_checks import check_config
from src.constants import LABEL_WEIGHTS
from src.errors import InputError
from src.naming import as_trained, changed_keys, derived_name
from src.paths import OOF_DIR, ROOT
from src.provenance import provenance


@dataclass
class AugConfig:
    hflip: float = 0.5
    shift_scale_rotate: float = 0.5  # probability of a random affine (shift ±6%, scale ±10%, rotate ±15°)
    brightness_contrast: float = 0.3  # stands in for window jitter: the cache holds already windowed uint8
    coarse_dropout: float = 0.2


@dataclass
class StackConfig:
    """`python -m src.stack`: the level-2 stackers (flags of the same names override)."""

    k: int = 5  # neighbours on each side for the LightGBM features
    seed: int = 0
    skip_gru: bool = False  # LightGBM only (no GRU, no blend)
    n_inner: int = 5  # inner patient-grouped CV folds when some CNN folds are missing
    device: str = "cpu"  # GRU device: cpu, cuda or auto
    threads: int = 0  # CPU threads for LightGBM and torch; 0 = every CPU this process may use
    seeds: int = 0  # seeds bagged per stacker model; 0 = the stackers' own default (5)
    max_rounds: int = 0  # LightGBM boosting rounds at most; 0 = its default (2000)
    gru_epochs: int = 0  # GRU epochs at most; 0 = its default (60)


@dataclass
class ReportConfig:
    """`python -m src.evaluate.report`: thresholds, bootstrap and study rule."""

    precisions: tuple[float, ...] = (0.7, 0.8, 0.9)  # target precisions of the threshold tables
    n_boot: int = 1000  # bootstrap resamples of studies for AUC CIs
    seed: int = 0
    run: int = 3  # RADnet: a study is positive when >= run consecutive slices pass the threshold


@dataclass
class TriageConfig:
    """`python -m src.triage` and `python -m src.triage.serve`."""

    threshold_precision: float = 0.8  # flag at the thresholds saved for this precision
    batch_size: int = 32  # slices per forward pass
    no_tta: bool = False  # skip the flip view even if validation used it
    stacker: str = ""  # lgbm | gru | blend | none; empty = blend when python -m src.stack saved one
    port: int = 8000  # the web page (loopback only)
    max_upload_mb: float = 1024.0  # a 512 px head CT is ~0.5 MB a slice; 1 GB is a few thin-slice series


# Sections read after training (stackers, reports, triage): they never change what a fold trains.
AFTER_TRAINING_SECTIONS: tuple[str, ...] = ("stack", "report", "triage")
# Keys that do not change what is trained or predicted, so they stay out of the experiment name's hash. Every other
# Config field, including ones added later, is hashed when it differs from its default: add runtime-only keys here.
# log_every and compile change speed, not weights; predict_train only adds outputs; `seeds` may grow on a finished
# fold (the trained seeds are kept, the new ones train beside them), so it must keep the folder.
# cache_format is lossless: the model sees the same uint8 pixels from either store.
# early_stopping: a run it stopped continues to the end of its schedule when run again with it off (or looser), so
# it keeps the folder (fold{K}_epochs.csv shows where a fold stopped, the run record which epoch it deploys).
NON_TRAINING_KEYS: frozenset[str] = frozenset({"exp", "data_dir", "num_workers", "log_every", "compile", "seeds",
                                               "cache_format", "predict_train", "early_stopping",
                                               *AFTER_TRAINING_SECTIONS})
# Keys a plain classifier never reads (BloodNet's schedule and segmentation supervision), and the one BloodNet never
# reads: a checkpoint is not refused over them (a classifier trained before a BloodNet default changed still resumes).
SEGMENTATION_ONLY_KEYS: frozenset[str] = frozenset({
    "seg_epochs", "head_epochs", "joint_epochs", "joint_lambda", "masks", "seg_loss", "weak_pool_r", "weak_refine",
    "seg_balance", "seg_hard_negatives", "seg_study_balance", "seg_full_res", "decoder_width", "hu_prior",
    "volume_feature_grad", "map_evidence_r", "freeze_map_weights", "head_step_lr", "any_from_map"})

# What runs saved before a key existed trained with, for keys whose default changed since: a record or checkpoint
# lacking one must not read as today's default (name hash, leaderboard, resume). Add a key when its default changes.
BEFORE_KEY_EXISTED: dict[str, Any] = {"volume_feature_grad": True, "seg_hard_negatives": 0.0, "decoder_width": 0.5,
                                       "map_evidence_r": 0.0, "any_from_map": False}

# The readable part of a derived experiment name; they are spelled out there, so the hash leaves them out.
NAME_KEYS: tuple[str, ...] = ("arch", "backbone", "image_size", "context")


def unused_keys(arch: str) -> frozenset[str]:
    """Config keys this arch never reads (a classifier: BloodNet's; BloodNet: the plain schedule's `epochs`)."""
    return SEGMENTATION_ONLY_KEYS if arch == "classifier" else frozenset({"epochs"})


@dataclass
class Config:
    exp: str = ""  # experiment name; empty = derived (see exp_name)
    data_dir: str = ""  # empty = --data / $ICH_DATA / input/ / input/synthetic/ (see src/paths.py)
    # more folders in Kaggle layout whose train images join every fold's training part, never a validation fold or the
    # OOF (src/data/extra.py): e.g. a set with painted masks beside the real RSNA data, which has none
    extra_train: tuple[str, ...] = ()
    image_size: int = 96  # 96 px with 3 + 1 + 6 epochs beat 128 px with 4 + 1 + 3 at the same 2-core budget
    cache_format: str = "memmap"  # memmap | zstd (per-slice compressed, ~5x smaller on disk, decoded by the loader)
    n_folds: int = 5
    fold_seed: int = 42
    # model
    arch: str = "bloodnet"  # bloodnet (segmentation-dependent classification) | multitask | classifier
    backbone: str = "resnet10t"  # any timm model name; resnet10t fits the 2-core CPU budget of the default run
    pretrained_path: str = ""  # a local timm checkpoint file; nothing is ever downloaded
    context: int = 1  # neighbour slices on each side: in_chans = 3 windows x (2*context + 1); 1 won on the recipes
    drop_rate: float = 0.1
    # loss
    class_weights: tuple[float, ...] = LABEL_WEIGHTS
    # optimisation
    epochs: int = 6
    batch_size: int = 32
    optimizer: str = "adamw"  # adamw | adam
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    grad_clip: float = 5.0
    # The epoch whose weights a fold deploys (best.pt) and predicts its OOF with. last: the final one (the validation
    # fold is scored for the curves only). valid: the best on the validation fold, the rows its OOF then scores, so the
    # CV is optimistic (0.180 against 0.187 for the 12-epoch classifier; README, "Epoch selection").
    select_epoch: str = "last"
    # select_epoch=valid only (it judges epochs on the validation fold): epochs without improvement of its log loss
    # before the run stops; 0 = off. Ends only the final phase, in its second half (src/cnn/fit.py::may_stop_early).
    early_stopping: int = 0
    # BloodNet three-step schedule (arch = bloodnet/multitask): epochs of each step, then `epochs` is unused
    seg_epochs: int = 3  # step 1: lambda = 1, segmentation only (balanced epochs: each ~2/5 of a full one)
    head_epochs: int = 1  # step 2: lambda = 0, everything frozen but the final classification layer
    joint_epochs: int = 6  # step 3: lambda = joint_lambda, end to end
    # step 3's weight of the map's loss. 0.5 is the paper's and what was measured with masks. In the weak mode with
    # weak_refine, 0.25 classified better over five folds (log loss 0.185 vs 0.189 at 0.5):
    # configs/real_rsna_bloodnet.yaml sets it
    joint_lambda: float = 0.5
    # BloodNet segmentation supervision
    masks: str = "auto"  # full: painted masks | none: weak (slice labels through the pooled map) | auto: full if any
    seg_loss: str = "bce_dice"  # bce, + Dice per slice (bce_dice) or batch (bce_batch_dice), + Tversky (bce_tversky)
    weak_pool_r: float = 2.0  # masks=none: log-sum-exp pooling sharpness (large = max, small = mean)
    # masks=none: after the segment-only epochs, positives also train the pixel loss on pseudo-masks (src/cnn/
    # pseudo_masks.py): over five folds a little better on every figure, within the noise; on in real_rsna_bloodnet
    weak_refine: bool = False
    seg_balance: bool = True  # segment-only epochs draw every slice with blood and as many empty ones (~2/5 the cost)
    # one more decoder block at the input's resolution, with the image itself as its skip: the encoder's finest
    # features are at 1/2, and a map there, upsampled, cannot separate blood from its surround closer than ~2 px
    seg_full_res: bool = False
    # U-Net decoder channels at each level = max(16, floor(decoder_width x the encoder's channels there)). 0.5 until
    # stop 32; 0.25 trains ~16% faster on CPU (its 48 px block was a third of a step) and over five folds classified
    # better (log loss 0.1707 vs 0.1734, P(better) 0.99) with the volume level (MdAPE 28% vs 25%, P 0.23; README)
    decoder_width: float = 0.25
    hu_prior: bool = False  # gate the blood map by a soft acute-blood Hounsfield range (constants.BLOOD_HU)
    # false: the head reads the volume feature without passing its gradient back into the map, so only the pixel
    # loss shapes the map. true (the paper's, end to end): the classification loss can lower itself by painting
    # blood on slices it believes positive. false with seg_hard_negatives 0.5: with masks, a better log loss and slice
    # AUC than true with 0 over two seeds of five folds (README, BloodNet section); weak mode: one fold only
    volume_feature_grad: bool = False
    # r > 0: the head also reads the map's strongest evidence, its logits pooled by log-sum-exp (losses.lse_pool)
    # at sharpness r, beside the volume (0 = the paper's head: the volume alone, the default until stop 38). The
    # paper's soft-sum volume is swamped by the background (p ~ 0.03 over every pixel): on the old default's OOF it
    # ranked slices for `any` worse than chance (AUC 0.24), the pooled map alone better than the head (0.896 vs
    # 0.878). Over five folds r = 8 cut the log loss 0.1725 -> 0.1644 and raised slice AUC 0.878 -> 0.890 (README)
    map_evidence_r: float = 8.0
    # true: the joint step keeps the head's weights on the map's features as the head step fit them (measured
    # worse on fold 0: the head step leaves them small, README)
    freeze_map_weights: bool = False
    # the head's lr is lr x head_lr_scale in every step: Adam moves a weight ~lr per step (README, stop 39)
    head_lr_scale: float = 1.0
    head_step_lr: float = 0.0  # the head step's learning rate (0 = lr): a convex fit on frozen features
    # true: `any` is a linear read of the map's features alone (pool and volume; it starts as the pool), the
    # subtypes read the embedding too; ignored where the head reads no pooled map. Five folds, two seeds (stop 39,
    # README): slice AUC(any) 0.890 -> 0.907 and 0.879 -> 0.894, log loss 0.1644 -> 0.1619 and 0.1735 -> 0.1693
    any_from_map: bool = True
    # seg_balance's negatives: 0 = uniform; h in (0, 1] = drawn with weight (1 - h)/n + h x (share of the slice's
    # hyperdense pixels, constants.HYPERDENSE_HU): the falx, sinuses, vessels and skull edges the map mistakes for blood
    seg_hard_negatives: float = 0.5
    # seg_balance's positives: 0 = every one once; b in (0, 1] = as many drawn with weight (1 - b)/n + b x an equal
    # share per study, so a small bleed's few slices are trained as often as a large one's many (sampling.py)
    seg_study_balance: float = 0.0
    # training engine (GPU-ready loop): EMA, accumulation, seeds, compile, logging
    ema: bool = False  # validate, keep and predict with timm's ModelEmaV3 average of the weights
    ema_decay: float = 0.999  # reached after timm's warmup (decay grows from 0 with the optimizer step)
    accumulate: int = 1  # k batches per optimizer step (effective batch = k x batch_size x world)
    seeds: int = 1  # n > 1: train seeds seed..seed+n-1 of the fold; OOF and test are their mean
    compile: bool = False  # torch.compile the model (worth it on GPUs; slow to start on CPU)
    log_every: int = 50  # optimizer steps between progress updates (each one is a device sync)
    # runtime
    num_workers: int = -1  # -1: from the machine (its cores per process, minus the main one); 0: no workers
    seed: int = 0
    tta_flip: bool = True
    predict_train: bool = False  # also predict the fold's training rows (fold{K}_train_emb.npy): ~4x the OOF time
    amp: bool = True  # only ever used on CUDA
    limit_train_batches: int = 0  # >0: cut each epoch short (tests and smoke runs)
    aug: AugConfig = field(default_factory=AugConfig)
    stack: StackConfig = field(default_factory=StackConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    triage: TriageConfig = field(default_factory=TriageConfig)

    @property
    def in_chans(self) -> int:
        return 3 * (2 * self.context + 1)

    @property
    def readable_name(self) -> str:
        return f"{self.arch}-{self.backbone}-{self.image_size}px-c{self.context}"

    @property
    def exp_name(self) -> str:
        """`exp` when set, else the readable part plus a short hash of every non-default key that changes training
        (e.g. `bloodnet-resnet10t-96px-c1-191a32` for `--set lr=3e-4`), so no two settings share a folder."""
        if self.exp:
            return self.exp
        return derived_name(self.readable_name, training_overrides(dataclasses.asdict(self)))


def training_overrides(values: dict[str, Any]) -> dict[str, Any]:
    """{dotted key: value} of a config (asdict or a saved run record; a key it lacks read by as_trained) where it
    differs from today's defaults and changes training."""
    defaults = dataclasses.asdict(Config())
    # a key the arch never reads must not rename its runs (a BloodNet default change, a classifier's `epochs`)
    unread = unused_keys(values.get("arch", defaults["arch"]))
    return changed_keys(as_trained(values, defaults, BEFORE_KEY_EXISTED), defaults,
                        skip=NON_TRAINING_KEYS | set(NAME_KEYS) | unread)


def coerce(value: Any, current: Any, key: str) -> Any:
    """Parse a --set string or YAML value into the type of the default it replaces."""
    if isinstance(current, bool):
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise InputError(f"--set {key}: expected true/false, got {value!r}")
        return bool(value)
    try:
        if isinstance(current, tuple):
            items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
            kind = type(current[0]) if current else str  # an empty default (extra_train) holds strings
            return tuple(kind(v) for v in items if v != "")
        return type(current)(value)
    except (TypeError, ValueError) as err:
        raise InputError(f"config key {key}: cannot read {value!r} as {type(current).__name__}") from err


def _apply(cfg: Any, overrides: dict[str, Any], source: str, prefix: str = "") -> None:
    names = {f.name for f in dataclasses.fields(cfg)}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in names:
            raise InputError(f"{source}: unknown config key {prefix + head!r} (known: {', '.join(sorted(names))})")
        current = getattr(cfg, head)
        if dataclasses.is_dataclass(current):
            nested = {rest: value} if rest else value
            if not isinstance(nested, dict):
                raise InputError(f"{source}: config key {prefix + head!r} takes a mapping")
            _apply(current, nested, source, prefix=f"{prefix}{head}.")
        else:
            setattr(cfg, head, coerce(value, current, prefix + head))


def load_config(path: str | None = None, sets: list[str] | None = None) -> Config:
    """Defaults, then the YAML file's overrides, then each `key=value` (dotted keys reach nested sections)."""
    cfg = Config()
    if path:
        file = Path(path)
        if not file.exists() and (ROOT / "configs" / file).exists():
            file = ROOT / "configs" / file
        if not file.exists():
            raise InputError(f"{path}: config file not found")
        try:
            overrides = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise InputError(f"{file}: not valid YAML ({str(err).splitlines()[0]})") from err
        if not isinstance(overrides, dict):
            raise InputError(f"{file}: expected a mapping of config keys")
        _apply(cfg, overrides, str(file))
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--set {item!r}: expected key=value")
        _apply(cfg, {key.strip(): value.strip()}, "--set")
    # Absolute, so that every stage (run_fold.sh asks src.config for the experiment name) hashes the same spelling.
    cfg.extra_train = tuple(str(Path(p).expanduser().resolve()) for p in cfg.extra_train)
    check_config(cfg)
    return cfg


def run_record(cfg: Config) -> dict[str, Any]:
    """What is saved beside every training output: the resolved config, git hash and package versions."""
    return {"config": dataclasses.asdict(cfg), "exp": cfg.exp_name, **provenance()}


def renamed_run_note(cfg: Config) -> str | None:
    """A finished run saved under the readable name alone (before names carried a hash) with exactly these settings:
    the one line that says where it went, or None."""
    name, old = cfg.exp_name, cfg.readable_name
    if cfg.exp or name == old or (OOF_DIR / name).exists():
        return None
    now = training_overrides(dataclasses.asdict(cfg))
    for record in sorted((OOF_DIR / old).glob("fold*_run.json")):
        try:
            saved = json.loads(record.read_text()).get("config", {})
        except (OSError, json.JSONDecodeError):
            continue
        if training_overrides(saved) == now:
            return (f"note: experiment names now end in a hash of the non-default training keys; {record.parent} holds "
                    f"a run with these settings, now named {name}: rename oof/{old} and work/models/{old} to reuse it")
    return None


def main(argv: list[str] | None = None) -> int:
    """`python -m src.config [--config F] [--set k=v ...]`: print the resolved config (or one key with --get)."""
    parser = argparse.ArgumentParser(description="print the resolved config")
    parser.add_argument("--config")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--get", help="print one value, e.g. exp_name")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.sets)
    if args.get:
        if args.get != "exp_name" and args.get not in dataclasses.asdict(cfg):
            raise InputError(f"--get {args.get}: unknown config key")
        if args.get == "exp_name" and (note := renamed_run_note(cfg)):
            print(note, file=sys.stderr)
        print(getattr(cfg, args.get))
    else:
        print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    from src.errors import run_cli

    run_cli(main)
