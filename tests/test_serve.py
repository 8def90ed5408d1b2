"""The OpenAI-compatible images server (dalle_jax.serve) over the tiny pipeline's workdir.

Every image a request gets is checked against the Python API drawing the same prompt and seed
alone (`Generator.__call__` / `best_of`), enlarged by repeating pixels.
"""
import base64
import contextlib
import copy
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from conftest import import_required_in_ci, required_in_ci  # noqa: E402

import_required_in_ci("fastapi", "the server needs the serve extra: pip install -e '.[serve]'")
import uvicorn  # noqa: E402

from dalle_jax.sampling.outputs import to_pixels  # noqa: E402
from dalle_jax.serving.api import make_app  # noqa: E402
from dalle_jax.serving.images import ImageRequest, ImageService  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a red circle above a blue square"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(service, **app_options):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(service, **app_options), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def service(pipeline_run):
    service = ImageService.from_workdir(pipeline_run, batch_size=4, max_waiting=16)
    yield service
    service.close()


@pytest.fixture(scope="module")
def server(service):
    with serving(service, max_body_bytes=4096) as url:
        yield url


def pixels_of(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def expected(service, prompt, n, seed, size, guidance=1.0) -> list[np.ndarray]:
    """What the Python API draws for (prompt, seed) alone, each pixel repeated to `size`."""
    images = to_pixels(service.generator(prompt, n, seed, guidance=guidance))
    factor = size // images.shape[1]
    return [image.repeat(factor, axis=0).repeat(factor, axis=1) for image in images]


def post(url, body, headers=None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/v1/images/generations", data=data, method="POST",
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def fetch(url) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        assert response.headers["Content-Type"] == "image/png"
        return response.read()


def test_openai_client_gets_urls_of_the_images_the_python_api_draws(service, server):
    openai = import_required_in_ci("openai", "the openai client is not installed (test extra)")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    answer = client.images.generate(prompt=PROMPT, n=2, size="256x256",
                                    extra_body={"seed": 11})
    assert len(answer.data) == 2 and answer.created > 0
    for got, want in zip(answer.data, expected(service, PROMPT, 2, 11, 256)):
        assert got.url.startswith(f"{server}/v1/images/files/")
        np.testing.assert_array_equal(pixels_of(fetch(got.url)), want)


def test_openai_client_gets_base64_images_with_guidance(service, server):
    openai = import_required_in_ci("openai", "the openai client is not installed (test extra)")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    answer = client.images.generate(prompt="a green triangle", n=3, size="32x32",
                                    response_format="b64_json",
                                    extra_body={"seed": 5, "guidance": 2.5})
    want = expected(service, "a green triangle", 3, 5, 32, guidance=2.5)
    got = [pixels_of(base64.b64decode(image.b64_json)) for image in answer.data]
    np.testing.assert_array_equal(np.stack(got), np.stack(want))


def test_the_legacy_openai_image_create_request(service, server):
    # What openai<1 sends for openai.Image.create(prompt=..., n=1, size="256x256") with
    # api_base = the server's /v1; it then reads response["data"][0]["url"].
    status, answer = post(server, {"prompt": PROMPT, "n": 1, "size": "256x256"}, headers={
        "Authorization": "Bearer sk-unused", "User-Agent": "OpenAI/v1 PythonBindings/0.28.1",
        "X-OpenAI-Client-User-Agent": json.dumps({"bindings_version": "0.28.1",
                                                  "httplib": "requests", "lang": "python",
                                                  "publisher": "openai"})})
    assert status == 200, answer
    png = fetch(answer["data"][0]["url"])
    np.testing.assert_array_equal(pixels_of(png),
                                  expected(service, PROMPT, 1, answer["seed"], 256)[0])


def test_reranked_requests_keep_clips_best_candidates(service, server):
    status, answer = post(server, {"prompt": PROMPT, "n": 2, "rerank": 4, "seed": 3,
                                   "size": "32x32", "response_format": "b64_json"})
    assert status == 200, answer
    best = service.generator.best_of(PROMPT, candidates=4, keep=2, seed=3)
    got = [pixels_of(base64.b64decode(d["b64_json"])) for d in answer["data"]]
    np.testing.assert_array_equal(np.stack(got), to_pixels(best.images))


@contextlib.contextmanager
def gated(batcher):
    """Holds the batcher's batches until the block exits, so requests pile up meanwhile;
    yields a list that gets the row count of each batch reaching the gate."""
    gate, held, original = threading.Event(), [], batcher.run_batch

    def run_batch(group, rows):
        held.append(len(rows))
        gate.wait(timeout=600)
        return original(group, rows)

    batcher.run_batch = run_batch
    try:
        yield held
    finally:
        gate.set()
        batcher.run_batch = original


def wait_for(condition, what: str, seconds: float = 300):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_concurrent_requests_share_batches_and_one_compilation(service, server):
    compiled = service.generator.compilations
    requests = [{"prompt": p, "n": 1, "seed": s, "size": "32x32", "response_format": "b64_json"}
                for p, s in [("a red circle", 1), ("a blue square", 2), ("a green circle", 3),
                             ("a red triangle", 4), ("a blue circle", 5), ("a red square", 6)]]
    answers = [None] * len(requests)
    before = service.batcher.batches_run

    def send(i):
        answers[i] = post(server, requests[i])

    with gated(service.batcher) as held:
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        # The first batch is held at the gate with the requests that had arrived when it
        # formed (usually 1, more on a loaded machine); the others wait.
        wait_for(lambda: held and held[0] + service.batcher.waiting == len(requests),
                 "the requests to queue")
    for thread in threads:
        thread.join(timeout=120)
    # The held rows, then the rest in batches of 4: 3 calls for 6 requests when 1 was held.
    assert 1 <= held[0] <= 4
    assert service.batcher.batches_run - before == 1 + math.ceil((len(requests) - held[0]) / 4)
    for request, (status, answer) in zip(requests, answers):
        assert status == 200, answer
        want = expected(service, request["prompt"], 1, request["seed"], 32)[0]
        np.testing.assert_array_equal(pixels_of(base64.b64decode(answer["data"][0]["b64_json"])),
                                      want)
    # At most the first batch compiled (none when an earlier test warmed the
    # sampler); other prompts, seeds, sizes and counts never compile a new one.
    assert service.generator.compilations - compiled <= 1
    compiled = service.generator.compilations
    post(server, {"prompt": "a red circle", "n": 5, "seed": 9, "size": "512x512"})
    assert service.generator.compilations == compiled


@pytest.mark.parametrize("body, param, words", [
    ({"n": 1}, "prompt", "prompt is required"),
    ({"prompt": "   "}, "prompt", "prompt is empty"),
    ({"prompt": " ".join(["red circle"] * 40)}, "prompt", "tokens"),
    ({"prompt": PROMPT, "n": 0}, "n", "between 1 and 10"),
    ({"prompt": PROMPT, "n": 11}, "n", "between 1 and 10"),
    ({"prompt": PROMPT, "n": "two"}, "n", "integer"),
    ({"prompt": PROMPT, "size": "300x300"}, "size", "not one of 32x32, 256x256"),
    ({"prompt": PROMPT, "response_format": "jpeg"}, "response_format", "url"),
    ({"prompt": PROMPT, "seed": -1}, "seed", "between 0"),
    ({"prompt": PROMPT, "guidance": -2}, "guidance", "between 0"),
    ({"prompt": PROMPT, "n": 3, "rerank": 2}, "rerank", "between n=3"),
    ({"prompt": PROMPT, "rerank": -4}, "rerank", "must be >= 0"),
    ({"prompt": PROMPT, "colour": "red"}, "colour", "unknown field"),
    ({"prompt": 5}, "prompt", "valid string"),
    ({"prompt": ["a red circle"]}, "prompt", "valid string"),
    ({"prompt": PROMPT, "guidance": "strong"}, "guidance", "valid number"),
    ({"prompt": PROMPT, "seed": 1.5}, "seed", "integer"),
    ({"prompt": "\t\n "}, "prompt", "prompt is empty"),
    ({"prompt": "🎨 " * 30}, "prompt", "tokens"),  # 30 unknown words: too long
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, param, words):
    status, answer = post(server, body)
    assert status == 400
    assert answer["error"]["param"] == param
    assert words in answer["error"]["message"]
    assert answer["error"]["type"] == "invalid_request_error"
    status, answer = post(server, {"prompt": PROMPT, "size": "32x32", "seed": 0})
    assert status == 200 and len(answer["data"]) == 1


@pytest.mark.parametrize("prompt", ["un cercle — très", "a red circle 🎨✨", "круг", "赤い丸"])
def test_non_ascii_prompts_draw_what_the_python_api_draws(service, server, prompt):
    """Letters the caption tokenizer never saw become its unknown token, as in the Python API."""
    status, answer = post(server, {"prompt": prompt, "n": 1, "size": "32x32", "seed": 4,
                                   "response_format": "b64_json"})
    assert status == 200, answer
    assert answer["data"][0]["revised_prompt"] == prompt
    np.testing.assert_array_equal(pixels_of(base64.b64decode(answer["data"][0]["b64_json"])),
                                  expected(service, prompt, 1, 4, 32)[0])


def test_a_client_that_disconnects_mid_request_does_not_stop_the_others(service, server):
    port = int(server.rsplit(":", 1)[1])
    body = json.dumps({"prompt": PROMPT, "n": 4, "size": "32x32", "seed": 8}).encode()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
            connection.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Type: application/json\r\n"
                               + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        # closed before the answer
    status, answer = post(server, {"prompt": PROMPT, "n": 1, "size": "32x32", "seed": 3,
                                   "response_format": "b64_json"})
    assert status == 200, answer
    np.testing.assert_array_equal(pixels_of(base64.b64decode(answer["data"][0]["b64_json"])),
                                  expected(service, PROMPT, 1, 3, 32)[0])
    deadline = time.time() + 60  # the abandoned requests are drawn and dropped, not stuck
    while service.batcher.waiting and time.time() < deadline:
        time.sleep(0.1)
    assert service.batcher.waiting == 0


def test_the_image_store_keeps_the_newest_images_and_names_expired_ones(service):
    with serving(service, stored_images=2) as url:
        urls = []
        for seed in range(3):
            status, answer = post(url, {"prompt": PROMPT, "n": 1, "size": "32x32", "seed": seed})
            assert status == 200, answer
            urls.append(answer["data"][0]["url"])
        with pytest.raises(urllib.error.HTTPError) as expired:
            fetch(urls[0])
        assert expired.value.code == 404
        assert "images expire after the newest 2" in json.load(expired.value)["error"]["message"]
        for seed, kept in zip((1, 2), urls[1:]):
            np.testing.assert_array_equal(pixels_of(fetch(kept)),
                                          expected(service, PROMPT, 1, seed, 32)[0])


def test_openai_client_raises_bad_request_with_the_servers_message(server):
    openai = import_required_in_ci("openai", "the openai client is not installed (test extra)")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="n=20 must be between 1 and 10"):
        client.images.generate(prompt=PROMPT, n=20, size="256x256")


def test_oversize_and_malformed_bodies(server):
    status, answer = post(server, {"prompt": "a" * 5000})
    assert status == 413 and answer["error"]["code"] == "request_too_large"
    # Chunked, with no Content-Length to refuse up front: counted as it streams in.
    httpx = import_required_in_ci("httpx", "httpx is not installed (test extra)")
    chunks = (b"x" * 1024 for _ in range(8))
    response = httpx.post(f"{server}/v1/images/generations", content=chunks,
                          headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 413
    status, answer = post(server, b"{not json")
    assert status == 400 and "error" in answer
    status, answer = post(server, [1, 2])
    assert status == 400 and "error" in answer
    with pytest.raises(urllib.error.HTTPError) as missing:
        fetch(f"{server}/v1/images/files/nothing.png")
    assert missing.value.code == 404


def test_a_full_queue_answers_429(service):
    busy = ImageService(service.generator, max_waiting=1)
    body = {"prompt": PROMPT, "size": "32x32", "seed": 0}
    answers = []
    send = lambda: answers.append(post(url, body))  # noqa: E731
    try:
        with serving(busy) as url:
            with gated(busy.batcher) as held:
                first = threading.Thread(target=send)
                first.start()
                wait_for(lambda: held, "the first request to be drawn")  # so it no longer waits
                second = threading.Thread(target=send)
                second.start()
                wait_for(lambda: busy.batcher.waiting == 1, "the second request to queue")
                status, answer = post(url, body)
                assert status == 429, answer
                assert answer["error"]["code"] == "rate_limit_exceeded"
            first.join(timeout=120)
            second.join(timeout=120)
        assert [status for status, _ in answers] == [200, 200]
    finally:
        busy.close()


def test_service_checks_requests_before_queueing(service):
    from dalle_jax.serving.images import RequestError

    with pytest.raises(RequestError, match="size '64x64' is not one of"):
        service.generate(ImageRequest(prompt=PROMPT, size="64x64"))
    assert service.describe()["sizes"] == ["32x32", "256x256", "512x512", "1024x1024"]
    without_clip = copy.copy(service.generator)
    without_clip.scorer = None
    plain = ImageService(without_clip)
    try:
        with pytest.raises(RequestError, match="rerank needs a CLIP model"):
            plain.submit(ImageRequest(prompt=PROMPT, n=1, rerank=4))
        assert plain.describe()["rerank"] is False
    finally:
        plain.close()


def _browser():
    webdriver = import_required_in_ci("selenium.webdriver", "selenium is not installed")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        required_in_ci("no headless browser: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))


def test_web_page_draws_images_in_a_real_browser(service, server):
    """The page shows, for each image, the pixels the Python API draws for its seed."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    try:
        browser.get(f"{server}/")
        WebDriverWait(browser, 30).until(
            lambda b: "32×32" in b.find_element(By.ID, "status").text)
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("a blue square")
        count = browser.find_element(By.ID, "n")
        count.clear()
        count.send_keys("3")
        browser.find_element(By.ID, "draw").click()
        WebDriverWait(browser, 120).until(
            lambda b: len(b.find_elements(By.CSS_SELECTOR, "img.drawn")) == 3
            and not b.find_element(By.ID, "draw").get_attribute("disabled"))
        guidance = float(browser.find_element(By.ID, "guidance").get_attribute("value"))
        figures = browser.find_elements(By.CSS_SELECTOR, "figure")
        seeds = []
        for figure in figures:
            image = figure.find_element(By.CSS_SELECTOR, "img.drawn")
            assert browser.execute_script("return arguments[0].naturalWidth", image) == 32
            source = image.get_attribute("src")
            assert source.startswith("data:image/png;base64,")
            seeds.append(int(figure.find_element(By.TAG_NAME, "figcaption").text.split()[-1]))
            want = expected(service, "a blue square", 1, seeds[-1], 32, guidance=guidance)[0]
            np.testing.assert_array_equal(pixels_of(base64.b64decode(source.split(",", 1)[1])),
                                          want)
        assert len(set(seeds)) == 3
        assert browser.find_element(By.ID, "error").text == ""
        # A request the server refuses shows the server's message on the page.
        guidance = browser.find_element(By.ID, "guidance")
        guidance.clear()
        guidance.send_keys("50")
        browser.find_element(By.ID, "draw").click()
        WebDriverWait(browser, 60).until(
            lambda b: "guidance=50.0 must be between 0 and 20.0"
            in b.find_element(By.ID, "error").text)
        assert browser.find_elements(By.CSS_SELECTOR, "img.drawn") == []
    finally:
        browser.quit()


def test_serve_command_answers_and_stops_on_sigterm(pipeline_run, service):
    openai = import_required_in_ci("openai", "the openai client is not installed (test extra)")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "dalle_jax.serve", f"--workdir={pipeline_run}",
         f"--port={port}", "--batch_size=2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("serving on"):
                break
        assert lines and lines[-1].startswith(f"serving on http://127.0.0.1:{port}/"), lines
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        answer = client.images.generate(prompt=PROMPT, n=1, size="256x256",
                                        extra_body={"seed": 21})
        np.testing.assert_array_equal(pixels_of(fetch(answer.data[0].url)),
                                      expected(service, PROMPT, 1, 21, 256)[0])
        # SIGTERM with requests in flight: they are answered, then the server stops.
        url = f"http://127.0.0.1:{port}"
        answers = [None] * 3

        def ask(index):
            answers[index] = post(url, {"prompt": PROMPT, "n": 4, "size": "32x32",
                                        "seed": 30 + index, "response_format": "b64_json"})

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        deadline = time.time() + 30
        while json.load(urllib.request.urlopen(f"{url}/health"))["waiting"] == 0:
            assert time.time() < deadline, "the requests never queued"
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=120)
        for index, (status, body) in enumerate(answers):
            assert status == 200, body
            got = [pixels_of(base64.b64decode(item["b64_json"])) for item in body["data"]]
            np.testing.assert_array_equal(np.stack(got),
                                          np.stack(expected(service, PROMPT, 4, 30 + index, 32)))
        assert process.wait(timeout=60) == 0
        with pytest.raises(urllib.error.URLError):  # nothing listens any more
            post(url, {"prompt": PROMPT})
    finally:
        process.kill()
        process.wait()


def test_serve_command_names_a_missing_workdir(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dalle_jax.serve",
                             f"--workdir={tmp_path}/nothing"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode != 0
    assert "is neither a pipeline workdir" in result.stderr
