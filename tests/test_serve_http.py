"""`histo serve` over HTTP (Starlette's test client, and raw requests to a live uvicorn for the paths a
client library would normalise): every page and route, results equal to `histo search`, the token, the
upload limits, path escapes answered 4xx with nothing read, and nothing written into the index."""

from __future__ import annotations

import builtins
import http.client
import io
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from serve_support import catalog, index_files, until
from starlette.testclient import TestClient

from histo.cli import main
from pathology.store import TileStore
from search.slide_index import SlideIndex
from search.web import query as query_api
from search.web.app import create_app
from search.web.server import background
from search.web.service import ServeConfig, Service

WEB = Path(__file__).resolve().parent.parent / "search" / "web"


@pytest.fixture(scope="module")
def untouched(demo: dict[str, Path]):
    """The index files' bytes before this module; compared after all of it ran."""
    before = index_files(demo["index"])
    yield before
    assert index_files(demo["index"]) == before, "the server wrote into the index"
    SlideIndex.open(demo["index"], {"run": {"verify": "full"}})


@pytest.fixture(scope="module")
def service(demo: dict[str, Path], untouched: dict) -> Service:
    svc = Service(ServeConfig(index_dir=demo["index"], slides_root=demo["slides"]))
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service: Service) -> TestClient:
    return TestClient(create_app(service.config, service))


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def run_page_query(client: TestClient, data: dict, files: dict | None = None) -> tuple[str, str]:
    """Submit the query form, follow it to the job page and wait for the results; (job id, page)."""
    r = client.post("/query", data=data, files=files, follow_redirects=False)
    assert r.status_code == 303, r.text
    job_url = r.headers["location"]

    def finished() -> str | None:
        page = client.get(job_url).text
        return page if 'id="hits"' in page or 'id="job-error"' in page else None

    return job_url.rsplit("/", 1)[1], until(finished)


def stored_tile(demo: dict[str, Path], slide_id: str, tile: int) -> np.ndarray:
    return TileStore.open(demo["tiles"]).read_selected(slide_id, [tile])[0]


# ---- pages --------------------------------------------------------------------------------------------
def test_archive_lists_filters_and_sorts_the_indexed_slides(client: TestClient, demo: dict) -> None:
    slides = catalog(demo["index"])
    page = client.get("/").text
    rows = re.findall(r'class="slide-row" data-slide="([^"]+)"', page)
    assert rows == sorted(s["slide_id"] for s in slides)
    assert all(f"/slides/{s['slide_id']}/thumbnail.jpg" in page for s in slides)
    hues = dict(re.findall(r'<span class="label" style="--hue: (\d+)">([^<]+)</span>', page))
    assert len(hues) == 3  # one colour per label
    page = client.get("/", params={"label": "class1", "sort": "n_tiles", "order": "desc"}).text
    shown = re.findall(r'class="slide-row" data-slide="([^"]+)"', page)
    wanted = sorted(
        (s for s in slides if s["label"] == "class1"), key=lambda s: (-s["n_tiles"], s["slide_id"])
    )
    assert shown == [s["slide_id"] for s in wanted] and len(shown) == 2
    assert re.findall(r'data-slide="([^"]+)"', client.get("/", params={"q": "c2-p01"}).text) == [
        "SYN-C2-P01-S0"
    ]
    thumb = client.get(f"/slides/{slides[0]['slide_id']}/thumbnail.jpg")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 256


def test_query_page_offers_slides_files_and_upload(client: TestClient, demo: dict) -> None:
    page = client.get("/query", params={"slide_id": "SYN-C1-P00-S0"}).text
    assert 'id="form-slide"' in page and 'id="form-patch"' in page and 'id="form-file"' in page
    assert '<option value="SYN-C1-P00-S0" selected' in page
    for f in sorted(p.name for p in demo["slides"].iterdir() if p.suffix in (".svs", ".tiff")):
        assert f'<option value="{f}">' in page
    assert str(demo["root"]) not in page  # keys, never server paths


