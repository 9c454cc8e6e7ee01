"""Pages, sitemaps, PDF and DOCX into the knowledge base: a real HTTP server on 127.0.0.1 and
documents built offline. Each bad source fails alone, with its reason, and changes nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bot.knowledge import ingest
from bot.ops.redis_server import free_port
from tests.integration.test_knowledge import stored
from tests.support.knowledge import docx_bytes, knowledge, pdf_bytes

PAGE = (
    "<html><head><title>Returns policy</title></head><body><h1>Returns</h1>"
    "<p>Return any item within 30 days for a full refund.</p></body></html>"
)
PAGE_KO = (
    "<html><head><title>교환 안내</title></head><body><h1>교환</h1>"
    "<p>상품을 받은 날로부터 7일 이내에 교환을 신청할 수 있습니다.</p></body></html>"
)


class Site:
    def __init__(self) -> None:
        self.routes: dict[str, tuple[str, bytes]] = {}
        self.requests: list[str] = []
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                site.requests.append(self.path)
                if self.path == "/slow":
                    time.sleep(2)
                route = site.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                kind, body = route
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, path: str, kind: str, body: bytes | str) -> str:
        self.routes[path] = (kind, body.encode() if isinstance(body, str) else body)
        return self.url + path


@pytest.fixture
def site() -> Iterator[Site]:
    server = Site()
    thread = threading.Thread(target=server.server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


async def test_a_page_and_a_sitemap_of_pages_are_added_and_found(redis, site):
    page = site.add("/help/returns", "text/html; charset=utf-8", PAGE)
    ko = site.add("/help/exchange", "text/html; charset=utf-8", PAGE_KO)
    pdf = site.add(
        "/guide.pdf", "application/pdf", pdf_bytes(["Blender warranty", "Two years on the motor."])
    )
    sitemap = site.add(
        "/sitemap.xml", "application/xml",
        '<?xml version="1.0"?><urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">'
        f"<url><loc>{ko}</loc></url><url><loc>{pdf}</loc></url>"
        f"<url><loc>{site.url}/gone</loc></url></urlset>",
    )  # fmt: skip
    kb = knowledge(redis)
    results = await kb.add([page, sitemap], "default")
    assert [(r.source, r.outcome) for r in results] == [
        (page, "added"),
        (ko, "added"),
        (pdf, "added"),
        (f"{site.url}/gone", "failed: HTTP 404 Not Found"),
    ]
    sources = {s.source: s for s in await kb.sources("default")}
    assert sources[page].title == "Returns policy" and sources[page].link == page
    assert sources[ko].title == "교환 안내"
    hits = await kb.search("default", "교환은 언제까지 신청하나요?", limit=4)
    assert hits[0].passage.link == ko
    hits = await kb.search("default", "how long is the motor warranty", limit=4)
    assert hits[0].passage.link == pdf

    again = await kb.add([page], "default")
    assert again[0].outcome == "unchanged"


async def test_bad_urls_fail_alone_with_their_reason(redis, site, monkeypatch, tmp_path):
    kb = knowledge(redis)
    page = site.add("/help/returns", "text/html", PAGE)
    await kb.add([page], "default")
    before = await stored(redis)

    monkeypatch.setattr(ingest, "FETCH_TIMEOUT_S", 0.5)
    monkeypatch.setattr(ingest, "MAX_SOURCE_BYTES", 1000)
    image = site.add("/logo.png", "image/png", b"\x89PNG....")
    big = site.add("/big.html", "text/html", "<p>" + "x" * 5000 + "</p>")
    slow = site.add("/slow", "text/html", PAGE)
    not_xml = site.add("/broken.xml", "application/xml", "<urlset><url>")
    dead = f"http://127.0.0.1:{free_port()}/nothing"
    # The page itself now fails: what was stored for it stays.
    site.add("/help/returns", "text/html", "<p>" + "y" * 5000 + "</p>")
    results = await kb.add([image, big, slow, not_xml, dead, page], "default")
    reasons = {r.source: r.outcome for r in results}
    assert reasons[image] == "failed: unsupported content type image/png"
    assert reasons[big].startswith("failed: too large")
    assert reasons[slow].startswith("failed: unreachable"), reasons[slow]
    assert reasons[not_xml].startswith("failed: not a sitemap"), reasons[not_xml]
    assert reasons[dead].startswith("failed: unreachable"), reasons[dead]
    assert reasons[page].startswith("failed: too large")
    assert await stored(redis) == before


async def test_docx_and_pdf_files_become_passages(redis, tmp_path):
    (tmp_path / "setup.docx").write_bytes(
        docx_bytes("Blender setup", ["Plug the blender in and press start.", "Clean the jug."])
    )
    (tmp_path / "warranty.pdf").write_bytes(pdf_bytes(["Warranty", "Two years on the motor."]))
    kb = knowledge(redis)
    results = await kb.add([str(tmp_path)], "default")
    assert [r.outcome for r in results] == ["added", "added"]
    titles = {s.title for s in await kb.sources("default")}
    assert titles == {"Blender setup", "warranty"}
    hits = await kb.search("default", "how do I start the blender", limit=4)
    assert hits[0].passage.title == "Blender setup"
