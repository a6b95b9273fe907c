"""Where the server may take an image_url part's bytes from.

    data:image/png;base64,...   always: the image inside the request
    http(s)://host/cat.png      only with --allow-image-urls; fetched with a size and time limit
    file:///srv/images/cat.png  only under the directory named by --image-dir

By default the server makes no outgoing request and reads no file for a client: a URL that
reached into the network or the disk would let any client make the server fetch or read what
it can reach. An operator opens either door explicitly. Every image, wherever it comes from,
is held to the same size limit (llama-server's 10 MB), and a fetch to a time limit (its 10 s)
counted over the whole download, not per read, so that a slow drip cannot hold a request.
Failures are the client's 400s, with the reason.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

MAX_IMAGE_BYTES = 10_000_000  # 10 MB
FETCH_TIMEOUT_S = 10.0
CHUNK = 64 * 1024
DATA_URL = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,(?P<data>.*)$", re.S)


class ImageSourceError(Exception):
    """Why an image_url's bytes cannot be had: the client's mistake (a 400)."""


@dataclass(frozen=True)
class ImageSources:
    """What the operator allows: http(s) URLs (`allow_urls`), files under `directory`, and the limits."""

    allow_urls: bool = False
    directory: Path | None = None
    max_bytes: int = MAX_IMAGE_BYTES
    timeout_s: float = FETCH_TIMEOUT_S

    def read(self, url: str) -> bytes:
        """The bytes `url` names, or an ImageSourceError saying why not."""
        if url.startswith("data:"):
            return self._data(url)
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            if not self.allow_urls:
                raise ImageSourceError("image URLs are not fetched: this server was started without --allow-image-urls; "
                               "send the image inline as a data: URL, e.g. data:image/png;base64,...")  # fmt: skip
            return self._fetch(url)
        if scheme == "file":
            return self._file(url)
        raise ImageSourceError("an image_url must be a base64 data: URL (data:image/png;base64,...), "
                       "an http(s) URL or a file: URL")  # fmt: skip

    def describe(self) -> str:
        """Where images may come from, for the server's start-up line."""
        where = ["data: URLs"]
        if self.allow_urls:
            where.append(f"http(s) URLs (at most {self.max_bytes / 1e6:g} MB in {self.timeout_s:g} s)")
        if self.directory is not None:
            where.append(f"files under {self.directory}")
        return ", ".join(where)

    # ------------------------------------------------------------------ the three sources
    def _data(self, url: str) -> bytes:
        match = DATA_URL.match(url)
        if match is None:
            raise ImageSourceError("a data: URL must hold base64 content (data:image/png;base64,...)")
        if len(match["data"]) > self.max_bytes * 4 // 3 + 4:
            raise ImageSourceError(f"the image is larger than this server's limit of {self.max_bytes} bytes")
        try:
            return base64.b64decode(match["data"], validate=True)
        except (binascii.Error, ValueError):
            raise ImageSourceError("the data: URL is not valid base64") from None

    def _fetch(self, url: str) -> bytes:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + self.timeout_s
        late = ImageSourceError(f"the image at {url} did not arrive within {self.timeout_s:g} s")
        try:
            with _opener().open(urllib.request.Request(url, headers={"User-Agent": "gemmalite"}), timeout=self.timeout_s) as response:
                declared = response.headers.get("Content-Length")
                if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                    raise self._too_large(url)
                body = bytearray()
                while piece := _read(response, deadline):
                    body += piece
                    if len(body) > self.max_bytes:
                        raise self._too_large(url)
                    if time.monotonic() > deadline:
                        raise late
                return bytes(body)
        except urllib.error.HTTPError as e:
            raise ImageSourceError(f"the image at {url} could not be fetched: HTTP {e.code} {e.reason}") from None
        except TimeoutError:
            raise late from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError):
                raise late from None
            raise ImageSourceError(f"the image at {url} could not be fetched: {reason}") from None

    def _file(self, url: str) -> bytes:
        if self.directory is None:
            raise ImageSourceError("file: image URLs are not read: this server was started without --image-dir")
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ImageSourceError("a file: image URL must name a local path (file:///dir/cat.png)")
        path = Path(urllib.parse.unquote(parts.path))
        root = self.directory.resolve()
        resolved = path.resolve()  # links and .. resolved before the check: neither can lead out of the directory
        if not resolved.is_relative_to(root):
            raise ImageSourceError(f"{path} is outside this server's image directory ({self.directory})")
        try:
            with open(resolved, "rb") as file:
                body = file.read(self.max_bytes + 1)
        except FileNotFoundError:
            raise ImageSourceError(f"no image file {path} in this server's image directory") from None
        except OSError as e:
            raise ImageSourceError(f"the image file {path} could not be read: {e.strerror}") from None
        if len(body) > self.max_bytes:
            raise self._too_large(str(path))
        return body

    def _too_large(self, what: str) -> ImageSourceError:
        return ImageSourceError(f"the image {what} is larger than this server's limit of {self.max_bytes} bytes")


def _read(response, deadline: float) -> bytes:
    """The next piece of the body, waiting no longer than the time left."""
    sock = getattr(getattr(response.fp, "raw", None), "_sock", None)
    if sock is not None:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
    return response.read1(CHUNK) if hasattr(response, "read1") else response.read(CHUNK)


@functools.cache
def _opener():
    """urllib's opener with http(s) handlers only: no file or FTP handler, so that neither a URL nor a
    redirect (which urllib itself allows only to http, https or ftp) can reach the disk.
    Built on first use: a server that fetches nothing does not import urllib.request."""
    import urllib.request

    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(),
                    urllib.request.HTTPRedirectHandler(), urllib.request.HTTPErrorProcessor(),
                    urllib.request.HTTPDefaultErrorHandler()):  # fmt: skip
        opener.add_handler(handler)
    return opener
