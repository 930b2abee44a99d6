"""Every stage that needs no GPU, at RSNA scale: wall time and peak memory per stage at N/16, N/4 and N.

    python bench/scale.py [--slices 752803] [--emb-dim 2048] [--scales 16,4,1] [--seeds 5] [--max-rounds 2000]
                          [--gru-epochs 60] [--n-boot 1000] [--workdir DIR] [--keep] [--no-stack] [--out NAME]

Per scale it builds a temporary workspace without decoding any DICOM: train/test metadata as the header stage
writes it (studies of 20-49 slices, ~1.15 studies per patient, ~14% positive slices in the real label mix, test
slices in the stage-2 proportion 121,232 / 752,803), the patient-grouped folds (the real `src.data.folds` stage),
five folds of CNN-like OOF + test predictions and float16 embeddings, and a sample submission. Then it runs the
real stages as their own processes: the stackers (`python -m src.stack`), the report with its study bootstrap,
triage, the submission and its check. Each stage's peak resident memory comes from os.wait4 on its process.
Growth exponent = log(t2 / t1) / log(n2 / n1) between consecutive scales (1 = linear; n log n reads ~1.1).
Writes work/bench/scale.{json,md} (--out); the goals are checked at the largest scale run, projected to N when N
itself did not run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from src.constants import FOLD_COL, ID_COL, LABELS, SUBTYPES  # noqa: E402

RSNA_TRAIN, RSNA_TEST = 752_803, 121_232
# Stage-1 prevalences (RSNA_FACTS.md): a bleeding slice's subtypes are drawn with P(subtype | any).
ANY_RATE = 0.144
SUBTYPE_RATE = {"epidural": 0.0041, "intraparenchymal": 0.048, "intraventricular": 0.035, "subarachnoid": 0.048,
                "subdural": 0.063}
GOALS = {"peak_gb": 12.0, "stack_min": 45.0, "report_min": 5.0, "submit_min": 1.0}
EXP = "scale"


# ---------------------------------------------------------------- workspace (bench only, no DICOM)


def make_metadata(n: int, rng: np.random.RandomState, prefix: str, labels: bool) -> pd.DataFrame:
    """Metadata rows as src.data.metadata writes them, for about n slices."""
    sizes = []
    while sum(sizes) < n:
        sizes.append(rng.randint(20, 50))  # mean 34.5 slices: RSNA's 752,803 / 21,744 studies
    sizes[-1] -= sum(sizes) - n
    if sizes[-1] < 1:
        sizes.pop()
    sizes = np.asarray(sizes)
    n_studies = len(sizes)
    patient_of = np.minimum(np.arange(n_studies) * 18_938 // 21_744, n_studies - 1)  # ~1.15 studies a patient
    study = np.repeat(np.arange(n_studies), sizes)
    pos = np.concatenate([np.arange(s) for s in sizes])
    meta = pd.DataFrame({
        ID_COL: [f"ID_{prefix}{i:09x}" for i in rng.permutation(len(study))],
        "PatientID": [f"ID_p{prefix}{p:08x}" for p in patient_of[study]],
        "StudyInstanceUID": [f"ID_s{prefix}{s:08x}" for s in study],
        "SeriesInstanceUID": [f"ID_r{prefix}{s:08x}" for s in study],
        "position": pos * 5.0, "slice_index": pos, "series_length": sizes[study], "slice_spacing": 5.0,
        "pixel_spacing_row": 0.45, "pixel_spacing_col": 0.45, "rows": 512, "cols": 512,
    })
    meta["path"] = "stage_2_train/" + meta[ID_COL] + ".dcm"
    if labels:
        # Bleeding studies carry one contiguous run of positive slices (~40% of the study), subtypes per study.
        bleeds = rng.rand(n_studies) < ANY_RATE / 0.4
        start = (rng.rand(n_studies) * 0.6 * sizes).astype(int)
        run = np.maximum((0.4 * sizes).astype(int), 1)
        inside = (pos >= start[study]) & (pos < start[study] + run[study]) & bleeds[study]
        for name in SUBTYPES:
            has = rng.rand(n_studies) < SUBTYPE_RATE[name] / ANY_RATE
            meta[name] = (inside & has[study]).astype(np.int8)
        none = inside & (meta[list(SUBTYPES)].sum(axis=1) == 0).to_numpy()
        meta.loc[none, "subdural"] = 1  # a positive slice has at least one subtype
        meta["any"] = meta[list(SUBTYPES)].max(axis=1).astype(np.int8)
        meta["has_mask"] = False
    return meta.sample(frac=1.0, random_state=rng).reset_index(drop=True)  # scan order, not slice order


def write_workspace_meta(ws: Path, n: int, seed: int) -> None:
    from src import paths
    from src.atomic import write_csv, write_json

    rng = np.random.RandomState(seed)
    data = ws / "data"
    n_test = max(round(n * RSNA_TEST / RSNA_TRAIN), 40)
    for split, count in (("train", n), ("test", n_test)):
        meta = make_metadata(count, rng, split[:2], labels=split == "train")
        out = paths.metadata_csv(data, split)
        write_csv(meta, out)
        (data / f"stage_2_{split}").mkdir(parents=True, exist_ok=True)
        # The stamp load_metadata checks: the (empty) image folder holds as many files as when it was written.
        write_json({"n_files": 0, "rows": len(meta)}, out.with_suffix(".json"))
        if split == "test":
            ids = np.repeat(meta[ID_COL].to_numpy(), len(LABELS)) + "_" + np.tile(np.asarray(LABELS), len(meta))
            write_csv(pd.DataFrame({ID_COL: ids, "Label": 0.5}), data / paths.SAMPLE_SUBMISSION_CSV)


def write_workspace_preds(ws: Path, emb_dim: int, seed: int, chunk: int = 65_536) -> None:
    """Five folds of OOF + test predictions (CNN-like: label signal + noise on the logit) and float16 embeddings."""
    from src import paths
    from src.atomic import write_csv, write_json

    rng = np.random.RandomState(seed + 1)
    data, out = ws / "data", ws / "oof" / EXP
    meta = pd.read_csv(paths.metadata_csv(data, "train"), dtype={ID_COL: str})
    test = pd.read_csv(paths.metadata_csv(data, "test"), dtype={ID_COL: str})
    folds = pd.read_csv(next((ws / "folds").glob("*_k5_seed42.csv")), dtype={ID_COL: str})
    fold = folds.set_index(ID_COL)[FOLD_COL].loc[meta[ID_COL]].to_numpy()
    signal = rng.normal(size=(len(LABELS), emb_dim)).astype(np.float32)
    bank = rng.normal(size=(4096, emb_dim)).astype(np.float16)  # noise rows drawn from a bank: cheap at 2048-d

    def predict(y: np.ndarray, k: int, ids: np.ndarray, split: str) -> None:
        logit = 3.0 * (y - 0.5) - 2.0 + rng.normal(scale=1.5, size=y.shape)
        frame = pd.DataFrame(1.0 / (1.0 + np.exp(-logit)), columns=list(LABELS)).round(6)
        frame.insert(0, FOLD_COL, k)
        frame.insert(0, ID_COL, ids)
        write_csv(frame, out / f"fold{k}_{split}.csv")
        emb = np.lib.format.open_memmap(out / f"fold{k}_{split}_emb.npy", mode="w+", dtype=np.float16,
                                        shape=(len(ids), emb_dim))
        for a in range(0, len(ids), chunk):
            rows = slice(a, min(a + chunk, len(ids)))
            emb[rows] = bank[rng.randint(0, len(bank), rows.stop - a)] + (logit[rows] @ signal).astype(np.float16)
        emb.flush()
        del emb
        write_csv(frame[[ID_COL]], out / f"fold{k}_{split}_emb_ids.csv")

    y_train = meta[list(LABELS)].to_numpy(dtype=np.float64)
    for k in range(5):
        rows = fold == k
        predict(y_train[rows], k, meta[ID_COL].to_numpy()[rows], "valid")
        predict(np.zeros((len(test), len(LABELS))), k, test[ID_COL].to_numpy(), "test")
        write_json({"config": {"n_folds": 5, "data_dir": str(data)}}, out / f"fold{k}_run.json")


# ---------------------------------------------------------------- measuring


# Linux starts a child's recorded peak RSS at its parent's high-water mark (exec records the forking process's), so
# wait4 on a stage started from this process would report at least this process's own peak (1.5 GB after a bench
# rendered phantoms in it). A small launcher process starts the stage and reads its peak instead.
_LAUNCH = ("import os, subprocess, sys\np = subprocess.Popen(sys.argv[2:])\n_, status, usage = os.wait4(p.pid, 0)\n"
           "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\nsys.exit(os.waitstatus_to_exitcode(status))")


def measure(cmd: list[str], env: dict, log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS GB: the largest of the stage and its pool workers) of one stage run as its own
    process; its output goes to `log`."""
    t0 = time.perf_counter()
    rss = log.with_name(f".{log.name}.rss")
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        status = subprocess.call([sys.executable, "-c", _LAUNCH, str(rss), *cmd], cwd=ROOT, env=env, stdout=out,
                                 stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"stage failed ({' '.join(cmd[2:5])}): see {log}")
    peak = int(rss.read_text()) / 2**20  # Linux reports kB
    rss.unlink()
    return wall, peak