def test_slide_query_page_equals_histo_search_and_shows_the_tiles_it_matched(
    client: TestClient, demo: dict, service: Service
) -> None:
    sid = "SYN-C0-P00-S0"
    job_id, page = run_page_query(client, {"source": "slide", "slide_id": sid, "k": "3"})
    code = CliRunner().invoke(main, ["search", "--index", str(demo["index"]), str(demo["slides"] / f"{sid}.svs"),
                                     "--k", "3", "--json"])  # fmt: skip
    assert code.exit_code == 0, code.stderr
    expected = json.loads(code.stdout)["queries"][0]
    ranked = re.findall(r'class="hit[^"]*" data-rank="(\d+)" data-slide="([^"]+)"', page)
    assert [s for _, s in ranked] == [h["slide_id"] for h in expected["results"]]
    assert ranked[0][1] == sid  # the query slide itself, at distance 0
    assert 'data-rank="1"' in page and "majority vote of the top 3" in page
    assert re.search(r'id="prediction">.*?' + re.escape(expected["prediction"]), page, re.S)
    api = client.get(f"/api/jobs/{job_id}").json()
    assert api["state"] == "done" and api["result"]["results"] == expected["results"]
    # Every pair: the query tile and the matched tile, each the stored pixels of that tile.
    first = expected["results"][0]["matches"][0]
    hit_crop = client.get(f"/slides/{sid}/tiles/{first['tile']}.png")
    query_crop = client.get(f"/jobs/{job_id}/tiles/{first['query_tile']}.png")
    for r in (hit_crop, query_crop):
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    stored = stored_tile(demo, sid, first["tile"])
    assert np.array_equal(np.array(Image.open(io.BytesIO(hit_crop.content))), stored)
    assert np.array_equal(np.array(Image.open(io.BytesIO(query_crop.content))), stored)
    for src in set(re.findall(r'<img[^>]+src="([^"]+)"', page)):
        assert client.get(src).status_code == 200, src
    n_pairs = sum(len(h["matches"]) for h in expected["results"])
    assert page.count('class="crop query-crop"') == n_pairs and page.count('class="crop hit-crop"') == n_pairs


def test_results_filters_and_the_patient_toggle(client: TestClient, demo: dict) -> None:
    job_id, page = run_page_query(client, {"source": "slide", "slide_id": "SYN-C0-P00-S0", "k": "6"})
    sites = {s["slide_id"]: s["site"] for s in catalog(demo["index"])}
    filtered = client.get(f"/jobs/{job_id}", params={"site": "site1"}).text
    shown = re.findall(r'data-rank="\d+" data-slide="([^"]+)"', filtered)
    assert shown and all(sites[s] == "site1" for s in shown) and "of 6 shown" in filtered
    assert re.search(r'name="exclude_same_patient" value="1"', page)  # the toggle re-runs with it on
    _, page2 = run_page_query(client, {"source": "slide", "slide_id": "SYN-C0-P00-S0", "k": "3",
                                          "exclude_same_patient": "1"})  # fmt: skip
    assert "SYN-C0-P00-S0" not in re.findall(r'data-rank="\d+" data-slide="([^"]+)"', page2)
    assert 'id="patient-state">excluded<' in page2 and 'id="patient-state">included<' in page


def test_patch_upload_finds_its_tile(client: TestClient, demo: dict) -> None:
    tile = stored_tile(demo, "SYN-C2-P01-S0", 1)
    job_id, page = run_page_query(
        client, {"source": "patch", "k": "4"}, files={"image": ("my patch.png", png(tile), "image/png")}
    )
    ranked = re.findall(r'data-rank="\d+" data-slide="([^"]+)"', page)
    assert len(ranked) == 4 and ranked[0] == "SYN-C2-P01-S0"
    assert "/slides/SYN-C2-P01-S0/tiles/1.png" in page.split('data-rank="2"')[0]
    served = client.get(f"/jobs/{job_id}/query.png")
    assert np.array_equal(np.array(Image.open(io.BytesIO(served.content))), tile)
    assert client.get(f"/jobs/{job_id}/tiles/0.png").status_code == 404  # a patch has no query tiles


