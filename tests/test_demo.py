"""demo.py as people and programs use it: one `--random-init` server per module, called through its API with
gradio_client and driven in headless Chromium (Debian's chromium + chromium-driver; a missing browser FAILS).

Run as a script to refresh the README's screenshot through the same browser code path:
  python tests/test_demo.py docs/demo.png
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO.parent / "shared" / "demo"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1500")
START_TIMEOUT, RUN_TIMEOUT = 240, 240  # seconds: server start (jax import + tiny models), one run incl. compiling
W, H, STEPS = 128, 64, 4  # small, non-square: the API tests compile one shape


@contextlib.contextmanager
def demo_server(log_path: Path):
    """`python demo.py --random-init --examples ../shared/demo` on a free localhost port; yields its URL; always
    killed afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "demo.py"), "--random-init", "--examples", str(EXAMPLES),
                                 "--host", "127.0.0.1", "--port", str(port)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"demo.py exited with {proc.returncode}:\n{log_path.read_text()}")
            if time.time() > deadline:
                raise RuntimeError(f"demo.py did not serve {url} within {START_TIMEOUT} s:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo") / "demo.log"


@pytest.fixture(scope="module")
def server(server_log):
    with demo_server(server_log) as url:
        yield url


def test_the_server_says_where_it_serves_and_how_to_share(server, server_log):
    log = server_log.read_text()
    assert f"serving on {server.rstrip('/')} (--share for a public gradio.live link)" in log, log
    assert "share=True" not in log and "launch()" not in log, log  # gradio's own advice names no flag of ours


