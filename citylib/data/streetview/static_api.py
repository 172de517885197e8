"""Talking to the Street View Static API: the key, rate limit, retries and request budget.

Reads the API key from an environment variable or a file (never from an argument or a
parameter file) and the two endpoints ``{base_url}/streetview/metadata`` and
``{base_url}/streetview``. Writes nothing; ``citylib.streetview.collect`` saves what it returns.

The key is sent only in request URLs. It is kept out of every message this module makes
(``redact``), out of ``repr`` and out of exception chains (errors are raised outside urllib's
``except`` clauses or ``from None``), because urllib's HTTP errors carry the full URL.

Retries: HTTP 429, HTTP 5xx, network errors, a cut-short body, an image that does not decode,
and the statuses OVER_QUERY_LIMIT and UNKNOWN_ERROR are tried again after ``backoff * 2**k``
seconds (k = 0, 1, ...; at most MAX_BACKOFF), at most ``max_retries`` times; then
``RequestFailed``. Other HTTP 4xx answers and unknown statuses fail at once. HTTP 401/403 and
REQUEST_DENIED raise ``AccessDenied``: the key is wrong or the API is not enabled, so no
further request can succeed. Every HTTP attempt, retries included, counts against
``max_requests``; when it is spent, ``BudgetExhausted`` is raised before the next request.
"""
from __future__ import annotations

import http.client
import io
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

from citylib.core.config import ConfigError
from citylib.data.imagecache import open_rgb

DEFAULT_BASE_URL = "https://maps.googleapis.com/maps/api"
DEFAULT_KEY_ENV = "CITYLIB_STREETVIEW_KEY"
REDACTED = "REDACTED"
RETRY_STATUSES = ("OVER_QUERY_LIMIT", "UNKNOWN_ERROR")
MAX_BACKOFF = 60.0  # seconds: the longest wait before a retry
log = logging.getLogger(__name__)


class StreetViewError(RuntimeError):
    """A Street View request went wrong; the message never holds the API key."""


class AccessDenied(StreetViewError):
    """The API refused the key (HTTP 401/403 or REQUEST_DENIED): stop the whole run."""


class BudgetExhausted(StreetViewError):
    """``max_requests`` HTTP requests have been made: stop cleanly."""


class RequestFailed(StreetViewError):
    """One request still failed after its retries (or cannot succeed); the run goes on."""


