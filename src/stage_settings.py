"""The settings of the stages after training (stack, report, triage): argparse defaults from their config section,
flags on top, and the resolved section saved with the outputs like a training run's config."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Collection
from typing import Any

from src.config import Config, coerce, load_config
from src.provenance import provenance


def section_record(cfg: Config, section: str, **extra: Any) -> dict[str, Any]:
    """What a later stage saves beside its outputs: its resolved config section (after flags), git and versions."""
    return {section: dataclasses.asdict(getattr(cfg, section)), **extra, **provenance()}


def parse_with_section(parser: argparse.ArgumentParser, argv: list[str] | None, section: str,
                       not_here: Collection[str] = ()) -> tuple[argparse.Namespace, Config]:
    """Parse a stage's flags with their defaults taken from config section `section` (after `--config F` and
    `--set section.key=v`); a flag given on the command line wins. Section and flags end up holding the same values.
    `not_here`: keys of the section that a sibling command uses (the web page's port in the triage CLI)."""
    parser.add_argument("--config", help="YAML file of config overrides (a path, or a name under configs/)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one config key, e.g. {section}.<key>=value (repeatable)")
    first, _ = parser.parse_known_args(argv)
    cfg = load_config(first.config, first.sets)
    values = getattr(cfg, section)
    names = [f.name for f in dataclasses.fields(values) if f.name not in not_here]
    flags = {action.dest for action in parser._actions}
    unexposed = [n for n in names if n not in flags]
    if unexposed:  # a setting no flag can override would be silently fixed by the config: a programming error
        raise RuntimeError(f"config section {section}: no command-line flag for {', '.join(unexposed)}")
    parser.set_defaults(**{n: getattr(values, n) for n in names})
    args = parser.parse_args(argv)
    for name in names:
        label = f"{section}.{name} (--{name.replace('_', '-')})"
        setattr(values, name, coerce(getattr(args, name), getattr(values, name), label))
        setattr(args, name, getattr(values, name))
    return args, cfg