def test_a_large_patch_is_kept_only_as_a_display_copy(client: TestClient, service: Service) -> None:
    ramp = np.linspace(0, 255, 1500, dtype=np.uint8)
    big = np.stack([np.tile(ramp, (1200, 1))] * 3, axis=-1)
    job_id, page = run_page_query(
        client, {"source": "patch", "k": "2"}, files={"image": ("big.png", png(big))}
    )
    assert "uploaded patch, 1500 × 1200 px" in page
    shown = Image.open(io.BytesIO(client.get(f"/jobs/{job_id}/query.png").content))
    assert shown.size == (1024, 819)
    assert service.job(job_id).source.rgb is None  # the full image is not kept after the search


def test_a_moved_store_or_slide_is_found_under_slides_root_or_said_missing(
    demo: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from search.web import archive

    monkeypatch.setattr(archive, "_store_records", lambda rows: {})  # as if the tile store had moved
    found = Service(
        ServeConfig(index_dir=demo["index"], slides_root=demo["slides"], cache_dir=demo["root"] / "c2")
    )
    try:
        c = TestClient(create_app(found.config, found))
        entry = found.archive.slide("SYN-C0-P00-S0")
        assert (
            entry.path == (demo["slides"] / "SYN-C0-P00-S0.svs").resolve() and entry.tile_size_level0 is None
        )
        crop = Image.open(io.BytesIO(c.get("/slides/SYN-C0-P00-S0/tiles/2.png").content))
        assert np.array_equal(np.array(crop), stored_tile(demo, "SYN-C0-P00-S0", 2))  # side from the scale
        assert viewer_data(c.get("/slides/SYN-C0-P00-S0").text)["mosaic"] == []  # no store: no mosaic
    finally:
        found.close()
    lost = Service(ServeConfig(index_dir=demo["index"], cache_dir=demo["root"] / "c3"))
    try:
        c = TestClient(create_app(lost.config, lost))
        assert "no file" in c.get("/").text and "/slides/SYN-C0-P00-S0/thumbnail.jpg" not in c.get("/").text
        r = c.get("/slides/SYN-C0-P00-S0/thumbnail.jpg", headers={"accept": "application/json"})
        assert r.status_code == 404 and r.json()["error"].startswith(
            "slide file of 'SYN-C0-P00-S0' not found"
        )
        assert c.post("/api/search", json={"slide_id": "SYN-C0-P00-S0"}).status_code == 404
        assert c.get("/api/slides").json()["slides"][0]["has_file"] is False
    finally:
        lost.close()


def test_slides_root_file_query(client: TestClient) -> None:
    job_id, page = run_page_query(client, {"source": "file", "file": "SYN-C1-P01-S0.tiff", "k": "2"})
    assert re.findall(r'data-rank="1" data-slide="([^"]+)"', page) == ["SYN-C1-P01-S0"]
    assert client.get(f"/jobs/{job_id}/thumbnail.jpg").status_code == 200


def test_viewer_and_deep_zoom(client: TestClient, demo: dict) -> None:
    sid = "SYN-C1-P00-S0"
    store = TileStore.open(demo["tiles"])
    data = viewer_data(client.get(f"/slides/{sid}").text)
    assert data["dzi"] == f"/dz/{sid}.dzi" and data["offset"] == [0, 0]
    assert data["mosaic"] == store.coords(sid).tolist()
    assert data["cellular"] == store.coords(sid)[store.selected(sid)].tolist() and data["matches"] == []
    rec = store.record(sid)
    assert data["tile"] == rec.tile_size_level0
    dzi = client.get(data["dzi"])
    assert dzi.headers["content-type"] == "application/xml"
    assert f'Width="{rec.width}" Height="{rec.height}"' in dzi.text
    top = 12  # 1280 x 1024: ceil(log2(1280)) + 1 levels
    tile = client.get(f"/dz/{sid}_files/{top - 1}/0_0.jpeg")
    assert tile.status_code == 200 and Image.open(io.BytesIO(tile.content)).size == (255, 255)
    assert client.get(f"/dz/{sid}_files/{top}/0_0.jpeg").status_code == 404
    assert client.get(f"/dz/{sid}_files/{top - 1}/99_0.jpeg").status_code == 404
    # A hit's matched tiles, and the query's own tiles on the query slide.
    job = client.post("/api/search", json={"slide_id": "SYN-C0-P01-S0", "k": 3})
    job_id = job.headers["x-histo-job"]
    second = job.json()["results"][1]
    view = viewer_data(client.get(f"/slides/{second['slide_id']}", params={"job": job_id, "hit": 2}).text)
    assert [m["xy"] for m in view["matches"]] == [m["xy"] for m in second["matches"]]
    results = client.get(f"/jobs/{job_id}").text
    link = f"/slides/SYN-C0-P01-S0?job={job_id}&amp;hit=2&amp;side=query"
    assert link in results  # the results page links each hit to the query tiles on the query slide
    on_query = viewer_data(client.get(link.replace("&amp;", "&")).text)
    assert [m["xy"] for m in on_query["matches"]] == [m["query_xy"] for m in second["matches"]]
    assert client.get(f"/slides/{sid}", params={"job": job_id, "hit": 2}).status_code == 404  # not hit 2
    assert client.get(f"/slides/{second['slide_id']}", params={"job": job_id, "hit": 9}).status_code == 404


def viewer_data(page: str) -> dict:
    return json.loads(
        re.search(r'<script type="application/json" id="viewer-data">(.*?)</script>', page, re.S)[1]
    )


# ---- JSON API -----------------------------------------------------------------------------------------
def test_api_slides_is_the_catalog_without_paths(client: TestClient, demo: dict) -> None:
    r = client.get("/api/slides")
    body = r.json()
    assert [s["slide_id"] for s in body["slides"]] == [s["slide_id"] for s in catalog(demo["index"])]
    assert set(body["slides"][0]) == {"slide_id", "label", "patient", "site", "project", "n_tiles", "n_mosaic",
                                      "has_file"}  # fmt: skip
    assert body["index"]["slides"] == 6 and body["index"]["tile_px"] == 64
    assert str(demo["root"]) not in r.text and "/tmp" not in r.text


def test_api_search_mirrors_histo_search_json(client: TestClient, demo: dict) -> None:
    sid = "SYN-C2-P00-S0"
    r = client.post("/api/search", json={"slide_id": sid, "k": 2, "mode": "float"})
    assert r.status_code == 200
    got = r.json()
    cli = CliRunner().invoke(main, ["search", "--index", str(demo["index"]), str(demo["slides"] / f"{sid}.svs"),
                                    "--k", "2", "--mode", "float", "--json"])  # fmt: skip
    expected = json.loads(cli.stdout)["queries"][0]
    assert set(got) == set(expected) == {"query", "prediction", "results", "search"}
    assert got["query"] == sid and got["results"] == expected["results"]
    assert got["prediction"] == expected["prediction"] and got["search"]["mode"] == "float"
    tile = stored_tile(demo, sid, 0)
    patch = client.post("/api/search", files={"image": ("p.png", png(tile), "image/png")}, data={"k": "3"})
    assert patch.status_code == 200 and patch.json()["query"] == "p.png"
    assert patch.json()["results"][0]["slide_id"] == sid and len(patch.json()["results"]) == 3
    job = client.get(f"/api/jobs/{patch.headers['x-histo-job']}").json()
    assert job["state"] == "done" and job["result"] == patch.json()


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"slide_id": "SYN-C0-P00-S0", "k": 0}, 400, "k must be between 1 and 100"),
        ({"slide_id": "SYN-C0-P00-S0", "k": 101}, 400, "k must be between 1 and 100"),
        ({"slide_id": "SYN-C0-P00-S0", "k": "three"}, 400, "k must be a whole number"),
        ({"slide_id": "SYN-C0-P00-S0", "mode": "cosine"}, 400, "mode must be one of barcode, float"),
        ({"slide_id": "SYN-C0-P00-S0", "exclude_same_patient": "maybe"}, 400, "must be true or false"),
        ({"slide_id": "NOPE"}, 404, "no indexed slide 'NOPE'"),
        ({"source": "telepathy"}, 400, "source must be one of"),
        ({"source": "patch"}, 400, "no image uploaded"),
    ],
)
def test_api_search_refuses_bad_queries(client: TestClient, body: dict, status: int, says: str) -> None:
    r = client.post("/api/search", json=body)
    assert r.status_code == status and says in r.json()["error"]


