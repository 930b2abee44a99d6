"""Every real and crafted DICOM through every reader against pydicom's modality LUT: a table and a one-line total.

python bench/dicom_corpus.py [--cuts 10] [--quiet]
Files: pydicom's test files and the pydicom-data package (real), edited copies and non-DICOM files named .dcm
(crafted), and every real file cut at --cuts offsets plus around its PixelData header (truncated).
Per reader: exact | close (within 1 grey level, resized) | read (header accepted) | refused | WRONG | ERROR.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

from dicom_corpus import READERS, crafted, real_files, reference, run_readers, truncation_offsets, verdict  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuts", type=int, default=10, help="evenly spread truncation offsets per real file")
    parser.add_argument("--quiet", action="store_true", help="only the failures and the total")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    totals: Counter = Counter()
    print(f"{'file':58s} {'syntax':28s} {'photometric':13s} {'bits':6s} " + " ".join(f"{r:9s}" for r in READERS))

    def show(name: str, path: Path, ref_of, origin: str) -> None:
        ref = ref_of
        outcomes = run_readers(path, ref)
        result = verdict(outcomes)
        totals[result] += 1
        totals[origin] += 1
        if args.quiet and result != "other":
            return
        cells = " ".join(f"{o.kind:9s}" for o in outcomes.values())
        notes = "; ".join(f"{r}: {o.detail}" for r, o in outcomes.items() if o.kind in ("WRONG", "ERROR", "close"))
        reason = next((o.detail for o in outcomes.values() if o.kind == "refused"), "")
        print(f"{name[:58]:58s} {ref.syntax[:28]:28s} {ref.photometric[:13]:13s} {ref.bits:6s} {cells} "
              f"{notes or reason[:90]}")  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for path in real_files():
            ref = reference(path)
            show(path.name, path, ref, "real")
            data = path.read_bytes()
            for cut in truncation_offsets(data, args.cuts):
                cut_path = tmp / f"cut_{path.stem}.dcm"
                cut_path.write_bytes(data[:cut])
                # A cut file must give the original's pixels or be refused: the reference is the original's.
                show(f"{path.name} cut at {cut}/{len(data)}", cut_path, ref, "truncated")
        (tmp / "crafted").mkdir()
        for name, path in crafted(tmp / "crafted"):
            show(name, path, reference(path) if path.is_file() else reference(Path("/nonexistent")), "crafted")
    n = totals["read"] + totals["refused"] + totals["other"]
    print(f"\n{n} files ({totals['real']} real, {totals['crafted']} crafted, {totals['truncated']} truncated): "
          f"{totals['read']} read exactly, {totals['refused']} refused with a one-line reason, "
          f"{totals['other']} any other outcome  [{time.perf_counter() - start:.0f} s]")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
