"""Where the server takes an image_url's bytes from (serve/media.py): data: URLs always, http(s)
only when allowed and within the limits, files only under the operator's directory.
A real HTTP server on localhost plays the outside world."""

from __future__ import annotations

import base64
import http.server
import threading
import time

import pytest

from gemmalite.serve.media import ImageSourceError, ImageSources

IMAGE = bytes(range(256)) * 40  # what the server sends; the bytes need not be an image here


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/cat.png":
            self._send(IMAGE)
        elif self.path == "/big-declared":
            self.send_response(200)
            self.send_header("Content-Length", str(50 * 1024 * 1024))
            self.end_headers()
        elif self.path == "/big-undeclared":  # no Content-Length: the limit is found while reading
            self.send_response(200)
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b"x" * 8192)
        elif self.path == "/slow":  # a drip: each read comes in time, the whole does not
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)
        elif self.path == "/to-file":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()
        elif self.path == "/to-cat":
            self.send_response(301)
            self.send_header("Location", "/cat.png")
            self.end_headers()
        else:
            self.send_error(404)

    def _send(self, body: bytes):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Site(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client that stops reading (the limits) is expected
        pass


@pytest.fixture(scope="module")
def site():
    server = Site(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def refused(sources: ImageSources, url: str) -> str:
    with pytest.raises(ImageSourceError) as e:
        sources.read(url)
    return str(e.value)


def test_data_urls_are_always_read():
    url = "data:image/png;base64," + base64.b64encode(IMAGE).decode()
    assert ImageSources().read(url) == IMAGE
    assert "not valid base64" in refused(ImageSources(), "data:image/png;base64,@@@")
    assert "limit of 1000 bytes" in refused(ImageSources(max_bytes=1000), url)


def test_http_urls_are_refused_unless_allowed(site):
    assert "--allow-image-urls" in refused(ImageSources(), f"{site}/cat.png")


def test_an_allowed_url_is_fetched_and_follows_http_redirects(site):
    sources = ImageSources(allow_urls=True)
    assert sources.read(f"{site}/cat.png") == IMAGE
    assert sources.read(f"{site}/to-cat") == IMAGE


@pytest.mark.parametrize("path", ["/big-declared", "/big-undeclared"])
def test_a_fetch_stops_at_the_size_limit(site, path):
    assert "limit of 100000 bytes" in refused(ImageSources(allow_urls=True, max_bytes=100_000), site + path)


def test_a_fetch_stops_at_the_time_limit_counted_over_the_whole_download(site):
    start = time.monotonic()
    message = refused(ImageSources(allow_urls=True, timeout_s=1.0), f"{site}/slow")
    assert "did not arrive within 1 s" in message
    assert time.monotonic() - start < 3  # the drip takes 5 s; every single read is quick


def test_fetch_failures_say_why(site):
    sources = ImageSources(allow_urls=True)
    assert "HTTP 404" in refused(sources, f"{site}/nothing.png")
    assert "not allowed" in refused(sources, f"{site}/to-file")  # a redirect never reaches the disk
    assert "could not be fetched" in refused(sources, "http://127.0.0.1:1/cat.png")


def test_files_are_read_only_under_the_operators_directory(tmp_path):
    root, outside = tmp_path / "images", tmp_path / "private"
    root.mkdir(), outside.mkdir()
    (root / "cat.png").write_bytes(IMAGE)
    (outside / "secret.png").write_bytes(b"secret")
    (root / "link.png").symlink_to(outside / "secret.png")
    assert "--image-dir" in refused(ImageSources(), f"file://{root}/cat.png")
    sources = ImageSources(directory=root)
    assert sources.read(f"file://{root}/cat.png") == IMAGE
    assert "outside" in refused(sources, f"file://{root}/../private/secret.png")
    assert "outside" in refused(sources, f"file://{root}/link.png")  # a link cannot lead out
    assert "outside" in refused(sources, "file:///etc/passwd")
    assert "no image file" in refused(sources, f"file://{root}/dog.png")
    assert "larger than" in refused(ImageSources(directory=root, max_bytes=100), f"file://{root}/cat.png")


def test_other_schemes_are_refused():
    assert "data: URL" in refused(ImageSources(allow_urls=True), "ftp://example.com/cat.png")
