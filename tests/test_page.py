"""The page at ``GET /ui``: its files as served (in-process), then the page itself in a real
headless Chromium (Debian's ``chromium``, driven by Playwright, which downloads no browser of
its own) against a real ``bentoml serve``.

The browser test uploads two real photos and one text file renamed ``.jpg`` with the page's
keyboard-operated picker, checks that every rendered label and percentage equals what
``POST /classify`` answers for the same bytes (the page itself sends ``/classify_batch``), that
the text file's card shows the server's error, that the page then still takes images (dropped
this time, and split when over the body limit together), that it fits a phone-wide screen, and
that every request it made went to the server it came from. The screenshot is
written to ``tests/artifacts/page.png`` (not in git).
"""

from __future__ import annotations

import asyncio
import html.parser
import os
import re
import shutil
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from bench.launch import REPO_ROOT, bentoml_serve_command, free_port, running_server
from serving.page import PAGE_PATH, PageMiddleware, static_files
from tests.export_helpers import peaky_model, write_checkpoint
from tests.helpers import repo_env, run_module

STATIC = REPO_ROOT / "serving" / "static"
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
PHOTOS = REPO_ROOT.parent / "shared" / "data" / "photos"
# Labels a page must show as text, never as markup (a rendered <img> would also be a request).
CLASSES = [
    'tench <img src="http://192.0.2.1/x.png">',
    "English springer",
    "cassette player",
    "chain saw",
    "church",
    "French horn",
    "garbage truck",
    "gas & <b>pump</b>",
    "golf ball",
    "parachute",
]
WAIT_MS = 120_000  # for any one step of the browser test
MAX_BODY_BYTES = 350_000  # the server's limit: over two of the photos together, not over one


# ---------------------------------------------------------------- the files, in-process


class InProcess:
    """HTTP to an ASGI app in this process (httpx's ASGI transport), one call at a time."""

    def __init__(self, app) -> None:
        self.app = app

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
                return await client.request(method, path, **kwargs)

        return asyncio.run(call())

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def head(self, path: str) -> httpx.Response:
        return self.request("HEAD", path)


@pytest.fixture(scope="module")
def client() -> InProcess:
    async def elsewhere(_request) -> PlainTextResponse:
        return PlainTextResponse("the service")

    app = Starlette(routes=[Route("/{path:path}", elsewhere, methods=["GET", "POST"])])
    return InProcess(PageMiddleware(app))


def test_the_page_is_served_at_ui_with_a_strict_policy(client) -> None:
    response = client.get(PAGE_PATH, follow_redirects=False)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.content == (STATIC / "index.html").read_bytes()
    policy = dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'"
    for kind in ("script-src", "style-src", "connect-src"):
        assert policy[kind] == "'self'"
    assert "http" not in policy["img-src"]


@pytest.mark.parametrize(("name", "media_type"), [("page.js", "text/javascript"), ("page.css", "text/css")])
def test_its_files_are_served_under_ui(client, name, media_type) -> None:
    response = client.get(f"{PAGE_PATH}/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] == media_type
    assert response.content == (STATIC / name).read_bytes()
    head = client.head(f"{PAGE_PATH}/{name}")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(response.content))


def test_trailing_slash_goes_to_the_page(client) -> None:
    response = client.get(PAGE_PATH + "/", follow_redirects=False)
    assert response.status_code == 308
    assert response.headers["location"] == PAGE_PATH


@pytest.mark.parametrize(
    ("method", "path", "status", "words"),
    [
        ("GET", "/ui/absent.js", 404, "no such file"),
        ("GET", "/ui/static/page.js", 404, "no such file"),
        ("POST", "/ui", 405, "only answers GET"),
    ],
)
def test_bad_page_requests_get_json_errors(client, method, path, status, words) -> None:
    response = client.request(method, path)
    assert response.status_code == status
    assert words in response.json()["error"]


@pytest.mark.parametrize("path", ["/", "/classify", "/uix", "/model"])
def test_other_paths_reach_the_service(client, path) -> None:
    assert client.get(path).text == "the service"


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href", "action") and value is not None]


def test_the_page_refers_to_nothing_outside_its_server() -> None:
    parser = _Links()
    parser.feed((STATIC / "index.html").read_text())
    assert parser.urls  # the parser sees the page's links
    for url in parser.urls:
        assert url == "data:," or not (urlsplit(url).scheme or url.startswith("//")), url
    for name in ("page.js", "page.css"):
        text = (STATIC / name).read_text()
        assert not re.search(r"https?:|//[\w.-]+\.[a-z]|@import|url\(", text), f"{name} refers outside"


