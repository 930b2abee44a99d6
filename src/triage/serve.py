"""Local triage web page on 127.0.0.1: drop a study's DICOM files, see verdict, probabilities, volume, overlays."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import tempfile
import threading
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from src.config import TriageConfig
from src.constants import LABELS, STUDY
from src.errors import InputError, run_cli
from src.stack.bundle import KINDS
from src.stage_settings import parse_with_section
from src.triage.ensemble import DEFAULT_PRECISION, DEFAULT_STACKER, Ensemble, check_stacker, load_ensemble
from src.triage.inputs import load_study_files
from src.triage.outputs import study_record, volume_caveat
from src.triage.predict import predict_study

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_UPLOAD_MB: float = TriageConfig.max_upload_mb
MAX_FILES = 5000
# Only this origin: scripts, styles and requests; images also from data: URLs (the overlays). Nothing external.
CSP = ("default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _display_name(name: str, tmp: Path) -> str:
    """Upload folders are tmp/f<k>/<name>: show the user the name they uploaded, not the temp path."""
    prefix = str(tmp) + "/"
    if name.startswith(prefix):
        return name[len(prefix) :].split("/", 1)[-1]
    return name


def _safe_name(name: str) -> str:
    """The browser's file name (may carry a folder path from a dropped folder) without any path component."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1].strip() or "upload"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in base)[:150]


def analyse_upload(ens: Ensemble, files: list[tuple[str, bytes]], precision: float) -> tuple[int, dict]:
    """(HTTP status, payload) for one upload of (file name, content) pairs: a study's result, or an error message."""
    with tempfile.TemporaryDirectory(prefix="ich-upload-") as tmp_dir:
        tmp = Path(tmp_dir)
        written = []
        for k, (name, content) in enumerate(files):
            folder = tmp / f"f{k}"
            folder.mkdir()
            (folder / _safe_name(name)).write_bytes(content)
            written.append(folder)
        slices, images, skipped = load_study_files(written, ens.cfg.image_size)
        skipped["path"] = [_display_name(p, tmp) for p in skipped["path"]]
    skipped_list = skipped.to_dict(orient="records")
    if slices.empty:
        return 400, {"error": f"no usable DICOM slices among the {len(files)} uploaded files "
                              f"(first problem: {skipped_list[0]['path']}: {skipped_list[0]['reason']})",
                     "skipped": skipped_list}
    studies = sorted(slices[STUDY].unique())
    if len(studies) > 1:
        counts = slices[STUDY].value_counts()
        listing = ", ".join(f"{s or '(no StudyInstanceUID)'} ({counts[s]} slices)" for s in studies[:5])
        return 400, {"error": f"the upload holds {len(studies)} studies: {listing}; drop the files of one study at a "
                              "time", "skipped": skipped_list}
    result = predict_study(ens, slices, images, precision)
    payload = study_record(result)
    for rec, ov in zip(payload["overlays"], result["overlays"]):
        rec["src"] = "data:image/png;base64," + base64.b64encode(ov["png"]).decode("ascii")
    point = (ens.thresholds["levels"].get("slice", {}).get("any", {}).get(f"{precision:g}") or {})
    payload["slice_threshold_any"] = point.get("threshold")
    payload["skipped"] = skipped_list
    payload["volume_caveat"] = volume_caveat(ens)
    return 200, payload


def create_app(ens: Ensemble, precision: float = DEFAULT_PRECISION,
               max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB) -> FastAPI:
    """The app around a loaded ensemble; uploads live in a temp folder only while they are analysed."""
    app = FastAPI(title="ICH triage", docs_url=None, redoc_url=None, openapi_url=None)
    limit = int(max_upload_mb * (1 << 20))
    lock = threading.Lock()  # one study at a time: bounds memory on a laptop

    def analyse(files: list[tuple[str, bytes]]) -> tuple[int, dict]:
        with lock:
            return analyse_upload(ens, files, precision)

    @app.middleware("http")
    async def no_external(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/info")
    def info() -> dict:
        return {"exp": ens.exp, "model": ens.describe(), "probabilities_from": ens.source(),
                "thresholds_source": ens.thresholds_source,
                "precision": precision, "labels": list(LABELS), "max_upload_mb": max_upload_mb,
                "has_volume": ens.has_seg}

    @app.post("/api/predict")
    async def predict(request: Request) -> JSONResponse:
        too_large = f"upload larger than the {max_upload_mb:g} MB limit (python -m src.triage.serve --max-upload-mb)"
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return _error(413, too_large)
        try:
            form = await request.form(max_files=MAX_FILES, max_fields=100)
        except Exception as err:  # a malformed multipart body, too many parts: the message says which
            return _error(400, f"could not read the upload: {err}")
        try:
            uploads = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
            files, total = [], 0
            for up in uploads:
                content = await up.read()
                total += len(content)
                if total > limit:  # chunked uploads carry no Content-Length
                    return _error(413, too_large)
                files.append((up.filename or "upload", content))
        finally:
            await form.close()
        if not files or total == 0:
            return _error(400, "no files received: drop the DICOM files (or a folder or zip) of one study")
        try:
            status, payload = await run_in_threadpool(analyse, files)
        except InputError as err:
            return _error(400, str(err))
        return JSONResponse(payload, status_code=status)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m src.triage.serve", description=__doc__)
    parser.add_argument("--exp", help="experiment under work/models/ (default: the one with the newest checkpoint)")
    # Defaults from the config's `triage` section (--config F / --set triage.key=v); these flags override it.
    parser.add_argument("--port", type=int)
    parser.add_argument("--threshold-precision", type=float)
    parser.add_argument("--max-upload-mb", type=float, help="refuse larger uploads")
    parser.add_argument("--stacker", choices=[*KINDS, "none"],
                        help=f"saved level-2 stacker after the CNN folds (default: {DEFAULT_STACKER} when saved)")
    # The page predicts with predict_study's own batch size and the validation's TTA: those keys are the CLI's.
    args, cfg = parse_with_section(parser, argv, "triage", not_here=("batch_size", "no_tta"))
    check_stacker(args.stacker)
    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port}: not a TCP port")
    ens = load_ensemble(args.exp, args.threshold_precision, args.stacker or None)
    print(f"settings: {json.dumps(dataclasses.asdict(cfg.triage))}")
    print(f"model: {ens.describe()}\nprobabilities: {ens.source()}\nflags: {ens.thresholds_source}")
    print(f"open http://127.0.0.1:{args.port}/ (this machine only; uploads never leave it)")
    # Loopback only: the page and the uploaded studies are never reachable from another machine.
    uvicorn.run(create_app(ens, args.threshold_precision, args.max_upload_mb), host="127.0.0.1", port=args.port,
                log_level="warning")
    return 0


if __name__ == "__main__":
    run_cli(main)
