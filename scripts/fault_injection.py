"""Fault injection: a mixed bad batch through every command, one row per fault (issue 20).

Builds small synthetic inputs in a work folder, injects one class of fault per scenario, runs the real
`histo` command in a subprocess and checks what it did: the exit code, that no traceback reached the
terminal, and that its output names what happened. Prints one row per scenario and writes them as JSON.

    .venv/bin/python scripts/fault_injection.py [--work DIR] [--json-out FILE]

A full disk is simulated (the tile store's writer raises OSError ENOSPC after its first slide); permission
faults are real: when run as root, the commands run with root's file-permission override dropped (root
reads every file otherwise). Exit status 1 when any scenario did not behave as expected.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(
    1, str(ROOT / "tests")
)  # faults_support: the tests' fault builders (DISK_FULL, image_declaring)
TILE = ["--tile-px", "64"]


@dataclass
class Row:
    """One scenario's outcome."""

    command: str
    fault: str
    exit: int
    expected_exit: list[int]
    traceback: bool
    report: str  # the counts of the JSON summary, or the last line of stderr
    expected_text: list[str]
    ok: bool
    seconds: float
    detail: dict = field(default_factory=dict)


def _without_file_override() -> None:
    """preexec_fn for root: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so permissions apply."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def histo(
    args: list[str], wrapper: str | None = None, unprivileged: bool = False
) -> subprocess.CompletedProcess:
    """Run `histo ARGS` (through a `python -c` wrapper that installs a simulated fault, when given)."""
    head = [sys.executable, "-c", wrapper] if wrapper else [sys.executable, "-m", "histo.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    demote = _without_file_override if unprivileged and os.geteuid() == 0 else None
    return subprocess.run(
        [*head, *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=env, preexec_fn=demote,
        timeout=900,
    )  # fmt: skip


def _report(result: subprocess.CompletedProcess) -> tuple[str, dict]:
    try:
        summary = json.loads(result.stdout)
    except ValueError:
        summary = None
    lines = result.stderr.strip().splitlines()
    last = lines[-1] if lines else ""
    if isinstance(summary, dict) and "counts" in summary:
        counts = summary["counts"]
        text = f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed"
        if "stopped" in summary:
            text += f"; stopped, {summary['not_processed']} not processed"
        failed = {o["id"]: o["reason"] for o in summary.get("outcomes", []) if o["status"] == "failed"}
        failed |= {q["query"]: q["error"] for q in summary.get("queries", []) if "error" in q}
        warned = {
            q["query"]: q["search"]["query"]["warning"]
            for q in summary.get("queries", [])
            if (q.get("search", {}).get("query") or {}).get("warning")
        }
        return text, {"failed": failed, **({"warned": warned} if warned else {})}
    return last[:160], {}


def scenario(
    rows: list[Row], command: str, fault: str, args: list[str], exit_codes: list[int], texts: list[str], **kw
) -> subprocess.CompletedProcess:
    """Run one scenario and append its row; `texts` must all appear in the command's output."""
    start = time.monotonic()
    result = histo(args, **kw)
    output = result.stdout + result.stderr
    report, detail = _report(result)
    tb = "Traceback (most recent call last)" in result.stderr
    ok = result.returncode in exit_codes and not tb and all(t in output for t in texts)
    if not ok:
        detail["stderr_tail"] = result.stderr[-2000:]
    rows.append(
        Row(
            command,
            fault,
            result.returncode,
            exit_codes,
            tb,
            report,
            texts,
            ok,
            time.monotonic() - start,
            detail,
        )
    )
    print(f"  {'ok ' if ok else 'BAD'} {command:<16} {fault}", file=sys.stderr, flush=True)
    return result


def check(rows: list[Row], command: str, fault: str, probe: Callable[[], tuple[bool, str]]) -> None:
    """A scenario that is not one command's exit (processes, file modes): `probe` -> (ok, report)."""
    start = time.monotonic()
    ok, report = probe()
    rows.append(Row(command, fault, 0, [0], False, report, [], ok, time.monotonic() - start))
    print(f"  {'ok ' if ok else 'BAD'} {command:<16} {fault}", file=sys.stderr, flush=True)


