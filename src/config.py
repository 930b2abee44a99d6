"""The one typed config: dataclass defaults, YAML overrides under configs/, `--set key=value`; unknown keys raise."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from src.constants import LABEL_WEIGHTS
from src.errors import InputError
from src.paths import ROOT


@dataclass
class AugConfig:
    hflip: float = 0.5
    shift_scale_rotate: float = 0.5  # probability of a random affine (shift ±6%, scale ±10%, rotate ±15°)
    brightness_contrast: float = 0.3  # stands in for window jitter: the cache holds already windowed uint8
    coarse_dropout: float = 0.2


@dataclass
class Config:
    exp: str = ""  # experiment name; empty = derived from arch, backbone, size and context
    data_dir: str = ""  # empty = --data / $ICH_DATA / input/ / input/synthetic/ (see src/paths.py)
    image_size: int = 128
    n_folds: int = 5
    fold_seed: int = 42
    # model
    arch: str = "bloodnet"  # bloodnet (segmentation-dependent classification) | multitask | classifier
    backbone: str = "resnet10t"  # any timm model name; resnet10t fits the 2-core CPU budget of the default run
    pretrained_path: str = ""  # a local timm checkpoint file; nothing is ever downloaded
    context: int = 0  # neighbour slices on each side: in_chans = 3 windows x (2*context + 1)
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
    early_stopping: int = 3  # epochs without improvement of the validation metric; 0 = off
    # BloodNet three-step schedule (arch = bloodnet/multitask): epochs of each step, then `epochs` is unused
    seg_epochs: int = 2  # step 1: lambda = 1, segmentation only
    head_epochs: int = 1  # step 2: lambda = 0, everything frozen but the final classification layer
    joint_epochs: int = 3  # step 3: lambda = joint_lambda, end to end
    joint_lambda: float = 0.5
    seg_dice: bool = False
    # runtime
    num_workers: int = 1
    seed: int = 0
    tta_flip: bool = True
    predict_train: bool = False  # also predict the fold's training rows (fold{K}_train_emb.npy): ~4x the OOF time
    amp: bool = True  # only ever used on CUDA
    limit_train_batches: int = 0  # >0: cut each epoch short (tests and smoke runs)
    aug: AugConfig = field(default_factory=AugConfig)

    @property
    def in_chans(self) -> int:
        return 3 * (2 * self.context + 1)

    @property
    def exp_name(self) -> str:
        return self.exp or f"{self.arch}-{self.backbone}-{self.image_size}px-c{self.context}"


def _coerce(value: Any, current: Any, key: str) -> Any:
    """Parse a --set string or YAML value into the type of the default it replaces."""
    if isinstance(current, bool):
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise InputError(f"--set {key}: expected true/false, got {value!r}")
        return bool(value)
    if isinstance(current, tuple):
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(type(current[0])(v) for v in items)
    try:
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
            setattr(cfg, head, _coerce(value, current, prefix + head))


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
    if cfg.arch not in ("classifier", "multitask", "bloodnet"):
        raise InputError(f"config key arch: {cfg.arch!r} is not one of classifier, multitask, bloodnet")
    if len(cfg.class_weights) != len(LABEL_WEIGHTS):
        raise InputError(f"config key class_weights: expected {len(LABEL_WEIGHTS)} values")
    return cfg


def run_record(cfg: Config) -> dict[str, Any]:
    """What is saved beside every output: the resolved config, git hash and package versions."""
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        commit = git.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        commit += "+dirty" if dirty.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    packages = {}
    for name in ("torch", "torchvision", "timm", "albumentations", "pydicom", "numpy", "pandas", "lightgbm"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "config": dataclasses.asdict(cfg),
        "exp": cfg.exp_name,
        "git": commit,
        "python": platform.python_version(),
        "packages": packages,
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m src.config [--config F] [--set k=v ...]`: print the resolved config (or one key with --get)."""
    import argparse

    parser = argparse.ArgumentParser(description="print the resolved config")
    parser.add_argument("--config")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--get", help="print one value, e.g. exp_name")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.sets)
    if args.get:
        if args.get != "exp_name" and args.get not in dataclasses.asdict(cfg):
            raise InputError(f"--get {args.get}: unknown config key")
        print(getattr(cfg, args.get))
    else:
        print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    from src.errors import run_cli

    run_cli(main)