def read_key(key_env: str = DEFAULT_KEY_ENV, key_file: str | os.PathLike | None = None) -> str:
    """The API key from ``key_file`` if given, else from the environment variable ``key_env``."""
    if key_file is not None:
        try:
            key = Path(key_file).read_text().strip()
        except FileNotFoundError:
            raise ConfigError(f"key file {key_file} not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"key file {key_file} cannot be read: {type(e).__name__}") from None
        where = f"key file {key_file}"
    else:
        key = os.environ.get(key_env, "").strip()
        where = f"environment variable {key_env}"
        if not key:
            raise ConfigError(f"no Street View API key: set the environment variable {key_env} "
                              "or pass --key-file (the key is never taken on the command line)")
    if not key or any(c.isspace() for c in key) or not key.isprintable():
        raise ConfigError(f"{where} does not hold one API key (empty, or whitespace inside)")
    return key


def redact(text: str, key: str) -> str:
    """``text`` with the key (plain or URL-quoted) replaced by REDACTED."""
    if not key:
        return text
    for form in {key, urllib.parse.quote(key, safe=""), urllib.parse.quote_plus(key)}:
        text = text.replace(form, REDACTED)
    return text


class Client:
    """Street View Static API requests with a rate limit, retries and a request budget."""

    def __init__(self, key: str, base_url: str = DEFAULT_BASE_URL, rps: float = 10.0,
                 max_retries: int = 4, backoff: float = 1.0, max_requests: int | None = None,
                 timeout: float = 30.0, sleep: Callable[[float], None] = time.sleep):
        self._key = key
        self.base_url = base_url.rstrip("/")
        self.interval = 1.0 / rps  # seconds between request starts
        self.max_retries, self.backoff, self.timeout = max_retries, backoff, timeout
        self.max_requests = max_requests
        self.requests = 0  # HTTP requests made (every attempt)
        self._sleep = sleep
        self._last = -float("inf")

    def __repr__(self) -> str:
        return f"Client(base_url={self.base_url!r}, requests={self.requests})"

    def metadata(self, lat: float, lon: float, radius: int, source: str) -> dict:
        """The metadata answer for a location: status OK (pano_id, location, date), ZERO_RESULTS
        or NOT_FOUND. Other statuses raise (see the module docstring)."""
        params = {"location": f"{lat:.6f},{lon:.6f}", "radius": radius}
        if source != "default":
            params["source"] = source
        return self._retrying("streetview/metadata", params, self._parse_metadata)

    def image(self, pano: str, heading: float, size: tuple[int, int], fov: float, pitch: float) -> bytes:
        """The JPEG bytes of one view of panorama ``pano``; it has been decoded once in full."""
        params = {"size": f"{size[0]}x{size[1]}", "pano": pano, "heading": f"{heading:g}",
                  "fov": f"{fov:g}", "pitch": f"{pitch:g}"}
        return self._retrying("streetview", params, self._check_image)

    # ------------------------------------------------------------ mechanics

    def _retrying(self, endpoint: str, params: dict, parse: Callable[[bytes, str], object]):
        safe = self._safe_url(endpoint, params)
        for attempt in range(self.max_retries + 1):
            try:
                return parse(self._get(endpoint, params, safe), safe)
            except _Retry as why:
                if attempt == self.max_retries:
                    raise RequestFailed(f"{why} after {attempt + 1} attempt(s): {safe}") from None
                delay = min(self.backoff * 2 ** attempt, MAX_BACKOFF)
                log.info("retrying in %.3g s (%s): %s", delay, why, safe)
                self._sleep(delay)
        raise AssertionError("unreachable")

    def _get(self, endpoint: str, params: dict, safe: str) -> bytes:
        if self.max_requests is not None and self.requests >= self.max_requests:
            raise BudgetExhausted(f"request budget of {self.max_requests} HTTP requests reached")
        wait = self._last + self.interval - time.monotonic()
        if wait > 0:
            self._sleep(wait)
        self._last = time.monotonic()
        self.requests += 1
        query = urllib.parse.urlencode({**params, "key": self._key})
        request = urllib.request.Request(f"{self.base_url}/{endpoint}?{query}",
                                         headers={"User-Agent": "citylib-streetview"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            code, body = e.code, _peek(e)
            e.close()
        except (urllib.error.URLError, http.client.HTTPException, socket.timeout, ConnectionError) as e:
            code, body = None, redact(f"{type(e).__name__}: {getattr(e, 'reason', e)}", self._key)[:200]
        # Raised outside the except clauses: urllib's errors carry the URL, key and all, and an
        # exception raised inside would keep them reachable as its __context__.
        if code is None:
            raise _Retry(body)
        if code in (401, 403):
            raise AccessDenied(redact(f"HTTP {code} from the Street View API: the key was refused or the "
                                      f"API is not enabled for it ({body}): {safe}", self._key))
        if code == 429 or code >= 500:
            raise _Retry(f"HTTP {code}")
        raise RequestFailed(redact(f"HTTP {code} ({body}): {safe}", self._key))

    def _parse_metadata(self, body: bytes, safe: str) -> dict:
        try:
            answer = json.loads(body)
            status = answer["status"]
        except (ValueError, KeyError, TypeError):
            raise _Retry("metadata answer is not JSON with a status") from None
        if status == "REQUEST_DENIED":
            message = redact(str(answer.get("error_message", "")), self._key)
            raise AccessDenied(f"REQUEST_DENIED from the Street View API: {message or 'the key was refused'}"
                               f" (check the key and that the Street View Static API is enabled): {safe}")
        if status in RETRY_STATUSES:
            raise _Retry(status)
        if status not in ("OK", "ZERO_RESULTS", "NOT_FOUND"):
            raise RequestFailed(f"metadata status {status}: {safe}")
        return answer

    def _check_image(self, body: bytes, safe: str) -> bytes:
        try:
            open_rgb(io.BytesIO(body))  # a full decode: a cut-short JPEG fails here
        except Exception as e:  # any decode failure means a bad body, whatever PIL calls it
            raise _Retry(f"image does not decode ({type(e).__name__}, {len(body)} bytes)") from None
        return body

    def _safe_url(self, endpoint: str, params: dict) -> str:
        query = urllib.parse.urlencode({**params, "key": REDACTED}, safe=",")
        return redact(f"{self.base_url}/{endpoint}?{query}", self._key)


class _Retry(Exception):
    """A failure worth trying again; its text names the reason, never the key."""


def _peek(error: urllib.error.HTTPError) -> str:
    """The first line of an error body, for the message."""
    try:
        return error.read(300).decode("utf-8", "replace").strip().splitlines()[0][:200]
    except (OSError, IndexError, http.client.HTTPException):
        return "no body"
