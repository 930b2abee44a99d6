"""The local triage page in a real headless Chromium: upload a study, read verdict/probabilities/strip/volume/overlays,
and bad uploads (not DICOM, two studies, too large) answered with a message while the server keeps running."""

import http.client
import io
import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile

import numpy as np
import pytest
import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from test_infer import expected_outputs, make_study, save_tiny_checkpoints

from src import paths
from src.constants import LABELS
from src.triage import ensemble
from src.triage.serve import create_app

EXP = "t_serve"
LIMIT_MB = 1.0
ARTIFACTS = paths.ROOT / "test-artifacts"
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1200,1700"]


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post_files(url: str, files: list[tuple[str, bytes]]) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for name, data in files
    ) + f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _post_oversized(url: str, n_bytes: int) -> tuple[int, dict]:
    """Announce an upload over the limit and send no body: the server must answer 413 from the headers alone.

    (Streaming the whole body races the server's early answer: it closes the socket and the client sees a broken
    pipe, which is right for the server but makes a flaky test.)"""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.putrequest("POST", parts.path)
        conn.putheader("Content-Type", "multipart/form-data; boundary=x")
        conn.putheader("Content-Length", str(n_bytes))
        conn.endheaders()
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A 6-slice study plus a text file, its true slice order, and what the 2 fold models must answer."""
    folder = tmp_path_factory.mktemp("serve") / "study"
    order = make_study(folder, seed=5)
    (folder / "notes.txt").write_text("not DICOM\n")
    ckpts = save_tiny_checkpoints([folder / f"{i}.dcm" for i in order], EXP)
    probs, vol = expected_outputs([folder / f"{i}.dcm" for i in order], ckpts)
    return folder, order, probs, vol


@pytest.fixture(scope="module")
def server(study):
    _, _, probs, _ = study
    ens = ensemble.load_ensemble(EXP)
    # Thresholds between the 2nd and 3rd highest p(any): two slices flagged, so the study is, and two overlays.
    ranked = np.sort(probs[:, LABELS.index("any")])[::-1]
    assert ranked[1] - ranked[2] > 1e-3
    ens.thresholds = ensemble.default_thresholds(0.8, float((ranked[1] + ranked[2]) / 2))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(ens, 0.8, LIMIT_MB), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    found = _chromium()
    if found is None:
        why = "no chromium + chromedriver on PATH: run scripts/install_browser.sh (Debian chromium packages)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {why}")  # a silent skip would hide a broken page
        pytest.skip(why)
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in [*CHROME_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chrome-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=found[1]))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout=60):
    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def test_page_shows_a_study_and_bad_uploads(server, browser, study, tmp_path):
    folder, order, probs, vol = study
    ARTIFACTS.mkdir(exist_ok=True)
    browser.get(server + "/")
    _wait(browser, lambda d: d.find_element(By.ID, "info").text.startswith("Model: mean of 2 CNN fold models"))

    files = sorted(str(p) for p in folder.iterdir())
    browser.find_element(By.ID, "file-input").send_keys("\n".join(files))
    _wait(browser, lambda d: d.find_element(By.ID, "result").is_displayed())
    browser.save_screenshot(str(ARTIFACTS / "serve_study.png"))

    assert browser.find_element(By.ID, "verdict").text == "ICH suspected"
    assert browser.find_element(By.ID, "source").text.startswith("Probabilities from: mean of 2 CNN fold models")
    rows = browser.find_elements(By.CSS_SELECTOR, "#probs tbody tr")
    assert [r.get_attribute("data-label") for r in rows] == list(LABELS)
    shown = [float(r.find_element(By.CSS_SELECTOR, "td.prob").text) for r in rows]
    np.testing.assert_allclose(shown, probs.max(axis=0), atol=6e-4)
    assert rows[-1].find_element(By.CSS_SELECTOR, "td.flag").text == "FLAG"

    bars = browser.find_elements(By.CSS_SELECTOR, "#strip rect.slice")
    assert [b.get_attribute("data-id") for b in bars] == order
    np.testing.assert_allclose([float(b.get_attribute("data-p")) for b in bars], probs[:, -1], atol=1e-4)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#strip rect.slice.flagged")) == 2
    assert len(browser.find_elements(By.CSS_SELECTOR, "#strip line.threshold")) == 1

    assert browser.find_element(By.ID, "volume").text == f"{vol.sum() / 1000:.2f} mL"
    images = browser.find_elements(By.CSS_SELECTOR, "#overlays img")
    top2 = {order[i] for i in np.argsort(-probs[:, -1])[:2]}
    assert {img.get_attribute("data-id") for img in images} == top2
    assert all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 256
               for img in images)
    assert "1 file(s) skipped" in browser.find_element(By.ID, "skipped-summary").get_attribute("textContent")
    # Everything the page loaded came from the local server.
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(server) for u in urls)

    # Drag and drop of a non-DICOM file: a message on the page, the results hidden.
    junk = tmp_path / "report.txt"
    junk.write_text("hello")
    browser.execute_script(
        "const i = document.createElement('input'); i.type = 'file'; i.id = 'probe'; document.body.appendChild(i);")
    browser.find_element(By.ID, "probe").send_keys(str(junk))
    browser.execute_script(
        "const dt = new DataTransfer(); for (const f of document.getElementById('probe').files) dt.items.add(f);"
        "document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));")
    error = browser.find_element(By.ID, "error")
    _wait(browser, lambda d: error.is_displayed())
    assert "no usable DICOM slices among the 1 uploaded files" in error.text and "report.txt" in error.text
    assert not browser.find_element(By.ID, "result").is_displayed()
    browser.save_screenshot(str(ARTIFACTS / "serve_bad_upload.png"))

    # Two studies at once, then a file over the limit (refused in the page before any upload).
    other = make_study(tmp_path / "other", n=3, study="ID_studyB", patient="ID_patB", seed=9)
    both = [str(folder / f"{order[0]}.dcm"), *(str(tmp_path / "other" / f"{i}.dcm") for i in other)]
    browser.find_element(By.ID, "file-input").send_keys("\n".join(both))
    _wait(browser, lambda d: "holds 2 studies" in error.text)
    big = tmp_path / "big.dcm"
    big.write_bytes(b"\0" * int(1.5 * LIMIT_MB * (1 << 20)))
    browser.find_element(By.ID, "file-input").send_keys(str(big))
    _wait(browser, lambda d: "more than the 1 MB limit" in error.text)


def test_api_refuses_bad_uploads_and_keeps_running(server, study):
    folder, order, probs, _ = study
    url = server + "/api/predict"
    status, body = _post_oversized(url, int(1.5 * LIMIT_MB * (1 << 20)))
    assert status == 413 and "limit" in body["error"]
    status, body = _post_files(url, [])
    assert status == 400 and "no files received" in body["error"]
    status, body = _post_files(url, [("x.dcm", b"DICM but not really")])
    assert status == 400 and body["skipped"][0]["path"] == "x.dcm"
    good = [(f"{i}.dcm", (folder / f"{i}.dcm").read_bytes()) for i in order[::-1]]
    status, body = _post_files(url, good)
    assert status == 200 and [s["ID"] for s in body["slices"]] == order
    np.testing.assert_allclose(body["probabilities"]["any"], probs[:, -1].max(), atol=1e-5)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in good:
            zf.writestr(f"study/{name}", data)
    status, body = _post_files(url, [("study.zip", archive.getvalue())])
    assert status == 200 and [s["ID"] for s in body["slices"]] == order and body["skipped"] == []
    with urllib.request.urlopen(server + "/api/info", timeout=10) as r:
        assert r.status == 200 and "default-src 'self'" in r.headers["Content-Security-Policy"]
        assert "no stacker" in json.loads(r.read())["probabilities_from"]