def test_api_search_refuses_bad_bodies(client: TestClient) -> None:
    r = client.post("/api/search", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "request body is not valid JSON"
    r = client.post("/api/search", json=[1, 2])
    assert r.status_code == 400 and r.json()["error"] == "request body must be a JSON object"
    assert client.get("/api/jobs/nope").status_code == 404
    assert client.get("/api/search").status_code == 405


# ---- uploads --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def strict(service: Service) -> TestClient:
    """An app with small limits: 20 kB uploads and 64 x 64 pixels."""
    small = Service(
        ServeConfig(index_dir=service.config.index_dir, max_upload_bytes=20_000, max_pixels=64 * 64)
    )
    yield TestClient(create_app(small.config, small))
    small.close()


def _upload(client: TestClient, data: bytes, name: str = "p.png", ctype: str = "image/png"):
    return client.post("/api/search", files={"image": (name, data, ctype)})


def test_upload_limits(strict: TestClient) -> None:
    rng = np.random.default_rng(0)
    ok = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    assert _upload(strict, png(ok)).status_code == 200
    big = _upload(strict, png(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)))  # 120 kB
    assert big.status_code == 413 and "request body over the" in big.json()["error"]
    streamed = strict.post(  # no Content-Length: counted while it arrives
        "/api/search",
        content=iter([b"x" * 50_000, b"y" * 50_000]),
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert streamed.status_code == 413
    many = _upload(strict, png(np.full((65, 65, 3), 200, np.uint8)))  # small file, too many pixels
    assert many.status_code == 413 and "4,225 pixels is more than the 4,096 allowed" in many.json()["error"]
    tiny = _upload(strict, png(ok[:4, :4]))
    assert tiny.status_code == 400 and "too small" in tiny.json()["error"]


def test_a_decompression_bomb_is_refused_before_decoding(client: TestClient) -> None:
    bomb = png(np.zeros((5000, 5000, 3), np.uint8))  # 25 M pixels in about 25 kB
    assert len(bomb) < 200_000
    r = _upload(client, bomb, "bomb.png")
    assert r.status_code == 413 and "more than the 16,777,216 allowed" in r.json()["error"]


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_a_huge_declared_image_is_refused_with_its_size(
    client: TestClient, tmp_path: Path, suffix: str
) -> None:
    """Past twice Pillow's own limit `Image.open` raises before the size can be read; the upload is
    opened header first, so the answer still names the size (as `histo search` does for a file)."""
    from faults_support import image_declaring

    huge = image_declaring(tmp_path / f"huge{suffix}", np.zeros((8, 8, 3), np.uint8), 50_000, 50_000)
    r = _upload(client, huge.read_bytes(), huge.name)
    assert r.status_code == 413, r.text
    assert "50000x50000 = 2,500,000,000 pixels is more than the 16,777,216 allowed" in r.json()["error"]


@pytest.mark.parametrize(
    ("data", "ctype", "says"),
    [
        (b"GIF89a" + bytes(100), "image/gif", "not a PNG, JPEG, TIFF, BMP, WEBP image"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml", "not a PNG"),
        (b"hello, world", "image/png", "not a PNG"),
        (b"\x89PNG\r\n\x1a\n" + bytes(40), "image/png", "p.png:"),
        (png(np.zeros((32, 32, 3), np.uint8)), "text/plain", "not an image upload (content type text/plain)"),
        (b"", "image/png", "empty upload"),
    ],
)
def test_only_images_are_accepted(client: TestClient, data: bytes, ctype: str, says: str) -> None:
    r = _upload(client, data, "p.png", ctype)
    assert r.status_code == 400 and says in r.json()["error"], r.text


def test_upload_by_the_page_gives_an_error_page(client: TestClient) -> None:
    r = client.post("/query", data={"source": "patch"}, files={"image": ("x.txt", b"hello", "text/plain")})
    assert r.status_code == 400 and 'id="error"' in r.text and "not an image upload" in r.text


# ---- token ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def guarded(service: Service) -> TestClient:
    config = ServeConfig(index_dir=service.config.index_dir, token="s3cret-token")
    return TestClient(create_app(config, service))


GUARDED_ROUTES = ["/", "/query", "/api/slides", "/static/style.css", "/static/openseadragon/openseadragon.min.js",
                  "/slides/SYN-C0-P00-S0", "/slides/SYN-C0-P00-S0/thumbnail.jpg", "/slides/SYN-C0-P00-S0/tiles/0.png",
                  "/dz/SYN-C0-P00-S0.dzi", "/dz/SYN-C0-P00-S0_files/11/0_0.jpeg", "/jobs/x", "/api/jobs/x",
                  "/no-such-page"]  # fmt: skip


@pytest.mark.parametrize("route", GUARDED_ROUTES)
def test_the_token_is_required_on_every_route(guarded: TestClient, route: str) -> None:
    plain = guarded.get(route)
    assert plain.status_code == 401
    assert guarded.get(route, headers={"authorization": "Bearer wrong"}).status_code == 401
    assert guarded.get(route, headers={"authorization": "Bearer s3cret-token"}).status_code in (200, 404)
    assert guarded.post("/api/search", json={"slide_id": "SYN-C0-P00-S0"}).status_code == 401


def test_token_once_in_the_url_becomes_a_cookie(guarded: TestClient) -> None:
    page = guarded.get("/", headers={"accept": "text/html"})
    assert page.status_code == 401 and 'name="token"' in page.text  # the page asks for it
    api = guarded.get("/api/slides")
    assert api.json() == {"error": "a token is required (Authorization: Bearer TOKEN)", "status": 401}
    fresh = TestClient(guarded.app)
    r = fresh.get("/query?token=s3cret-token&slide_id=SYN-C0-P00-S0", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/query?slide_id=SYN-C0-P00-S0"
    assert (
        "httponly" in r.headers["set-cookie"].lower() and "samesite=strict" in r.headers["set-cookie"].lower()
    )
    assert fresh.get("/api/slides").status_code == 200  # the cookie now carries it
    assert TestClient(guarded.app).get("/?token=wrong").status_code == 401


# ---- path escapes and unknown ids: 4xx, nothing read ----------------------------------------------------
ESCAPES = [
    "/slides/..%2F..%2F..%2Fetc%2Fpasswd/thumbnail.jpg",
    "/slides/%2Fetc%2Fpasswd/thumbnail.jpg",
    "/slides/../../etc/passwd",
    "/slides/%2e%2e/thumbnail.jpg",
    "/slides/..%5C..%5Cindex/thumbnail.jpg",
    "/slides/SYN-C0-P00-S0%2F..%2F..%2Fmodel.pt/tiles/0.png",
    "/slides/NOPE/thumbnail.jpg",
    "/slides/NOPE",
    "/slides/SYN-C0-P00-S0/tiles/999.png",
    "/slides/SYN-C0-P00-S0/tiles/-1.png",
    "/dz/..%2F..%2Findex.dzi",
    "/dz/%2Fetc%2Fpasswd_files/0/0_0.jpeg",
    "/dz/NOPE_files/0/0_0.jpeg",
    "/static/../app.py",
    "/static/%2e%2e/app.py",
    "/static/..%2Fapp.py",
    "/jobs/..%2F..%2Fetc%2Fpasswd",
    "/jobs/nope/tiles/0.png",
    "/jobs/nope/query.png",
    "//etc/passwd",
]


@pytest.fixture(scope="module")
def live(client: TestClient):
    with background(client.app) as url:
        yield urlsplit(url)


def raw_get(live, path: str) -> tuple[int, bytes]:
    """GET `path` byte for byte (no client-side normalisation), through uvicorn's own parsing."""
    conn = http.client.HTTPConnection(live.hostname, live.port, timeout=30)
    conn.putrequest("GET", path, skip_accept_encoding=True)
    conn.endheaders()
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, body


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch, demo: dict):
    """Every file opened or slide opened while the test runs, outside search/web's own templates."""
    seen: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *a, **k):
        seen.append(str(file))
        return real_open(file, *a, **k)

    def spy_os_open(path, *a, **k):
        seen.append(str(path))
        return real_os_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    import openslide

    real_osr = openslide.OpenSlide.__init__

    def spy_osr(self, filename, *a, **k):
        seen.append(str(filename))
        return real_osr(self, filename, *a, **k)

    monkeypatch.setattr(openslide.OpenSlide, "__init__", spy_osr)
    yield lambda: [p for p in seen if not p.startswith(str(WEB / "templates"))]


@pytest.mark.parametrize("path", ESCAPES)
def test_path_escapes_and_unknown_ids_are_4xx_and_read_nothing(live, reads, path: str) -> None:
    status, body = raw_get(live, path)
    assert 400 <= status < 500, (path, status)
    assert b"Traceback" not in body
    assert reads() == [], (path, reads())


def test_the_read_spy_sees_real_reads(live, reads, demo: dict) -> None:
    """The control for the test above: a served picture is seen being read (from the cache or the slide)."""
    status, _ = raw_get(live, "/slides/SYN-C2-P00-S0/tiles/0.png")
    assert status == 200 and any(str(demo["index"]) in p or str(demo["slides"]) in p for p in reads())


@pytest.mark.parametrize(
    "body",
    [
        {"slide_id": "../SYN-C0-P00-S0"},
        {"slide_id": "/etc/passwd"},
        {"source": "file", "file": "/etc/passwd"},
        {"source": "file", "file": "../index/model.pt"},
        {"source": "file", "file": "..%2Findex%2Fmodel.pt"},
        {"source": "file", "file": "SYN-C0-P00-S0"},
    ],
)
def test_query_names_are_looked_up_never_opened(client: TestClient, reads, demo: dict, body: dict) -> None:
    r = client.post("/api/search", json=body)
    assert r.status_code == 404
    assert not [p for p in reads() if str(demo["root"]) in p or p.startswith("/etc")]


# ---- errors and the index -------------------------------------------------------------------------------
def test_errors_are_pages_or_json_never_tracebacks(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    quiet = TestClient(create_app(service.config, service), raise_server_exceptions=False)

    def broken(*args, **kwargs):
        raise RuntimeError(f"boom in {service.config.index_dir}")

    monkeypatch.setattr(service.images, "thumbnail", broken)
    page = quiet.get("/slides/SYN-C0-P00-S0/thumbnail.jpg", headers={"accept": "text/html"})
    assert page.status_code == 500 and "internal error" in page.text
    assert "Traceback" not in page.text and "boom" not in page.text
    assert quiet.get("/api/slides/nope").json()["status"] == 404


def test_a_failed_query_says_why_without_server_paths(
    client: TestClient, service: Service, demo: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from histo.errors import InputFileError

    def no_tissue(index, path, mpp=None):
        raise InputFileError(path, "no tissue: none of 20 grid tiles is >= 70% tissue")

    monkeypatch.setattr(query_api, "tile_query_slide", no_tissue)
    _, page = run_page_query(client, {"source": "file", "file": "SYN-C0-P01-S0.tiff"})
    assert 'id="job-error"' in page and "SYN-C0-P01-S0.tiff: no tissue: none of 20 grid tiles" in page
    assert str(demo["slides"]) not in page
    r = client.post("/api/search", json={"source": "file", "file": "SYN-C0-P01-S0.tiff"})
    assert r.status_code == 422 and r.json()["error"].startswith("SYN-C0-P01-S0.tiff: no tissue")


def test_the_cache_is_beside_the_index_files_and_a_cache_dir_keeps_it_out(
    service: Service, demo: dict, tmp_path: Path
) -> None:
    cache = demo["index"] / ".serve-cache"
    assert service.cache_dir == cache.resolve() and any(cache.rglob("*.png"))
    manifest = json.loads((demo["index"] / "manifest.json").read_text())
    assert not [f for f in manifest["files"] if ".serve-cache" in f]
    own = Service(ServeConfig(index_dir=demo["index"], cache_dir=tmp_path / "pictures"))
    try:
        TestClient(create_app(own.config, own)).get("/slides/SYN-C0-P00-S0/tiles/0.png")
        assert len(list((tmp_path / "pictures").rglob("*.png"))) == 1
    finally:
        own.close()


def test_twenty_concurrent_page_loads(live, client: TestClient) -> None:
    job_id, page = run_page_query(client, {"source": "slide", "slide_id": "SYN-C1-P01-S0", "k": "5"})
    urls = [f"/jobs/{job_id}", *sorted(set(re.findall(r'<img[^>]+src="([^"]+)"', page)))]
    results: list[int] = []

    def load() -> None:
        for url in urls:
            results.append(raw_get(live, url)[0])

    threads = [threading.Thread(target=load) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results.count(200) == 20 * len(urls)


# ---- the command ----------------------------------------------------------------------------------------
def test_histo_help_lists_serve_without_importing_the_web_stack() -> None:
    code = "import sys; from histo.cli import main; main(['--help'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "serve" in out.stdout and "search page" in out.stdout
    probe = "import sys\nfrom histo.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n" \
            "print(sorted(m for m in ('starlette', 'uvicorn', 'jinja2', 'search.web') if m in sys.modules))"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.stdout.splitlines()[-1] == "[]"


def test_serve_refuses_a_missing_index_in_one_line(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["serve", "--index", str(tmp_path / "none")])
    assert r.exit_code == 2 and r.stderr.strip() == f"error: {tmp_path / 'none'}: no such index directory"


def test_serve_prints_its_url_and_stops_on_ctrl_c(demo: dict) -> None:
    import signal
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "histo.cli", "serve", "--index", str(demo["index"]), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        assert lines[1].strip() == f"open http://127.0.0.1:{port}/", lines
        status = until(lambda: _status(port), timeout=60, step=0.2)
        assert status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    assert "Traceback" not in proc.stderr.read()


def _status(port: int) -> int | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/api/slides")
        return conn.getresponse().status
    except OSError:
        return None


def test_slides_root_lists_ome_zarr_images_as_slides_not_folders(demo: dict, tmp_path: Path) -> None:
    """An OME-Zarr image is a folder of chunks: the query page lists it as one slide, never its chunks."""
    from slide_support import write_ngff

    from search.web.archive import Archive

    root = tmp_path / "archive"
    (root / "sub").mkdir(parents=True)
    (root / "a.svs").write_bytes(b"x")
    (root / "sub" / "c.tiff").write_bytes(b"x")
    (root / "notes.txt").write_bytes(b"x")
    write_ngff(root / "sub" / "b.ome.zarr", np.full((300, 400, 3), 200, np.uint8), 0.5, levels=2)
    archive = Archive(SlideIndex.open(demo["index"]), root)
    assert sorted(archive.list_files()) == ["a.svs", "sub/b.ome.zarr", "sub/c.tiff"]