def _zero_chunk(array_dir: Path, k: int = 0) -> None:
    """Zero 64 bytes in the middle of the k-th stored chunk of a zarr array."""
    chunk = sorted(p for p in (array_dir / "c").rglob("*") if p.is_file())[k]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    chunk.write_bytes(bytes(data))


def pathology_inputs(work: Path) -> dict[str, Path]:
    """A cohort of 3 good synthetic slides and one of each bad input, plus labels CSVs and a model."""
    from pathology.kimianet import random_init_checkpoint
    from pathology.synthetic import write_synthetic_slide

    cohort = work / "cohort"
    (cohort / "locked").mkdir(parents=True)
    (cohort / "site_b").mkdir()
    for k in range(3):
        write_synthetic_slide(cohort / f"s{k}.svs", 1600, 1200, k % 2, seed=k)
    write_synthetic_slide(cohort / "site_b" / "s1.svs", 1600, 1200, 0, seed=7)  # a second s1 in this run
    shutil.copy(cohort / "s0.svs", cohort / "case..1.svs")
    (cohort / "empty.svs").write_bytes(b"")
    whole = (cohort / "s1.svs").read_bytes()
    (cohort / "cut.svs").write_bytes(whole[: len(whole) // 2])
    (cohort / "notes.svs").write_text("not a slide\n" * 100)
    os.symlink(cohort / "loop.svs", cohort / "loop.svs")
    shutil.copy(cohort / "s2.svs", cohort / "secret.svs")
    (cohort / "secret.svs").chmod(0)
    shutil.copy(cohort / "s2.svs", cohort / "locked" / "s9.svs")
    (cohort / "locked").chmod(0)
    other = work / "other"
    other.mkdir()
    write_synthetic_slide(other / "s0.svs", 1600, 1200, 1, seed=11)  # another slide named s0
    (work / "v1.csv").write_text("slide,label,site\ns0,A,X\ns1.svs,B,X\ns2,A,Y\ncase..1,B,Y\n")
    (work / "v2.csv").write_text("slide,label,site\ns0,B,X\ns1.svs,B,Z\ns2,A,Y\ncase..1,B,Y\n")
    (work / "semicolon.csv").write_text("slide;label\ns0;A\n")
    (work / "twice.csv").write_text("slide,label\ns0.svs,A\ns0,B\n")
    (work / "a-file").write_text("not a folder")
    small = work / "small"
    small.mkdir()
    for k in range(3):
        shutil.copy(cohort / f"s{k}.svs", small / f"s{k}.svs")
    return {
        "cohort": cohort, "other": other, "small": small, "inputs": work,
        "model": random_init_checkpoint(work / "kimianet.pt", input_px=32),
    }  # fmt: skip


def segment_inputs(work: Path) -> dict[str, Path]:
    """Synthetic BraTS cases: two good, one without T2, the same case ID at another site, and a U-Net."""
    import torch

    from segmentation.infer import save_model
    from segmentation.synthetic import make_cases
    from segmentation.unet import UNet3D

    cases = make_cases(work / "cases", 3, shape=(16, 16, 16), seed=1)
    next(cases[2].glob("*_t2.nii.gz")).unlink()
    site_c = make_cases(work / "site_c", 1, shape=(16, 16, 16), seed=9)[0]  # ID of cases[0], other scans
    torch.manual_seed(0)
    model = work / "unet.pt"
    save_model(model, UNet3D(channels=(4, 8), blocks_per_level=1, expansion=1, norm="batch"), {})
    return {"cases": work / "cases", "site_c": site_c, "model": model, "bad": cases[2]}


def pathology_scenarios(rows: list[Row], work: Path, inp: dict[str, Path]) -> None:
    from faults_support import DISK_FULL

    from histo.lock import writer_lock

    store, index = work / "store.zarr", work / "index"
    cohort, given = inp["cohort"], inp["inputs"]
    scenario(
        rows, "tile", "mixed cohort: empty, truncated, text, link loop, unreadable file and folder, "
        "duplicate ID, case..1",
        ["tile", cohort, "--out", store, *TILE, "--save-pixels", "--labels", given / "v1.csv", "--json"],
        [1], ["permission denied", "truncated", "symbolic link loop", "folder not searched", "duplicate slide ID"],
        unprivileged=True,
    )  # fmt: skip
    scenario(rows, "tile", "re-run with a corrected labels CSV", [
        "tile", cohort, "--out", store, *TILE, "--save-pixels", "--labels", given / "v2.csv", "--json"
    ], [1], ["updated: s0: label A -> B", "updated: s1: site X -> Z"], unprivileged=True)  # fmt: skip
    scenario(rows, "tile", "another file under a done slide ID", [
        "tile", inp["other"] / "s0.svs", "--out", store, *TILE, "--json"
    ], [1], ["pass --replace"])  # fmt: skip
    with writer_lock(store, "histo tile (held by fault_injection.py)"):
        scenario(rows, "tile", "a second unsharded writer", ["tile", cohort, "--out", store, *TILE], [2], [
            "is writing here"
        ])  # fmt: skip
    scenario(rows, "tile", "disk full after one slide (simulated ENOSPC)", [
        "tile", inp["small"], "--out", work / "full.zarr", *TILE, "--json"
    ], [3], ["No space left on device", "re-run to resume", '"not_processed": 2'], wrapper=DISK_FULL)  # fmt: skip
    scenario(rows, "tile", "--qc-dir not writable (under a file)", [
        "tile", inp["small"], "--out", work / "qc.zarr", *TILE, "--qc-dir", given / "a-file" / "qc", "--json"
    ], [3], ["Not a directory", '"stopped"'])  # fmt: skip
    scenario(rows, "tile", "labels CSV separated by ';'", [
        "tile", inp["small"], "--out", work / "x.zarr", *TILE, "--labels", given / "semicolon.csv"
    ], [2], ["looks ';'-separated"])  # fmt: skip
    scenario(rows, "tile", "labels CSV: s0.svs and s0 with different labels", [
        "tile", inp["small"], "--out", work / "x.zarr", *TILE, "--labels", given / "twice.csv"
    ], [2], ["is listed as 's0' and 's0.svs' with different values"])  # fmt: skip

    (store / "slides" / "s1" / "zarr.json").write_text('{"attributes": {"record": ')  # a damaged record
    _zero_chunk(store / "slides" / "s2" / "pixels")  # 64 zeroed bytes in a stored tile
    index_args = [
        "index",
        "--tiles",
        store,
        "--model",
        inp["model"],
        "--out",
        index,
        "--device",
        "cpu",
        "--json",
    ]
    scenario(rows, "index", "a damaged slide record and a damaged pixel chunk", index_args, [1], [
        "damaged slide record", "crc32c checksum"
    ])  # fmt: skip
    _zero_chunk(index / "features.zarr" / "slides" / "s0" / "features")
    scenario(rows, "index", "re-run after damaging a features chunk", index_args, [1], [
        "crc32c checksum; extracting it again"
    ])  # fmt: skip

    def readable_by_others() -> tuple[bool, str]:
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in index.iterdir() if p.is_file()}
        private = sorted(name for name, mode in modes.items() if not mode & stat.S_IROTH)
        return (
            not private,
            f"{len(modes)} files, modes {sorted(set(map(oct, modes.values())))}; private: {private}",
        )

    check(rows, "index", "files readable by colleagues (umask 022)", readable_by_others)
    with writer_lock(index, "histo index (held by fault_injection.py)"):
        scenario(rows, "index", "a second unsharded writer", index_args, [2], ["is writing here"])
    scenario(rows, "search", "queries: a good slide, a missing file, a truncated slide", [
        "search", "--index", index, inp["small"] / "s0.svs", work / "gone.svs", cohort / "cut.svs", "--device", "cpu",
        "--json",
    ], [1], ["file not found", "truncated"])  # fmt: skip
    queries = query_inputs(work / "queries", store)
    scenario(rows, "search", "patches: tile-sized, 48 px, 16 px, 4x, 50000 x 50000 PNG/JPEG/TIFF headers", [
        "search", "--index", index, *queries["patches"], "--device", "cpu", "--json",
    ], [1], [
        "covers 0.25 x 0.25 of the index's 64 px tile", "covers 4 x 4", "warning:", "resized by 1.33",
        "declares 50000 x 50000 px", "refused before decoding it", '"done": 2',
    ])  # fmt: skip
    scenario(rows, "search", "a 16 px patch at 2 µm/px given with --mpp", [
        "search", "--index", index, queries["patches"][2], "--mpp", "2", "--device", "cpu", "--json",
    ], [0], ['"mpp_source": "override"', '"rule": "as is"'])  # fmt: skip
    scenario(rows, "search", "a query slide without a scale, no --mpp", [
        "search", "--index", index, queries["bare"], "--device", "cpu", "--json",
    ], [1], ["no usable physical scale", "pass --mpp"])  # fmt: skip
    scenario(rows, "search", "the same slide with --mpp 0.25", [
        "search", "--index", index, queries["bare"], "--mpp", "0.25", "--device", "cpu", "--json",
    ], [0], ['"mpp_source": "override"', '"slide_id": "s0"'])  # fmt: skip
    scenario(rows, "search", "--mpp inf", [
        "search", "--index", index, queries["bare"], "--mpp", "inf",
    ], [2], ["--mpp: query.mpp: input should be a finite number"])  # fmt: skip
    scenario(rows, "train", "a store with a damaged pixel chunk", [
        "train", "--tiles", store, "--out", work / "trained.pt", "--epochs", "1", "--input-px", "32", "--batch-size",
        "4", "--encoder", "cbr-tiny", "--variant", "scratch", "--workers", "0", "--device", "cpu",
    ], [2], ["crc32c checksum"])  # fmt: skip
    check(rows, "tile --workers 2", "parent killed: the workers end with it", lambda: _kill_parent(work, inp))


def query_inputs(folder: Path, store: Path) -> dict:
    """Query files for `histo search`: patches cut from a stored 64 px tile (the tile, 48 px, 16 px, tiled
    4 x 4), PNG/JPEG/TIFF files declaring 50000 x 50000 px, and s0's pixels as a slide without a scale."""
    import numpy as np
    from faults_support import image_declaring
    from PIL import Image

    from pathology.store import TileStore
    from pathology.synthetic import write_synthetic_slide

    folder.mkdir(parents=True)
    tile = TileStore.open(store).read_selected("s0", [0])[0]
    cuts = {
        "tile.png": tile,
        "near.png": tile[:48, :48],
        "small.png": tile[:16, :16],
        "large.png": np.tile(tile, (4, 4, 1)),
    }
    patches = []
    for name, rgb in cuts.items():
        Image.fromarray(rgb).save(folder / name)
        patches.append(folder / name)
    patches += [
        image_declaring(folder / f"bomb.{ext}", tile[:8, :8], 50_000, 50_000) for ext in ("png", "jpg", "tif")
    ]
    bare = write_synthetic_slide(folder / "s0_bare.svs", 1600, 1200, 0, seed=0, scale=False)
    return {"patches": patches, "bare": bare}


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                children = (task / "children").read_text().split()
                todo += [int(c) for c in children]
                found |= {int(c) for c in children}
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _kill_parent(work: Path, inp: dict[str, Path]) -> tuple[bool, str]:
    """Start `histo tile --workers 2` on bigger slides, SIGKILL it once its workers run, and see them end."""
    from pathology.synthetic import write_synthetic_slide

    big = work / "big"
    big.mkdir()
    for k in range(4):
        write_synthetic_slide(big / f"b{k}.svs", 6000, 4000, k % 2, seed=20 + k)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "histo.cli",
        "tile",
        str(big),
        "--out",
        str(work / "big.zarr"),
        "--workers",
        "2",
    ]
    parent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers = time.monotonic() + 120, set()
    while time.monotonic() < deadline and len(workers) < 3 and parent.poll() is None:  # 2 workers + tracker
        workers = _descendants(parent.pid)
        time.sleep(0.2)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = sorted(p for p in workers if _alive(p))
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return bool(workers) and not left, f"{len(workers)} child processes; alive after 20 s: {left}"