def stages(ws: Path, n: int, args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    py, data, oof = sys.executable, str(ws / "data"), ws / "oof"
    me = str(Path(__file__).resolve())
    stack = [py, "-m", "src.stack", "--exp", EXP, "--data", data, "--oof-root", str(oof), "--seeds", str(args.seeds),
             "--max-rounds", str(args.max_rounds), "--gru-epochs", str(args.gru_epochs),
             "--threads", str(args.stack_threads)]
    # Report, triage and submission read the CNN's five folds (the path right after training) and run before the
    # stackers, the longest stage, so that a run cut short still has them at every scale.
    report = [py, "-m", "src.evaluate.report", "--pred", str(oof / EXP), "--data", data]
    submission = ws / "submissions" / "scale.csv"
    return [
        ("metadata (bench: written, not read from DICOM)", [py, me, "--_meta", str(ws), str(n), str(args.seed)]),
        ("folds", [py, "-m", "src.data.folds", "--data", data]),
        ("predictions + embeddings (bench)", [py, me, "--_preds", str(ws), str(args.emb_dim), str(args.seed)]),
        ("report (incl. study bootstrap)", [*report, "--n-boot", str(args.n_boot)]),
        ("triage CSV", [*report, "--triage-only"]),
        ("submission", [py, "-m", "src.evaluate.submit", "--pred", str(oof / EXP), "--data", data,
                        "--out-dir", str(submission.parent), "--name", "scale"]),
        ("submission check", [py, "-m", "src.evaluate.submit", "--check", str(submission), "--sample",
                              str(ws / "data" / "stage_2_sample_submission.csv")]),
        ("stackers (LightGBM + GRU)", stack),
    ]


def run_scale(n: int, args: argparse.Namespace, root: Path) -> list[dict]:
    ws = root / f"n{n}"
    ws.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ICH_OUT": str(ws), "PYTHONPATH": str(ROOT)}
    env.pop("ICH_DATA", None)
    rows = []
    for name, cmd in stages(ws, n, args):
        if args.no_stack and name.startswith("stackers"):
            continue
        wall, peak = measure(cmd, env, ws / "stages.log")
        rows.append({"n": n, "stage": name, "seconds": round(wall, 1), "peak_gb": round(peak, 2),
                     "load_avg_1min": round(os.getloadavg()[0], 1)})
        print(f"n={n:>7}  {name:<48} {wall:8.1f} s  {peak:6.2f} GB  load {os.getloadavg()[0]:.1f}", flush=True)
    for kind in () if args.no_stack else ("lgbm", "gru"):
        metrics = json.loads((ws / "oof" / f"{EXP}_stack_{kind}" / "metrics.json").read_text())
        rows.append({"n": n, "stage": f"  of which {kind}", "seconds": metrics["seconds"], "peak_gb": None,
                     "work": metrics["work"], "caps": [args.seeds, args.max_rounds, args.gru_epochs]})
    if not args.keep:
        shutil.rmtree(ws)
    return rows


def exponents(rows: list[dict]) -> dict[str, float]:
    """Per stage: growth exponent between the two largest scales run."""
    out = {}
    for stage in dict.fromkeys(r["stage"] for r in rows):
        pts = sorted((r["n"], r["seconds"]) for r in rows if r["stage"] == stage)
        if len(pts) >= 2 and pts[-2][1] > 0 and pts[-1][1] > 0:
            (n1, t1), (n2, t2) = pts[-2:]
            out[stage] = math.log(t2 / t1) / math.log(n2 / n1)
    return out


def verdicts(rows: list[dict], slices: int, args: argparse.Namespace, threads: int) -> list[str]:
    """Goals at full N: measured there if it ran, else projected from the largest scale with its exponent."""
    exp = exponents(rows)
    lines = []

    def at_full(stage: str) -> tuple[float, str]:
        n, t = max((r["n"], r["seconds"]) for r in rows if r["stage"] == stage)  # the largest scale it ran at
        if n == slices:
            return t, "measured"
        e = max(exp.get(stage, 1.0), 1.0)
        return t * (slices / n) ** e, f"projected from n={n} with exponent {e:.2f}"

    worst_stage, worst_gb, worst_how = "", 0.0, ""
    for stage in dict.fromkeys(r["stage"] for r in rows if r["peak_gb"] is not None):
        pts = sorted((r["n"], r["peak_gb"]) for r in rows if r["stage"] == stage and r["peak_gb"] is not None)
        n, gb = pts[-1]
        if n == slices:
            at_n, how = gb, "measured"
        elif len(pts) >= 2:
            # Affine through the two largest scales: a stage's memory is a fixed part (interpreter, libraries)
            # plus a part per row; never below the largest measured.
            (n1, g1), (n2, g2) = pts[-2:]
            at_n = max(g2, g2 + (g2 - g1) / (n2 - n1) * (slices - n2))
            how = f"projected affinely from {g1:.2f} GB at n={n1} and {g2:.2f} GB at n={n2}"
        else:
            at_n, how = gb * slices / n, f"projected linearly (an upper bound) from {gb:.2f} GB at n={n}"
        if at_n > worst_gb:
            worst_stage, worst_gb, worst_how = stage, at_n, how
    lines.append(f"largest peak RSS at N={slices}: {worst_gb:.1f} GB, {worst_stage} ({worst_how}); goal <= "
                 f"{GOALS['peak_gb']:g} GB per stage: {'met' if worst_gb <= GOALS['peak_gb'] else 'missed'}")
    for stage, goal_min, key in (("stackers (LightGBM + GRU)", GOALS["stack_min"], "stack"),
                                 ("report (incl. study bootstrap)", GOALS["report_min"], "report"),
                                 ("submission", GOALS["submit_min"], "submit")):
        if not any(r["stage"] == stage for r in rows):
            continue
        t, how = at_full(stage)
        ok = t <= goal_min * 60
        lines.append(f"{key}: {t / 60:.1f} min at N={slices} ({how}); goal <= {goal_min:g} min: "
                     f"{'met' if ok else 'missed'}")
        if not ok:
            need = math.ceil(threads * t / (goal_min * 60))
            lines.append(f"  would take ~{need} cores at linear thread scaling ({t / 3600:.1f} h on {threads}), "
                         "or fewer seeds/rounds (time is linear in --seeds and in rounds/epochs trained)")
    stack_top = max((r["n"] for r in rows if r.get("work")), default=0)
    units = {r["stage"].split()[-1]: r for r in rows if r["n"] == stack_top and r.get("work")}
    if {"lgbm", "gru"} <= set(units):
        top = stack_top
        e = max(exp.get("stackers (LightGBM + GRU)", 1.0), 1.0)
        grow = (slices / top) ** e
        per_round = units["lgbm"]["seconds"] / max(units["lgbm"]["work"]["boosting_rounds"], 1) * grow
        per_epoch = units["gru"]["seconds"] / max(units["gru"]["work"]["gru_epochs"], 1) * grow
        # Defaults, none stopping early: 5 level-2 models x 5 seeds x (6 labels x 2000 rounds | 60 epochs).
        worst = 25 * (6 * 2000 * per_round + 60 * per_epoch)
        lines.append(f"stacker unit costs at N={slices} (from n={top}, exponent {e:.2f}): {per_round * 1000:.0f} s "
                     f"per 1,000 LightGBM rounds, {per_epoch:.0f} s per GRU epoch; the defaults (5 seeds, up to 2000 "
                     f"rounds and 60 epochs, early-stopped) cost at most {worst / 3600:.0f} h on {threads} threads, "
                     f"in proportion to the rounds and epochs early stopping lets run")
    caps = {tuple(r["caps"]) for r in rows if r.get("caps")}
    if any(c != (5, 2000, 60) for c in caps):
        shown = "; ".join(f"--seeds {a} --max-rounds {b} --gru-epochs {c}" for a, b, c in sorted(caps))
        lines.append(f"stackers ran with {shown}: the stacker times above are for those caps, not the defaults")
    return lines


def markdown(rows: list[dict], info: dict, lines: list[str]) -> str:
    from src.markdown import markdown_table

    scales = sorted({r["n"] for r in rows})
    exp = exponents(rows)
    table = []
    for stage in dict.fromkeys(r["stage"] for r in rows):
        row = {"stage": stage}
        for n in scales:
            hit = next((r for r in rows if r["n"] == n and r["stage"] == stage), None)
            peak = "" if hit is None or hit["peak_gb"] is None else f", {hit['peak_gb']:.2f} GB"
            row[f"n={n:,}"] = "" if hit is None else f"{hit['seconds']:.1f} s{peak}"
        row["growth exponent"] = f"{exp[stage]:.2f}" if stage in exp else ""
        table.append(row)
    loads = [r["load_avg_1min"] for r in rows if r.get("load_avg_1min") is not None] + [info["load_before"]]
    busy = "shared with other jobs" if max(loads) > info["cores"] else "not shared (load at most the core count)"
    head = (f"Machine: {info['cores']} cores ({info['cpu']}), {info['ram_gb']:.0f} GB RAM, {busy} "
            f"(1-min load average {info['load_before']:.1f} before the run, {max(loads):.1f} at most, per stage in "
            "scale.json); "
            f"embeddings {info['emb_dim']}-d float16; stackers with --seeds {info['seeds']} --max-rounds "
            f"{info['max_rounds']} --gru-epochs {info['gru_epochs']}; report --n-boot {info['n_boot']}.\n")
    return head + "\n" + markdown_table(pd.DataFrame(table)) + "\n" + "\n".join(f"- {x}" for x in lines) + "\n"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("--_meta", "--_preds"):  # a workspace step, run as its own process
        ws = Path(sys.argv[2])
        if sys.argv[1] == "--_meta":
            write_workspace_meta(ws, int(sys.argv[3]), int(sys.argv[4]))
        else:
            write_workspace_preds(ws, int(sys.argv[3]), int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=RSNA_TRAIN, help="N, the full scale (train slices)")
    parser.add_argument("--emb-dim", type=int, default=2048)
    parser.add_argument("--scales", default="16,4,1", help="divisors of N to run, smallest scale first")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per stacker model (the stack CLI's --seeds)")
    parser.add_argument("--max-rounds", type=int, default=2000, help="LightGBM rounds at most")
    parser.add_argument("--gru-epochs", type=int, default=60, help="GRU epochs at most")
    parser.add_argument("--stack-threads", type=int, default=0,
                        help="the stack CLI's --threads (0: its own rule, src/stack/threads.py)")
    parser.add_argument("--n-boot", type=int, default=1000, help="report bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="where the temporary workspaces go (default: the system temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the workspaces")
    parser.add_argument("--no-stack", action="store_true", help="every stage but the stackers")
    parser.add_argument("--out", default="scale", help="results go to work/bench/OUT.{json,md}")
    parser.add_argument("--render", action="store_true", help="rewrite work/bench/OUT.md from OUT.json, run nothing")
    parser.add_argument("--merge", nargs="*", default=[], metavar="NAME",
                        help="with --render: add the scales of work/bench/NAME.json not in OUT.json")
    parser.add_argument("--append", action="store_true", help="add to the rows already in work/bench/OUT.json "
                        "(e.g. full N without the stackers after N/16 and N/4 with them)")
    args = parser.parse_args()
    from src.atomic import write_json, write_text
    from src.paths import WORK
    from src.stack.threads import machine_threads

    divisors = [int(x) for x in args.scales.split(",")]
    info = {"cores": machine_threads(), "cpu": platform.processor() or platform.machine(),
            "ram_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
            "load_before": os.getloadavg()[0], "python": platform.python_version(), "slices": args.slices,
            "emb_dim": args.emb_dim, "seeds": args.seeds, "max_rounds": args.max_rounds,
            "gru_epochs": args.gru_epochs, "n_boot": args.n_boot, "scales": divisors,
            "stack_threads": args.stack_threads or "the stack CLI's rule"}
    root = Path(tempfile.mkdtemp(prefix="ich-scale-", dir=args.workdir))
    rows = json.loads((WORK / "bench" / f"{args.out}.json").read_text())["rows"] if args.append else []
    if args.render:  # the tables again from the saved rows, e.g. after a change to the verdicts
        saved = json.loads((WORK / "bench" / f"{args.out}.json").read_text())
        for other in args.merge:  # rows of another run of the same N (e.g. full N without the stackers)
            extra = json.loads((WORK / "bench" / f"{other}.json").read_text())
            saved["rows"] += [r for r in extra["rows"] if r["n"] not in {q["n"] for q in saved["rows"]}]
            saved["info"]["load_before"] = max(saved["info"]["load_before"], extra["info"]["load_before"])
        lines = verdicts(saved["rows"], saved["info"]["slices"], args, saved["info"]["cores"])
        write_text(markdown(saved["rows"], saved["info"], lines), WORK / "bench" / f"{args.out}.md")
        print("\n".join(lines))
        return 0
    try:
        for d in divisors:
            rows += run_scale(args.slices // d, args, root)
            lines = verdicts(rows, args.slices, args, info["cores"])
            write_json({"info": info, "rows": rows, "exponents": exponents(rows), "verdicts": lines},
                       WORK / "bench" / f"{args.out}.json")
            write_text(markdown(rows, info, lines), WORK / "bench" / f"{args.out}.md")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("\n".join(verdicts(rows, args.slices, args, info["cores"])))
    print(f"written: {WORK / 'bench' / args.out}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