def test_the_page_files_ship_with_the_package_the_bento_and_the_image() -> None:
    shipped = set(static_files())
    assert shipped == {p.name for p in STATIC.iterdir()} == {"index.html", "page.js", "page.css"}
    paths = [Path("serving/static", name) for name in shipped]

    def covered(patterns: list[str], path: Path) -> bool:
        return any(path.match(p) or p.endswith("/") and path.as_posix().startswith(p) for p in patterns)

    package_data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert all(covered([f"serving/{glob}" for glob in package_data["serving"]], path) for path in paths)
    assert all(covered(yaml.safe_load((REPO_ROOT / "bentofile.yaml").read_text())["include"], path) for path in paths)
    copies = re.findall(r"^COPY --chown=\S+ (.+) \S+$", (REPO_ROOT / "Dockerfile").read_text(), flags=re.MULTILINE)
    assert all(covered([source for line in copies for source in line.split()], path) for path in paths)
    allowed = [line[1:] for line in (REPO_ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    assert all(covered(allowed, path) for path in paths)


# ---------------------------------------------------------------- in a real browser


def find_chromium() -> str:
    """Debian's Chromium; outside CI a missing one skips, in CI (``CI`` set) it fails."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    reason = "no Chromium found (install Debian's `chromium`: apt-get install chromium; .ci/run does)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> dict:
    """A 10-class VGG-A exported into a fresh BentoML home and served by ``bentoml serve``."""
    root = tmp_path_factory.mktemp("page")
    env = repo_env(BENTOML_HOME=str(root / "bentoml"))
    checkpoint = write_checkpoint(root / "best.pt", peaky_model(num_classes=len(CLASSES)), classes=CLASSES)
    result = run_module("export", "--checkpoint", str(checkpoint), "--tta", "center", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    port = free_port()
    log_path = root / "server.log"
    env["VGG_MAX_BODY_BYTES"] = str(MAX_BODY_BYTES)
    with running_server(bentoml_serve_command(port), port=port, env=env, log_path=log_path) as (url, _):
        with httpx.Client(base_url=url, timeout=60.0) as http:
            yield {"url": url, "http": http, "log": log_path}


@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (a test extra) is not installed")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def rendered_cards(page) -> list[dict]:
    """What each card shows: file name, status line, and its (label, percentage) rows."""
    return page.eval_on_selector_all(
        "#results > li",
        """cards => cards.map(card => ({
        name: card.querySelector('.name').textContent,
        status: card.querySelector('.status').textContent,
        failed: card.classList.contains('failed'),
        rows: [...card.querySelectorAll('.top li')].map(row => [
            row.querySelector('.label').textContent, row.querySelector('.pct').textContent]),
    }))""",
    )


def assert_card_shows(card: dict, answer: dict) -> None:
    assert not card["failed"], card
    assert [label for label, _ in card["rows"]] == [entry["label"] for entry in answer["top"]]
    for (_, shown), entry in zip(card["rows"], answer["top"], strict=True):
        value = float(shown.removesuffix(" %"))
        assert abs(value - 100 * entry["score"]) <= 0.05 + 1e-9, (shown, entry)


def wait_until_settled(page, count: int) -> None:
    page.wait_for_function(
        "n => document.querySelectorAll('#results > li[aria-busy=\"false\"]').length === n",
        arg=count,
        timeout=WAIT_MS,
    )


def drop_files(page, paths: list[Path]) -> None:
    """Drag and drop of files onto the page, as the browser delivers them."""
    transfer = page.evaluate_handle(
        """files => {
            const transfer = new DataTransfer();
            for (const [name, bytes] of files) {
                transfer.items.add(new File([new Uint8Array(bytes)], name, { type: 'image/jpeg' }));
            }
            return transfer;
        }""",
        [[path.name, list(path.read_bytes())] for path in paths],
    )
    for event in ("dragenter", "dragover", "drop"):
        page.dispatch_event("body", event, {"dataTransfer": transfer})


@pytest.mark.slow
def test_page_in_chromium(server, browser, tmp_path) -> None:
    photos = [PHOTOS / "chelsea.jpg", PHOTOS / "coffee.jpg"]
    if not all(p.is_file() for p in photos):
        pytest.skip(f"real photos not found in {PHOTOS} (shared/data/photos is optional)")
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("Shopping list: milk, eggs. This is text, not a JPEG.\n")
    uploads = [photos[0], not_an_image, photos[1]]
    http = server["http"]
    answers = [http.post("/classify", files={"image": (p.name, p.read_bytes())}) for p in uploads]
    assert [a.status_code for a in answers] == [200, 400, 200]
    model = http.get("/model").json()

    context = browser.new_context(viewport={"width": 1100, "height": 1000})
    context.set_default_timeout(WAIT_MS)  # a busy 2-core CI machine
    page = context.new_page()
    # Intercepting file choosers is switched on by the first listener, asynchronously: switch it
    # on now, long before the key press that opens one.
    page.on("filechooser", lambda _chooser: None)
    requests: list[tuple[str, str]] = []
    page.on("request", lambda request: requests.append((request.method, request.url)))
    page_errors: list[str] = []
    page.on("pageerror", lambda error: page_errors.append(str(error)))

    page.goto(server["url"] + PAGE_PATH)
    info = page.locator("#model-info")
    info.wait_for(state="visible", timeout=WAIT_MS)
    shown = info.inner_text()
    for value in (
        model["tag"],
        f"VGG-{model['cfg']}",
        str(model["num_classes"]),
        model["precision"],
        f"Q = {model['test_scale']}",
        f"{100 * model['val_top1']:.1f} %",
    ):
        assert value in shown, (value, shown)
    sparse = page.evaluate("""modelRows({tag: 'vgg:x', cfg: null, batch_norm: null, num_classes: 3, labels: [],
        test_scale: 40, crop: null, tta: 'five', precision: 'fp32', provider: 'CPUExecutionProvider',
        val_top1: null, workers: 2})""")  # a model exported without all its metadata
    assert not any(re.search(r"null|undefined|NaN", value) for _, value in sparse), sparse
    assert ["Validation top-1", "not recorded"] in sparse and ["Device", "CPU, 2 workers"] in sparse

    # The picker is a labelled button that the keyboard opens.
    pick = page.get_by_role("button", name="Choose images…")
    for _ in range(10):
        if page.evaluate("document.activeElement && document.activeElement.id") == "pick":
            break
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "pick"
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    assert chooser.value.is_multiple()
    chooser.value.set_files([str(p) for p in uploads])
    wait_until_settled(page, 3)

    cards = rendered_cards(page)
    assert [card["name"] for card in cards] == [p.name for p in uploads]  # in the order given
    assert_card_shows(cards[0], answers[0].json())
    assert_card_shows(cards[2], answers[2].json())
    assert cards[1]["failed"] and cards[1]["status"] == answers[1].json()["error"], cards[1]
    assert cards[1]["rows"] == []
    assert any("<" in label for card in cards for label, _ in card["rows"])  # markup shown as text
    assert pick.is_enabled()

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"screenshot: {screenshot}")

    # Still usable after the error: dropped photos are classified too. Together they are over
    # the server's body limit (413), so the page sends them one by one.
    dropped = [PHOTOS / "hubble_deep_field.jpg", PHOTOS / "rocket.jpg"]
    assert max(p.stat().st_size for p in dropped) < MAX_BODY_BYTES < sum(p.stat().st_size for p in dropped)
    drop_files(page, dropped)
    wait_until_settled(page, 5)
    cards = rendered_cards(page)
    assert [card["name"] for card in cards[3:]] == [p.name for p in dropped]
    for card, path in zip(cards[3:], dropped, strict=True):
        assert_card_shows(card, http.post("/classify", files={"image": (path.name, path.read_bytes())}).json())

    # A phone-wide screen: nothing wider than it, the picker on screen.
    page.set_viewport_size({"width": 360, "height": 740})
    page.evaluate("window.scrollTo(0, 0)")
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    assert pick.bounding_box()["x"] + pick.bounding_box()["width"] <= 360
    page.screenshot(path=str(ARTIFACTS / "page-narrow.png"), full_page=True)

    origin = server["url"]
    outside = [
        (method, url)
        for method, url in requests
        if not (url.startswith(origin + "/") or url.startswith(f"blob:{origin}/") or url.startswith("data:"))
    ]
    assert not outside, f"requests left the server: {outside}"
    posts = [urlsplit(url).path for method, url in requests if method == "POST"]
    # Three images in one batch, sent again without the text file once the server named it;
    # the two dropped ones together (413), then apart.
    assert posts == ["/classify_batch"] * 5
    assert {(m, urlsplit(u).path) for m, u in requests} >= {
        ("GET", "/ui"),
        ("GET", "/ui/page.js"),
        ("GET", "/ui/page.css"),
        ("GET", "/model"),
    }
    assert not page_errors, page_errors

    page.get_by_role("button", name="Clear results").click()
    assert rendered_cards(page) == [] and page.evaluate("document.activeElement.id") == "pick"
    context.close()


@pytest.mark.slow
def test_the_start_log_points_to_the_page(server) -> None:
    port = urlsplit(server["url"]).port
    log = server["log"].read_text(errors="replace")
    assert re.search(rf"ready: try it in a browser at http://127\.0\.0\.1:{port}/ui\b", log), log[-2000:]
