"""Benchmark of `histo serve` (issue "histo serve", Speed): the results page of a query against
`histo search` on the same query, and concurrent page loads. Prints a table and writes JSON.

- `histo search`: the command a user runs (a new process: start-up, index open and verification, model
  load, tiling, features, search), wall time.
- in-process search: tiling the query and searching on an index already open (what the server's job
  does before it reads the crops), warm.
- results page: from submitting the query form to the results HTML and every image on it fetched (six at
  a time, as a browser does), on the running server; "cold" with an empty picture cache, then "warm".
- concurrency: `--clients` simultaneous loads of the results page with all its images.

    .venv/bin/python scripts/bench_serve.py --index demo_out/index --out bench_out/serve.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlencode, urlsplit

BROWSER_CONNECTIONS = 6  # parallel connections per host of a browser


def get(base: str, path: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body) of one request on a new connection."""
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    out = (r.status, dict(r.getheaders()), r.read())
    conn.close()
    return out


def load_page(base: str, path: str) -> tuple[int, int, list[int]]:
    """Fetch a page and then all its images (BROWSER_CONNECTIONS at a time); (status, n images, statuses)."""
    status, _, html = get(base, path)
    images = sorted(set(re.findall(r'<img[^>]+src="([^"]+)"', html.decode())))
    with ThreadPoolExecutor(BROWSER_CONNECTIONS) as pool:
        statuses = list(pool.map(lambda src: get(base, src)[0], images))
    return status, len(images), statuses


def page_query(base: str, slide_id: str, k: int) -> dict:
    """Submit the query form and wait for the results page with all its images; timings in seconds."""
    start = time.perf_counter()
    form = urlencode({"source": "slide", "slide_id": slide_id, "k": k}).encode()
    status, headers, _ = get(
        base, "/query", "POST", form, {"content-type": "application/x-www-form-urlencoded"}
    )
    assert status == 303, status
    job_id = headers["location"].rsplit("/", 1)[1]
    while True:
        state = json.loads(get(base, f"/api/jobs/{job_id}")[2])
        if state["state"] in ("done", "failed"):
            break
        time.sleep(0.01)
    assert state["state"] == "done", state
    done = time.perf_counter()
    page_status, n_images, statuses = load_page(base, f"/jobs/{job_id}")
    assert page_status == 200 and all(s == 200 for s in statuses), (page_status, statuses)
    end = time.perf_counter()
    return {"job": job_id, "query_s": done - start, "page_s": end - start, "images": n_images}


def cli_search(index: Path, query: Path, k: int) -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "histo.cli",
            "search",
            "--index",
            str(index),
            str(query),
            "--k",
            str(k),
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"histo search failed: {proc.stderr[-500:]}")
    return time.perf_counter() - start


def concurrent_loads(base: str, path: str, clients: int) -> dict:
    """`clients` simultaneous loads of the page and its images; latencies and failures."""
    latencies, failures = [], []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def one() -> None:
        barrier.wait()
        start = time.perf_counter()
        try:
            status, _, statuses = load_page(base, path)
            bad = [s for s in [status, *statuses] if s != 200]
        except OSError as e:
            bad = [repr(e)]
        with lock:
            latencies.append(time.perf_counter() - start)
            failures.extend(bad)

    start = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    return {
        "clients": clients,
        "failures": len(failures),
        "wall_s": time.perf_counter() - start,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "max_s": latencies[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--index", type=Path, required=True, help="an index dir (e.g. demo_out/index)")
    parser.add_argument("--slide", default=None, help="indexed slide to query with (default: the first)")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench_out/serve.json"))
    args = parser.parse_args()

    from search.web import query as search_api
    from search.web.app import create_app
    from search.web.server import background
    from search.web.service import ServeConfig, Service

    with tempfile.TemporaryDirectory() as cache:
        service = Service(ServeConfig(index_dir=args.index, cache_dir=Path(cache)))
        slide_id = args.slide or next(iter(service.archive.slides))
        query = service.archive.slide_file(service.archive.slide(slide_id))
        cli = [cli_search(args.index, query, args.k) for _ in range(args.repeat)]
        index = service.archive.index
        in_process = []
        for _ in range(args.repeat + 1):
            start = time.perf_counter()
            tiles = search_api.tile_query_slide(index, query)
            search_api.search_tiles(index, tiles, args.k, service.search_cfg.mode, False, False)
            in_process.append(time.perf_counter() - start)
        in_process = in_process[1:]  # the first call warms the model
        with background(create_app(service.config, service)) as base:
            runs = [page_query(base, slide_id, args.k) for _ in range(args.repeat + 1)]
            loads = concurrent_loads(base, f"/jobs/{runs[-1]['job']}", args.clients)
        service.close()

    cold, warm = runs[0], runs[1:]
    cli_s = statistics.median(cli)
    report = {
        "index": str(args.index),
        "slides": len(service.archive),
        "query": slide_id,
        "k": args.k,
        "images_on_page": cold["images"],
        "histo_search_s": cli_s,
        "in_process_search_s": statistics.median(in_process),
        "page_cold_s": cold["page_s"],
        "page_warm_s": statistics.median(r["page_s"] for r in warm),
        "page_cold_over_histo_search": cold["page_s"] / cli_s,
        "page_warm_over_histo_search": statistics.median(r["page_s"] for r in warm) / cli_s,
        "page_warm_over_in_process_search": statistics.median(r["page_s"] for r in warm)
        / statistics.median(in_process),
        "concurrent": loads,
    }
    rows = [
        ("histo search (new process)", f"{cli_s:.3f} s"),
        ("in-process tiling + search", f"{report['in_process_search_s']:.3f} s"),
        (f"results page, cold cache ({cold['images']} images)", f"{cold['page_s']:.3f} s"),
        ("results page, warm cache", f"{report['page_warm_s']:.3f} s"),
        ("page / histo search (cold, warm)",
         f"{report['page_cold_over_histo_search']:.2f}x, {report['page_warm_over_histo_search']:.2f}x"),
        ("page / in-process search (warm)", f"{report['page_warm_over_in_process_search']:.2f}x"),
        (f"{args.clients} concurrent page loads: failures", str(loads["failures"])),
        ("  latency p50 / p95 / max", f"{loads['p50_s']:.3f} / {loads['p95_s']:.3f} / {loads['max_s']:.3f} s"),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    print(f"histo serve benchmark: {report['slides']} slides, query {slide_id}, k={args.k}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
