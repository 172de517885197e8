"""Street View collector against a local imitation of the API (no test touches the internet).

The mock server answers ``/maps/api/streetview/metadata`` and ``/maps/api/streetview`` on
127.0.0.1; each test scripts its replies and counts the requests it received.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import logging
import threading
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from citylib.core.config import ConfigError, from_dict
from citylib.data import dataset, inventory
from citylib.data.streetview import collect, geosample, static_api
from citylib.data.streetview.collect import StreetViewConfig
from citylib.run import cli

# '+' and '/' must be URL-quoted in a query: the redaction must catch the quoted form too.
KEY = "AIzaFAKE-key_for+tests/4711"
FILE_KEY = "AIzaFILE-key_only+in/a-file"
BBOX = (52.36, 4.88, 52.38, 4.91)  # Amsterdam centre, about 2 km x 2 km


# ---------------------------------------------------------------- the imitation API


@dataclass
class Reply:
    code: int = 200
    body: bytes = b""
    ctype: str = "application/json"
    length: int | None = None  # a Content-Length larger than the body: the transfer is cut short


def status(name: str, **extra) -> Reply:
    return Reply(body=json.dumps({"status": name, **extra}).encode())


@functools.lru_cache(maxsize=None)
def jpeg(pano: str, heading: str, size=(32, 24)) -> bytes:
    seed = int.from_bytes(hashlib.sha256(f"{pano}/{heading}".encode()).digest()[:4], "big")
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def pano_at(location: str) -> str:
    """A pano id per location, in the API's alphabet (with '-' and '_')."""
    return base64.urlsafe_b64encode(hashlib.sha1(location.encode()).digest()).decode()[:22]