def segment_scenarios(rows: list[Row], work: Path, inp: dict[str, Path]) -> None:
    pred = work / "pred"
    base = [
        "segment",
        "predict",
        "--model",
        inp["model"],
        "--out",
        pred,
        "--roi",
        "16,16,16",
        "--device",
        "cpu",
    ]
    scenario(rows, "segment predict", "cases: one without T2, one ID at two sites", [
        *base, inp["cases"], inp["site_c"], "--json"
    ], [1], ["missing modality t2", "duplicate case ID"])  # fmt: skip
    scenario(rows, "segment predict", "another case under a segmented ID (next run)", [
        *base, inp["site_c"], "--json"
    ], [1], ["pass --replace"])  # fmt: skip
    scenario(rows, "segment eval", "a labelled case without a prediction", [
        "segment", "eval", "--pred", pred, "--data", inp["cases"], "--json"
    ], [1], ["no prediction"])  # fmt: skip
    scenario(rows, "segment train", "a case without T2 in the training data", [
        "segment", "train", "--data", inp["cases"], "--out", work / "seg.pt", "--roi", "16,16,16", "--channels",
        "4,8", "--epochs", "1", "--device", "cpu",
    ], [0, 1, 2], ["missing modality t2"])  # fmt: skip
    cfg = work / "robust.yaml"
    cfg.write_text("segment:\n  roi: [16, 16, 16]\n")
    scenario(rows, "robustness", "segment: a case without T2", [
        "robustness", "segment", "--model", inp["model"], "--data", inp["cases"], "--out", work / "robust",
        "--corruptions", "bias_field", "--severities", "1", "--config", cfg, "--device", "cpu", "--json",
    ], [0, 1, 2], ["missing modality t2"])  # fmt: skip