def test_demo_without_gradio_names_the_extra_before_loading_models(monkeypatch, capsys):
    from cnc_jax.cli import demo

    real = demo.importlib.util.find_spec
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    monkeypatch.setattr(demo, "load_pipeline", lambda args: pytest.fail("loaded the models first"))
    assert demo.main(["--random-init"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and 'pip install "cnc_jax[demo]"' in err and "Traceback" not in err, err


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def transparent_png(path: Path) -> Path:
    """An RGBA image whose left half is transparent: the demo must refuse it (and say why)."""
    rgba = np.asarray(Image.open(EXAMPLES / "247.jpg").convert("RGBA").resize((96, 96))).copy()
    rgba[:, :48, 3] = 0
    Image.fromarray(rgba).save(path)
    return path


def test_examples_fill_the_inputs(client):
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/run"]["parameters"]
    defaults = {p["parameter_name"]: p["parameter_default"] for p in params}
    assert {f: Path(defaults[f]["path"]).name for f in ("fg_image", "bg_image", "fg_emb_image", "bg_emb_image")} \
        == {"fg_image": "247.jpg", "bg_image": "239.jpg", "fg_emb_image": "104.jpg", "bg_emb_image": "324.jpg"}
    assert (defaults["width"], defaults["height"], defaults["steps"]) == (128, 128, 10)  # --random-init's
    assert defaults["prompt"] == "a robot astronaut in front of a cyberpunk train" and defaults["seed"] == -1


def call(client, seed, **overrides):
    """One /run request with the example images; returns (images, conditions, seed used, zip path, status)."""
    from gradio_client import handle_file

    args = dict(fg_image=handle_file(str(EXAMPLES / "247.jpg")), bg_image=handle_file(str(EXAMPLES / "239.jpg")),
                fg_emb_image=handle_file(str(EXAMPLES / "104.jpg")), bg_emb_image=handle_file(str(EXAMPLES / "324.jpg")),
                depth_version="v2", width=W, height=H, batch_size=2, prompt="a robot astronaut", steps=STEPS,
                seed=seed)
    args.update(overrides)
    images, conditions, seed_used, zip_path, status = client.predict(**args, api_name="/run")
    return [np.asarray(Image.open(g["image"])) for g in images], conditions, seed_used, zip_path, status


def test_api_images_conditions_zip_and_seeds(client):
    t0 = time.time()
    images, conditions, seed_used, zip_path, status = call(client, 1234)
    first_s = time.time() - t0
    assert [im.shape for im in images] == [(H, W, 3)] * 2
    assert seed_used == 1234 and "including compiling this shape" in status and "Random weights" in status
    captions = [c["caption"] for c in conditions]
    assert captions == ["foreground depth", "background depth", "foreground embedding image",
                        "background embedding image", "mask", "image grid"]
    shapes = [np.asarray(Image.open(c["image"])).shape for c in conditions]
    assert shapes[:5] == [(H, W, 3)] * 5 and shapes[5] == (H, 2 * W, 3)
    grid = np.asarray(Image.open(conditions[5]["image"]))
    np.testing.assert_array_equal(grid, np.concatenate(images, axis=1))
    emb = np.asarray(Image.open(conditions[2]["image"]))
    assert (emb[H // 3] == 255).all() and (emb[:, W // 3] == 255).all()  # the grid lines
    with zipfile.ZipFile(zip_path) as z:
        names = set(z.namelist())
        info = json.loads(z.read("job.json"))
        zipped = np.asarray(Image.open(io.BytesIO(z.read("image_001.png"))))
    assert {"image_000.png", "image_001.png", "grid.png", "fg_depth.png", "bg_depth.png", "mask.png"} <= names
    assert info["settings"]["seed"] == 1234 and info["settings"]["num_images"] == 2
    assert (info["settings"]["height"], info["settings"]["width"]) == (H, W)
    np.testing.assert_array_equal(zipped, images[1])

    t0 = time.time()
    again, _, _, _, status = call(client, 1234)
    second_s = time.time() - t0
    assert "compiling" not in status
    for a, b in zip(images, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(images[0], images[1])  # each image of a job has its own noise
    print(f"first call (compiles) {first_s:.1f} s, second {second_s:.1f} s")

    from gradio_client import handle_file
    from gradio_client.utils import Status

    # two requests at once: one waits in the queue while the other samples; both complete, neither disturbed
    jobs = [client.submit(handle_file(str(EXAMPLES / "247.jpg")), handle_file(str(EXAMPLES / "239.jpg")),
                          handle_file(str(EXAMPLES / "104.jpg")), handle_file(str(EXAMPLES / "324.jpg")), "v2",
                          1, 1, 1, 1, W, H, 2, "a robot astronaut", seed=1234, steps=STEPS, api_name="/run")
            for _ in range(2)]
    running, queued_while_running, overlap = (Status.PROCESSING, Status.PROGRESS), False, 0
    deadline = time.time() + RUN_TIMEOUT
    while not all(j.done() for j in jobs) and time.time() < deadline:
        codes = [j.status().code for j in jobs]
        overlap = overlap + 1 if all(c in running for c in codes) else 0
        assert overlap < 5, codes  # (a poll may see one job's end and the next one's start out of order)
        queued_while_running |= Status.IN_QUEUE in codes and any(c in running for c in codes)
        time.sleep(0.05)
    assert queued_while_running
    for job in jobs:
        for a, b in zip(images, job.result(timeout=RUN_TIMEOUT)[0]):
            np.testing.assert_array_equal(a, np.asarray(Image.open(b["image"])))

    other, _, seed_used, zip_path, status = call(client, -1)
    assert isinstance(seed_used, int) and 0 <= seed_used < 2 ** 31 and f"Seed {seed_used}" in status
    with zipfile.ZipFile(zip_path) as z:
        assert json.loads(z.read("job.json"))["settings"]["seed"] == seed_used
    if seed_used != 1234:
        assert not np.array_equal(other[0], images[0])


def raw_error(client, url: str, overrides: dict) -> str:
    """The error of a /run request sent as raw JSON: gradio_client cannot send NaN/inf, a browser or script can."""
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/run"]["parameters"]
    data = [overrides.get(p["parameter_name"], p["parameter_default"]) for p in params]
    request = urllib.request.Request(url + "gradio_api/call/run", data=json.dumps({"data": data}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        event = json.load(r)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/run/{event}", timeout=RUN_TIMEOUT) as r:
        text = r.read().decode()
    assert text.startswith("event: error"), text
    return json.loads(text.split("data:", 1)[1])["error"]


def test_api_bad_input_is_a_message(server, client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    cases = [({"steps": 3}, "Sampling steps: steps=3"), ({"steps": 3}, "except 3, 9, 27, 36, 37"),
             ({"width": 100, "height": 128}, "Width x Height: 100x128: both must be multiples of 64"),
             ({"fg_image": handle_file(str(transparent_png(tmp_path / "rgba.png")))},
              "Foreground Image: the image has transparent pixels")]
    for overrides, message in cases:
        with pytest.raises(AppError, match=message.replace("(", r"\(")):
            call(client, 1, **overrides)
    for field, value in (("fg_depth_control", math.nan), ("seed", math.nan), ("height", math.inf)):
        assert "expected a finite number" in raw_error(client, server, {field: value}), field
    assert "greater than maximum value 20" in raw_error(client, server, {"cfg_scale": math.inf})  # gradio's bounds
    Image.open(EXAMPLES / "239.jpg").convert("L").save(tmp_path / "gray.png")
    images, _, _, _, status = call(client, 1, bg_image=handle_file(str(tmp_path / "gray.png")), batch_size=1)
    assert len(images) == 1 and "Background Image: grayscale image converted to RGB" in status


def test_api_sampler_choice(client):
    """Another sampler takes step counts the official DDIM grid refuses, and job.json records it."""
    images, _, _, zip_path, status = call(client, 7, sampler="dpmpp_2m", steps=3, batch_size=1)
    assert [im.shape for im in images] == [(H, W, 3)]
    with zipfile.ZipFile(zip_path) as z:
        assert json.loads(z.read("job.json"))["settings"]["sampler"] == "dpmpp_2m"
    assert "3 steps" in status


def test_uploads_convert_losslessly_or_say_why():
    from cnc_jax.sampling.demo_jobs import DemoError, convert_upload

    rgb = Image.open(EXAMPLES / "247.jpg").resize((32, 32))
    assert convert_upload(rgb, "Foreground Image") == (rgb, None)
    for mode, note in (("L", "grayscale image converted"), ("P", "palette image converted")):
        out, notice = convert_upload(rgb.convert(mode), "Foreground Image")
        assert out.mode == "RGB" and note in notice
        np.testing.assert_array_equal(np.asarray(out), np.asarray(rgb.convert(mode).convert("RGB")))
    out, notice = convert_upload(rgb.convert("RGBA"), "X")  # opaque: the alpha channel carries nothing
    assert "alpha channel dropped" in notice
    np.testing.assert_array_equal(np.asarray(out), np.asarray(rgb))
    with pytest.raises(DemoError, match="X: the image has transparent pixels"):
        convert_upload(Image.open(transparent_png(Path(tempfile.mkdtemp()) / "t.png")), "X")
    with pytest.raises(DemoError, match="PIL mode CMYK"):
        convert_upload(rgb.convert("CMYK"), "X")


def test_examples_folder_fills_the_official_picks(tmp_path):
    from cnc_jax.sampling.demo_jobs import DemoError, example_images

    picks = {k: Path(v).name for k, v in example_images(str(EXAMPLES)).items()}
    assert picks == {"fg_image": "247.jpg", "bg_image": "239.jpg", "fg_emb_image": "104.jpg",
                     "bg_emb_image": "324.jpg"}
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert {k: Path(v).name for k, v in example_images(str(tmp_path)).items()} == {"fg_image": "a.jpg",
                                                                                   "bg_image": "b.png"}
    with pytest.raises(DemoError, match="no such folder"):
        example_images(str(tmp_path / "missing"))


def test_demo_without_weights_explains_conversion():
    proc = subprocess.run([sys.executable, str(REPO / "demo.py")], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "convert_torch_weights.py convert" in proc.stderr
    assert "python demo.py --random-init" in proc.stderr


def chrome():
    """Headless Debian Chromium through its chromedriver (never a downloaded browser)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            raise RuntimeError(f"{path} is missing: apt-get install chromium chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={tempfile.mkdtemp(prefix='cnc-chromium-')}",):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def browser_run(driver, url: str, fg: Path, bg: Path, batch_size: int = 2, load: bool = True):
    """As a person does it: open the page (unless it is open), upload fg and bg, set the batch size, click Run."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    if load:
        driver.get(url)
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#bg_image input[type=file]"))
    driver.find_element(By.CSS_SELECTOR, "#fg_image input[type=file]").send_keys(str(fg))
    driver.find_element(By.CSS_SELECTOR, "#bg_image input[type=file]").send_keys(str(bg))
    for field, path in (("fg_image", fg), ("bg_image", bg)):  # the page shows the upload, not the example
        wait.until(lambda d: any(im.get_attribute("src").endswith("/" + path.name)
                                 for im in d.find_elements(By.CSS_SELECTOR, f"#{field} img")))
    box = driver.find_element(By.CSS_SELECTOR, "#batch_size input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(batch_size), Keys.TAB)
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#batch_size input[type=range]").get_attribute("value")
               == str(batch_size))
    driver.find_element(By.ID, "run").click()


def gallery_images(driver) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#images .thumbnail-item img")


def screenshot_run(url: str, out: Path) -> dict:
    """A batch of 2 in the browser until both images are in the gallery; screenshot to `out`.
    Returns the seconds it took and the first texts of the progress indicator and of the notice toast."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def text(d, css):
        return " ".join(e.text for e in d.find_elements(By.CSS_SELECTOR, css))

    driver = chrome()
    try:
        t0 = time.time()
        browser_run(driver, url, EXAMPLES / "57.jpg", EXAMPLES / "224.jpg")  # not the examples it opens with
        wait = WebDriverWait(driver, RUN_TIMEOUT, poll_frequency=0.2)
        progress = wait.until(lambda d: "%" in text(d, "#images [data-testid=status-tracker]") and
                              text(d, "#images [data-testid=status-tracker]"))
        notice = wait.until(lambda d: text(d, ".toast-body"))
        wait.until(lambda d: len(gallery_images(d)) == 2)
        WebDriverWait(driver, 30).until(lambda d: all(d.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth > 0", im) for im in gallery_images(d)))
        seconds = time.time() - t0
        driver.execute_script("window.scrollTo(0, 0); "  # the compile notice has been read: out of the picture
                              "document.querySelectorAll('.toast-body').forEach(t => t.style.display = 'none')")
        time.sleep(0.5)
        driver.save_screenshot(str(out))
        return {"seconds": seconds, "progress": progress, "notice": notice}
    finally:
        driver.quit()


def test_browser_upload_run_gallery_and_error(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    shot = tmp_path / "demo.png"
    run = screenshot_run(server, shot)
    assert "compiling" in run["progress"], run  # the progress indicator, during the first run of this shape
    assert "First run of 128x128 (width x height), ddim, 10 steps: compiling" in run["notice"], run
    image = Image.open(shot)
    assert image.size[0] >= 1000 and np.asarray(image.convert("L")).std() > 10  # a rendered page, not a blank
    print(f"browser run {run['seconds']:.1f} s; screenshot {shot}")

    driver = chrome()
    try:
        driver.get(server)
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#bg_image input[type=file]"))
        shown = [driver.find_element(By.CSS_SELECTOR, f"#{f} input").get_attribute("value")
                 for f in ("size", "width", "height")]
        assert shown == ["128", "128", "128"], shown  # the Image size slider agrees with width and height
        size = driver.find_element(By.CSS_SELECTOR, "#size input[type=number]")
        size.send_keys(Keys.CONTROL, "a")
        size.send_keys("512", Keys.TAB)  # the official "Image size" slider sets width and height
        WebDriverWait(driver, 30).until(lambda d: [d.find_element(By.CSS_SELECTOR, f"#{f} input").get_attribute(
            "value") for f in ("width", "height")] == ["512", "512"])
        browser_run(driver, server, transparent_png(tmp_path / "rgba.png"), EXAMPLES / "239.jpg", batch_size=1,
                    load=False)
        WebDriverWait(driver, RUN_TIMEOUT).until(
            lambda d: "the image has transparent pixels" in d.find_element(By.TAG_NAME, "body").text)
        driver.save_screenshot(str(tmp_path / "error.png"))
        assert not gallery_images(driver)
    finally:
        driver.quit()


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "docs" / "demo.png")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, demo_server(Path(tmp) / "demo.log") as url:
        print(f"{screenshot_run(url, target)['seconds']:.1f} s -> {target}")
    Image.open(target).convert("RGB").quantize(256).save(target, optimize=True)  # a smaller PNG for the repo