class MockAPI:
    """Scriptable endpoints: queued replies first, then ``metadata(q)`` / ``image(q)``."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.key = KEY
        self.log: list[tuple[str, dict]] = []
        self.queue = {"metadata": deque(), "image": deque()}
        self.lock = threading.Lock()
        self.metadata = self.ok_metadata
        self.image = self.ok_image

    def ok_metadata(self, q: dict) -> Reply:
        lat, lon = (float(v) for v in q["location"].split(","))
        return status("OK", pano_id=pano_at(q["location"]), date="2021-06",
                      location={"lat": lat + 1e-5, "lng": lon - 1e-5}, copyright="© Google")

    def ok_image(self, q: dict) -> Reply:
        w, h = (int(v) for v in q["size"].split("x"))
        return Reply(body=jpeg(q["pano"], q["heading"], (w, h)), ctype="image/jpeg")

    def count(self, endpoint: str, **match) -> int:
        return sum(e == endpoint and all(q.get(k) == v for k, v in match.items()) for e, q in self.log)

    def reply(self, endpoint: str, q: dict) -> Reply:
        with self.lock:
            self.log.append((endpoint, q))
            scripted = self.queue[endpoint].popleft() if self.queue[endpoint] else None
        if q.get("key") != self.key:
            return status("REQUEST_DENIED", error_message="The provided API key is invalid.") \
                if endpoint == "metadata" else Reply(403, b"The Google Maps Platform server rejected your request.", "text/plain")
        return scripted or (self.metadata if endpoint == "metadata" else self.image)(q)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # the default would print request lines, keys and all
        pass

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        q = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
        endpoint = {"/maps/api/streetview/metadata": "metadata", "/maps/api/streetview": "image"}.get(url.path)
        r = self.server.api.reply(endpoint, q) if endpoint else Reply(404, b"no such endpoint", "text/plain")
        self.send_response(r.code)
        self.send_header("Content-Type", r.ctype)
        self.send_header("Content-Length", str(r.length or len(r.body)))
        self.end_headers()
        self.wfile.write(r.body)


@pytest.fixture
def api():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.api = MockAPI(f"http://127.0.0.1:{server.server_address[1]}/maps/api")
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield server.api
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def environment(monkeypatch):
    monkeypatch.setenv("CITYLIB_STREETVIEW_KEY", KEY)
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)


def config(api: MockAPI, **kw) -> StreetViewConfig:
    settings = dict(city="amsterdam", bbox=BBOX, points=4, headings=(0.0, 180.0), size=(32, 24),
                    base_url=api.base_url, rps=1000.0, backoff=0.001, max_retries=2, timeout=5.0)
    return StreetViewConfig(**{**settings, **kw})


def gather(api, root, **kw) -> collect.StreetViewResult:
    return collect.run(config(api, **kw), root, progress=False)


def whole(path: Path) -> bool:
    return inventory.check_file(str(path)) is None


# ---------------------------------------------------------------- collecting


def test_collects_every_view_of_every_panorama(api, tmp_path):
    r = gather(api, tmp_path)
    assert (r.points, r.panoramas, r.downloaded, r.present, r.failed, r.stopped) == (4, 4, 8, 0, (), None)
    assert r.complete and r.requests == len(api.log) == 4 + 8
    m = pd.read_csv(tmp_path / "manifest.csv", dtype=str, keep_default_na=False)
    assert list(m.columns) == collect.MANIFEST_COLUMNS and len(m) == 8
    assert set(m["city"]) == {"amsterdam"} and m["group"].nunique() == 4
    for row in m.itertuples():
        path = tmp_path / row.path
        assert path.name == f"{row.group}_{row.heading}.jpg" and whole(path)
        assert Image.open(path).size == (32, 24) and row.date == "2021-06"
        assert row.view == str(["0", "180"].index(row.heading))
        assert BBOX[0] <= float(row.lat) <= BBOX[2] and BBOX[1] <= float(row.lon) <= BBOX[3]
    assert not list(tmp_path.rglob("*.tmp"))
    q = next(q for e, q in api.log if e == "image")
    assert (q["size"], q["fov"], q["pitch"]) == ("32x24", "90", "0")
    saved = json.loads((tmp_path / "streetview.json").read_text())["amsterdam"]
    assert saved["config"]["city"] == "amsterdam" and saved["downloaded"] == 8


def test_manifest_is_a_data_stage_manifest(api, tmp_path):
    root = tmp_path / "sv"
    gather(api, root, points=5)
    gather(api, root, city="berlin", bbox=(52.50, 13.37, 52.53, 13.42), points=5)
    records, rejected = inventory.load_records(root / "manifest.csv")
    assert rejected.empty and sorted(records["city"].unique()) == ["amsterdam", "berlin"]
    assert len(records) == 20 and records["group"].nunique() == 10
    result = dataset.run(dataset.DataConfig(source=str(root / "manifest.csv"), image_size=16),
                      out=tmp_path / "data", progress=False)
    assert len(result.manifest) == 20 and result.rejected.empty
    assert (result.manifest.groupby("group")["split"].nunique() == 1).all()  # no place in two splits
    assert set(result.manifest["group"]) == set(records["group"])


def test_points_without_imagery_are_skipped(api, tmp_path):
    answers = iter([True, False, True, False])
    api.metadata = lambda q: api.ok_metadata(q) if next(answers) else status("ZERO_RESULTS")
    r = gather(api, tmp_path)
    assert (r.panoramas, r.no_imagery, r.downloaded) == (2, 2, 4) and r.complete
    assert api.count("image") == 4


def test_a_panorama_met_twice_is_fetched_once(api, tmp_path):
    panos = iter(["same-pano_A", "same-pano_B", "same-pano_A", "same-pano_A", "same-pano_B"] * 2)
    api.metadata = lambda q: status("OK", pano_id=next(panos), location={"lat": 52.37, "lng": 4.89})
    r = gather(api, tmp_path, points=8)
    assert (r.panoramas, r.duplicates, r.downloaded) == (2, 6, 4) and r.complete
    assert sorted((q["pano"], q["heading"]) for e, q in api.log if e == "image") == [
        ("same-pano_A", "0"), ("same-pano_A", "180"), ("same-pano_B", "0"), ("same-pano_B", "180")]
    m = pd.read_csv(tmp_path / "manifest.csv", dtype=str, keep_default_na=False)
    assert len(m) == 4 and set(m["group"]) == {"same-pano_A", "same-pano_B"} and set(m["date"]) == {""}


@pytest.mark.parametrize("endpoint,first", [("metadata", Reply(429, b"slow down")),
                                            ("metadata", status("OVER_QUERY_LIMIT")),
                                            ("image", Reply(429, b"slow down")),
                                            ("image", Reply(503, b"busy"))])
def test_throttling_and_server_errors_are_retried(api, tmp_path, endpoint, first, caplog):
    api.queue[endpoint].append(first)
    with caplog.at_level(logging.INFO, logger="citylib"):
        r = gather(api, tmp_path)
    assert r.complete and r.downloaded == 8 and r.requests == 13
    assert api.count(endpoint) == (4 if endpoint == "metadata" else 8) + 1
    assert any("retrying" in rec.getMessage() for rec in caplog.records)


def test_backoff_doubles_from_its_base(api):
    api.queue["metadata"].extend([Reply(500, b"oops"), Reply(429, b"slow"), status("OVER_QUERY_LIMIT")])
    slept = []
    client = static_api.Client(KEY, api.base_url, rps=1e6, max_retries=3, backoff=0.25,
                                   sleep=slept.append)
    assert client.metadata(52.37, 4.89, 50, "outdoor")["status"] == "OK"
    assert [s for s in slept if s >= 0.01] == [0.25, 0.5, 1.0] and client.requests == 4


def test_server_errors_until_retries_run_out_fail_one_request(api, tmp_path):
    broken = {}

    def image(q):
        broken.setdefault("pano", q["pano"])  # the first image asked for always fails
        return Reply(500, b"internal error", "text/plain") if q["pano"] == broken["pano"] and q["heading"] == "0" \
            else api.ok_image(q)
    api.image = image
    r = gather(api, tmp_path)
    assert len(r.failed) == 1 and "HTTP 500 after 3 attempt(s)" in r.failed[0] and broken["pano"] in r.failed[0]
    assert api.count("image", pano=broken["pano"], heading="0") == 3  # 1 + max_retries
    assert r.downloaded == 7 and not r.complete and r.stopped is None
    m = pd.read_csv(tmp_path / "manifest.csv", dtype=str)
    assert len(m) == 7 and not (tmp_path / "amsterdam" / f"{broken['pano']}_0.jpg").exists()


def test_many_failures_in_a_row_stop_the_run(api, tmp_path):
    api.image = lambda q: Reply(502, b"bad gateway", "text/plain")
    r = gather(api, tmp_path, points=8, max_retries=0)
    assert len(r.failed) == collect.FAILURES_IN_A_ROW and "in a row" in r.stopped
    assert api.count("image") == 10 and api.count("metadata") == 5 and len(r.manifest) == 0
    gone = gather(api, tmp_path / "nowhere", base_url="http://127.0.0.1:9/maps/api", max_retries=0)
    assert len(gone.failed) == 4 and "Connection refused" in gone.failed[0] and gone.stopped is None


def test_request_denied_stops_the_whole_run(api, tmp_path):
    api.queue["metadata"].append(status("REQUEST_DENIED", error_message="API not enabled"))
    with pytest.raises(collect.AccessDenied, match="REQUEST_DENIED.*API not enabled"):
        gather(api, tmp_path)
    assert len(api.log) == 1
    assert pd.read_csv(tmp_path / "manifest.csv").empty  # written, and loadable


def test_http_403_on_an_image_stops_the_run_and_keeps_what_was_fetched(api, tmp_path):
    api.queue["image"].extend([None, None, Reply(403, b"forbidden", "text/plain")])
    with pytest.raises(collect.AccessDenied, match="HTTP 403") as denied:
        gather(api, tmp_path)
    assert not leaks(chain(denied.value), KEY)  # urllib's HTTPError holds the URL: not reachable
    m = pd.read_csv(tmp_path / "manifest.csv")
    assert len(m) == 2 and all(whole(tmp_path / p) for p in m["path"])


@pytest.mark.parametrize("cut", ["short-body", "cut-transfer"])
def test_a_truncated_image_is_never_kept(api, tmp_path, cut):
    def truncated(q):
        body = api.ok_image(q).body
        half = body[: len(body) // 2]
        return Reply(body=half, ctype="image/jpeg", length=len(body) if cut == "cut-transfer" else None)
    api.queue["image"].append(truncated({"pano": "x", "heading": "0", "size": "32x24"}))
    r = gather(api, tmp_path)
    assert r.complete and r.downloaded == 8 and api.count("image") == 9  # retried once
    api.image = truncated
    r = gather(api, tmp_path / "again", max_retries=1)
    assert r.downloaded == 0 and len(r.failed) == 8 and not r.manifest.shape[0]
    why = "does not decode" if cut == "short-body" else "IncompleteRead"
    assert all(f"{why}" in f and "after 2 attempt(s)" in f for f in r.failed), r.failed[0]
    assert not list((tmp_path / "again").rglob("*.jpg")) and not list((tmp_path / "again").rglob("*.tmp"))


def test_budget_stops_cleanly_and_a_rerun_finishes_without_refetching(api, tmp_path):
    first = gather(api, tmp_path, max_requests=5)  # meta, img, img, meta, img | stop
    assert first.requests == len(api.log) == 5 and "budget of 5" in first.stopped and not first.complete
    m = pd.read_csv(tmp_path / "manifest.csv")
    assert len(m) == 3 and all(whole(tmp_path / p) for p in m["path"])
    second = gather(api, tmp_path)
    assert second.complete and (second.present, second.downloaded) == (3, 5)
    assert second.requests == 2 + 5  # two points never asked about, five images; no metadata again
    fetched = [(q["pano"], q["heading"]) for e, q in api.log if e == "image"]
    assert len(fetched) == len(set(fetched)) == 8
    assert api.count("metadata") == 4
    assert len(pd.read_csv(tmp_path / "manifest.csv")) == 8
    third = gather(api, tmp_path)
    assert (third.requests, third.present) == (0, 8)


def test_a_truncated_file_on_disk_is_fetched_again(api, tmp_path):
    gather(api, tmp_path)
    victim = tmp_path / pd.read_csv(tmp_path / "manifest.csv")["path"][0]
    victim.write_bytes(victim.read_bytes()[:300])
    api.log.clear()
    r = gather(api, tmp_path)
    assert (r.downloaded, r.present, r.requests) == (1, 7, 1) and whole(victim)
    m = pd.read_csv(tmp_path / "manifest.csv")
    assert len(m) == 8 and not m["path"].duplicated().any()


def test_rate_limit_spaces_requests(api, tmp_path):
    start = time.monotonic()
    r = gather(api, tmp_path, points=2, headings=(0.0,), rps=20.0)
    assert r.requests == 4 and time.monotonic() - start >= 3 / 20


def test_an_unsafe_pano_id_names_no_file(api, tmp_path):
    api.metadata = lambda q: status("OK", pano_id="../../escape", location={"lat": 1, "lng": 2})
    r = gather(api, tmp_path / "root", points=1)
    assert len(r.failed) == 1 and "unusable pano id" in r.failed[0]
    assert api.count("image") == 0 and not list(tmp_path.rglob("*.jpg"))


def test_random_offset_is_seeded_per_panorama(api, tmp_path):
    cfg = config(api, random_offset=True, headings=(0.0, 90.0, 180.0, 270.0))
    a = collect.headings_for(cfg, "panoA")
    assert a == collect.headings_for(cfg, "panoA") and 0 <= a[0] < 90
    assert np.allclose(np.diff(a) % 360, 90)
    r = collect.run(cfg, tmp_path, progress=False)
    m = pd.read_csv(tmp_path / "manifest.csv", dtype=str)
    assert r.downloaded == 16 and all(h in map(lambda v: f"{v:g}", collect.headings_for(cfg, g))
                                      for h, g in zip(m["heading"], m["group"]))


# ---------------------------------------------------------------- the key


def test_the_key_is_never_written_logged_or_shown(api, tmp_path, capsys, caplog, monkeypatch):
    root = tmp_path / "out"
    messages = []
    failing = {"n": 0}

    def flaky(q):  # some retries, one image that never comes
        failing["n"] += 1
        if q["heading"] == "180" and failing["n"] < 4:
            return Reply(500, b"oops", "text/plain")
        return Reply(429, b"slow") if failing["n"] % 5 == 0 else api.ok_image(q)
    api.image = flaky
    with caplog.at_level(logging.DEBUG):
        r1 = gather(api, root, max_retries=1)  # the key from the environment
        messages += [*r1.failed, repr(r1), r1.stopped or ""]
        key_file = tmp_path / "secret" / "key.txt"
        key_file.parent.mkdir()
        key_file.write_text(FILE_KEY + "\n")
        api.key = FILE_KEY
        r2 = gather(api, root, city="berlin", bbox=(52.50, 13.37, 52.53, 13.42), key_file=str(key_file), max_requests=6)
        messages += [*r2.failed, repr(r2), r2.stopped or "", repr(config(api, key_file=str(key_file)))]
        for wrong in ({"key_file": str(key_file)}, {}):  # the server now expects another key
            api.key = "something-else"
            with pytest.raises(collect.AccessDenied) as denied:
                gather(api, root, city="cairo", bbox=(30.03, 31.22, 30.06, 31.26), **wrong)
            messages += chain(denied.value)
        assert cli.main(["streetview", "--city", "delft", "--bbox", "52.0,4.35,52.02,4.37", "--out", str(root),
                         "--points", "2", "--base-url", api.base_url, "--key-file", str(key_file)]) == 2
        monkeypatch.setenv("CITYLIB_STREETVIEW_KEY", FILE_KEY)
        api.key = FILE_KEY
        assert cli.main(["streetview", "--city", "delft", "--bbox", "52.0,4.35,52.02,4.37", "--out", str(root),
                         "--points", "2", "--base-url", api.base_url, "--rps", "1000", "--backoff", "0.001",
                         "--size", "32x24"]) == 0
    assert r1.failed and r2.stopped and {q["key"] for _, q in api.log} >= {KEY, FILE_KEY}  # keys were used
    out, err = capsys.readouterr()
    texts = [out, err, *messages, *(rec.getMessage() for rec in caplog.records)]
    files = [p for p in root.rglob("*") if p.is_file()]
    assert len(files) > 10
    for key in (KEY, FILE_KEY):
        assert not leaks(texts, key)
        assert not leaks([p.read_bytes() for p in files], key)
    assert static_api.REDACTED in " ".join(messages)


def leaks(texts: list, key: str) -> list:
    """The texts (str or bytes) holding the key in any form it takes in a URL, or a part of it."""
    forms = {key, urllib.parse.quote(key, safe=""), urllib.parse.quote_plus(key), key.split("+")[0]}
    return [t for t in texts for f in forms if (f.encode() if isinstance(t, bytes) else f) in t]


def chain(error: BaseException) -> list[str]:
    """The text of an exception, its arguments and attributes, and of every exception behind it."""
    texts = []
    while error is not None:
        texts += [str(error), repr(error.args), repr(vars(error))]
        error = error.__cause__ or error.__context__
    return texts


def test_a_missing_key_is_a_clear_config_error(api, tmp_path, monkeypatch):
    monkeypatch.delenv("CITYLIB_STREETVIEW_KEY")
    with pytest.raises(ConfigError, match="CITYLIB_STREETVIEW_KEY"):
        gather(api, tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        gather(api, tmp_path, key_file=str(tmp_path / "nope.txt"))
    assert not api.log and "key" not in {f for f in StreetViewConfig.__dataclass_fields__ if f != "key_env"} - {"key_file"}


def test_redact_hides_plain_and_quoted_keys():
    text = f"a {KEY} b {urllib.parse.quote(KEY, safe='')} c {urllib.parse.quote_plus(KEY)}"
    assert static_api.redact(text, KEY) == "a REDACTED b REDACTED c REDACTED"


# ---------------------------------------------------------------- settings and the CLI


@pytest.mark.parametrize("bad", [{"colour": 1}, {"polygon": "x.geojson"}, {"bbox": None},
                                 {"bbox": [52.4, 4.8, 52.3, 4.9]}, {"headings": [0, 360]},
                                 {"size": [641, 640]}, {"city": "../x"}, {"max_requests": 0},
                                 {"base_url": "ftp://x"}, {"points": "4"}])
def test_bad_settings_fail_at_once(bad):
    with pytest.raises(ConfigError):
        from_dict(StreetViewConfig, {"city": "x", "bbox": [52.3, 4.8, 52.4, 4.9], **bad}, where="test")


def test_cli_stops_cleanly_when_the_key_is_refused(api, tmp_path, capsys):
    api.key = "the-right-key"
    code = cli.main(["streetview", "--city", "amsterdam", "--bbox", "52.36,4.88,52.38,4.91", "--out",
                     str(tmp_path), "--base-url", api.base_url, "--quiet"])
    out, err = capsys.readouterr()
    assert code == 2 and "REQUEST_DENIED" in err and "invalid" in err and "Traceback" not in out + err
    assert len(api.log) == 1


def test_cli_collects_and_reports(api, tmp_path, capsys):
    argv = ["streetview", "--city", "sydney", "--bbox", "-33.88", "151.19", "-33.86", "151.22", "--out",
            str(tmp_path), "--points", "3", "--headings", "0", "120", "240", "--size", "40x30", "--fov", "80",
            "--pitch", "5", "--min-spacing", "100", "--rps", "1000", "--base-url", api.base_url, "--quiet"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert "9 images downloaded" in out and str(tmp_path / "manifest.csv") in out
    assert cli.main([*argv, "--max-requests", "1", "--points", "4"]) == 1  # one more point, no budget left
    assert "budget of 1" in capsys.readouterr().err
    assert cli.main(["streetview", "--city", "x", "--bbox", "1,2,3", "--out", str(tmp_path)]) == 2
    assert cli.main(["streetview", "--city", "x", "--bbox", "1,2,3,4", "--size", "big", "--out", str(tmp_path)]) == 2


# ---------------------------------------------------------------- the point sampler


def polygon_file(tmp_path: Path) -> Path:
    """A MultiPolygon: a square with a square hole, and a triangle beside it."""
    square = [[4.88, 52.36], [4.90, 52.36], [4.90, 52.38], [4.88, 52.38], [4.88, 52.36]]
    hole = [[4.885, 52.365], [4.895, 52.365], [4.895, 52.375], [4.885, 52.375], [4.885, 52.365]]
    triangle = [[4.91, 52.36], [4.93, 52.36], [4.91, 52.38], [4.91, 52.36]]
    doc = {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, "geometry": {
        "type": "MultiPolygon", "coordinates": [[square, hole], [triangle]]}}]}
    path = tmp_path / "area.geojson"
    path.write_text(json.dumps(doc))
    return path


def test_sampling_is_seeded_and_extends_its_prefix():
    area = geosample.bbox_area(BBOX)
    a = geosample.sample_points(area, 50, 60.0, seed=3)
    assert np.array_equal(a, geosample.sample_points(area, 50, 60.0, seed=3)) and a.shape == (50, 2)
    assert not np.array_equal(a, geosample.sample_points(area, 50, 60.0, seed=4))
    assert np.array_equal(geosample.sample_points(area, 20, 60.0, seed=3), a[:20])


def test_sampled_points_keep_their_spacing():
    pts = geosample.sample_points(geosample.bbox_area(BBOX), 300, 80.0, seed=0)
    d = geosample.distance_m(pts[:, None, 0], pts[:, None, 1], pts[None, :, 0], pts[None, :, 1])
    np.fill_diagonal(d, np.inf)
    assert len(pts) == 300 and d.min() >= 80.0
    few = geosample.sample_points(geosample.bbox_area((52.370, 4.890, 52.371, 4.891)), 50, 80.0, seed=0)
    assert 1 <= len(few) < 50  # a 100 m box cannot hold 50 points 80 m apart


def test_sampled_points_lie_inside_the_polygon(tmp_path):
    area = geosample.load_polygon(polygon_file(tmp_path))
    assert area.bbox == (52.36, 4.88, 52.38, 4.93)
    pts = geosample.sample_points(area, 200, 20.0, seed=1)
    lat, lon = pts[:, 0], pts[:, 1]
    in_hole = (lat > 52.365) & (lat < 52.375) & (lon > 4.885) & (lon < 4.895)
    in_square = (lon <= 4.90) & ~in_hole
    in_triangle = (lon >= 4.91) & ((lon - 4.91) / 0.02 + (lat - 52.36) / 0.02 <= 1)
    assert len(pts) == 200 and np.all(in_square | in_triangle) and in_triangle.any() and in_square.any()
    assert not np.any((lon > 4.90) & (lon < 4.91))


def test_point_in_polygon_on_hand_made_points():
    ring = np.array([[0, 0], [4, 0], [4, 4], [0, 4]], float)  # (lon, lat)
    hole = np.array([[1, 1], [3, 1], [3, 3], [1, 3]], float)
    lat = np.array([0.5, 2.0, 2.0, 5.0, 3.5])
    lon = np.array([0.5, 2.0, 3.5, 2.0, 0.5])
    assert geosample.in_polygon(lat, lon, [ring, hole]).tolist() == [True, False, True, False, True]


def test_polygon_files_that_cannot_be_used_say_why(tmp_path):
    (tmp_path / "line.geojson").write_text(json.dumps({"type": "LineString", "coordinates": [[0, 0], [1, 1]]}))
    (tmp_path / "broken.geojson").write_text("{not json")
    with pytest.raises(geosample.AreaError, match="LineString"):
        geosample.load_polygon(tmp_path / "line.geojson")
    with pytest.raises(geosample.AreaError, match="not a readable GeoJSON"):
        geosample.load_polygon(tmp_path / "broken.geojson")
    with pytest.raises(geosample.AreaError, match="not found"):
        geosample.load_polygon(tmp_path / "absent.geojson")


def test_collecting_inside_a_polygon(api, tmp_path):
    r = gather(api, tmp_path / "out", bbox=None, polygon=str(polygon_file(tmp_path)), points=6)
    assert r.complete and r.points == 6
    area = geosample.load_polygon(polygon_file(tmp_path))
    asked = np.array([[float(v) for v in q["location"].split(",")] for e, q in api.log if e == "metadata"])
    assert area.contains(asked[:, 0], asked[:, 1]).all()