def table(rows: list[Row]) -> str:
    """The rows as a fixed-width table (the last column: what the command reported)."""
    lines = [f"{'command':<16} {'fault':<58} {'exit':>4} {'want':>5} {'tb':>3} {'ok':>3}  reported"]
    for r in rows:
        want = "/".join(map(str, r.expected_exit))
        lines.append(
            f"{r.command:<16} {r.fault[:58]:<58} {r.exit:>4} {want:>5} {'yes' if r.traceback else 'no':>3} "
            f"{'ok' if r.ok else 'BAD':>3}  {r.report}"
        )
    bad = sum(not r.ok for r in rows)
    lines.append(f"{len(rows)} scenarios, {len(rows) - bad} as expected, {bad} not")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="Work folder (default: a new temporary folder, kept).")
    parser.add_argument("--json-out", type=Path, help="JSON rows (default: WORK/fault_injection.json).")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="histo-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    os.umask(0o022)
    print(f"fault injection in {work}", file=sys.stderr)
    rows: list[Row] = []
    try:
        pathology_scenarios(rows, work, pathology_inputs(work / "p"))
        segment_scenarios(rows, work, segment_inputs(work / "s"))
    finally:
        locked = work / "p" / "cohort" / "locked"
        if locked.exists():
            locked.chmod(0o755)
    print(table(rows))
    out = args.json_out or work / "fault_injection.json"
    out.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    print(f"rows: {out}", file=sys.stderr)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
