"""Chaos: the running appliance (`edge serve`, real DCMTK and Orthanc peers) under hostile or
unlucky conditions. Each test names the class of fault; each would fail on a relapse.

- poison images mixed with good ones: every good image analysed, every bad one failed with
  a reason, the service healthy and still analysing;
- a full results disk, then freed: images wait (not failed), then their results are kept;
- a journal deleted or damaged while stopped: rebuilt from the spool on start, listener up;
- SIGKILLs during a stream of images, with PACS restarts: 0 lost, 0 duplicated (counted as
  C-STORE operations at the PACS), 0 good images failed;
- a flood of slow clients: a real modality still stores.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import requests

from conftest import EdgeServer, make_dx, require_tool, wait_until
from poison import BAD_METADATA, bad_metadata, huge_jpegls, panicking_rle, truncated_j2k

pytestmark = pytest.mark.slow

FINAL = ("analyzed", "skipped", "failed")


def _healthz(srv: EdgeServer) -> tuple[int, dict]:
    r = requests.get(f"http://127.0.0.1:{srv.web_port}/healthz", timeout=10)
    return r.status_code, r.json()


def _wait_final(srv: EdgeServer, n: int, timeout: float = 120) -> dict[str, dict]:
    jobs = wait_until(lambda: (lambda j: len(j) >= n and all(r["state"] in FINAL for r in j) and j)(srv.jobs()),
                      timeout, interval=0.5, what=f"{n} finished images")
    return {r["sop_instance_uid"]: r for r in jobs}


def _uid(path: Path) -> str:
    from pydicom import dcmread
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_poison_images_fail_alone_and_the_service_keeps_analysing(tmp_path, edge_server):
    require_tool("storescu")
    srv = edge_server(extra={"analysis": {"decode_timeout_s": 8.0, "decode_memory_mb": 1024}}).start()
    files: dict[str, Path] = {}
    for i in range(4):
        files[f"good{i}"] = tmp_path / f"good{i}.dcm"
        make_dx(files[f"good{i}"], rows=1024, cols=1024, seed=10 + i)
    for name, make in (("panic", panicking_rle), ("truncated", truncated_j2k), ("huge", huge_jpegls)):
        files[name] = tmp_path / f"{name}.dcm"
        make(files[name], seed=20 + len(files))
    for keyword, value in BAD_METADATA.items():
        files[f"meta-{keyword}"] = tmp_path / f"meta-{keyword}.dcm"
        bad_metadata(files[f"meta-{keyword}"], seed=30 + len(files), **{keyword: value})
    files["meta-all"] = tmp_path / "meta-all.dcm"
    bad_metadata(files["meta-all"], seed=50)
    order = ["good0", "panic", "good1", "truncated", "meta-all", "huge", "good2",
             *[k for k in files if k.startswith("meta-") and k != "meta-all"], "good3"]
    propose = {"panic": ["-xr"], "truncated": ["-xv"], "huge": ["-xt"]}   # their transfer syntax
    for name in order:   # one association each, as a modality sends them
        out = srv.storescu(files[name], extra=propose.get(name))
        assert out.returncode == 0 and "Failed" not in out.stderr, (name, out.stderr)
    uids = {name: _uid(path) for name, path in files.items()}
    jobs = _wait_final(srv, len(files), timeout=180)
    states = {name: jobs[uid]["state"] for name, uid in uids.items()}
    for name in files:
        expected = "failed" if name in ("panic", "truncated", "huge") else "analyzed"
        assert states[name] == expected, (name, jobs[uids[name]])
    assert "pixel decoder" in jobs[uids["panic"]]["reason"]
    assert "corrupt or truncated" in jobs[uids["truncated"]]["reason"]
    assert jobs[uids["huge"]]["reason"]
    results = list((srv.data_dir / "results").rglob("*.dcm"))
    analyzed = [n for n, s in states.items() if s == "analyzed"]
    assert len(results) == 3 * len(analyzed)
    status, body = _healthz(srv)
    assert status == 200, body
    log = srv.log.read_text(errors="replace")
    for secret in ("PATIENT", "PID000", "19801341", "19800101", "ACC1"):   # names, IDs, dates
        assert secret not in log, f"patient data {secret!r} in the service log"
    assert "pixel decoder failed on this image (PanicException)" in log
    # and it keeps going: one more image after the storm
    extra = tmp_path / "after.dcm"
    make_dx(extra, rows=1024, cols=1024, seed=99)
    assert srv.storescu(extra).returncode == 0
    assert _wait_final(srv, len(files) + 1)[_uid(extra)]["state"] == "analyzed"
    # a restart does not meet the poison again: failed images stay failed, nothing re-runs
    srv.stop()
    srv.start()
    time.sleep(3)
    again = {r["sop_instance_uid"]: r for r in srv.jobs()}
    assert {n: again[u]["state"] for n, u in uids.items()} == states
    assert _healthz(srv)[0] == 200


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {res.stderr.strip()}")


def test_results_disk_full_then_freed_results_are_kept(tmp_path, edge_server):
    require_tool("storescu")
    srv = edge_server()
    results = srv.data_dir / "results"
    _mount_tmpfs(results, "3m")
    try:
        filler = results / "filler.bin"
        with open(filler, "wb") as fh:   # fill the volume up to the last few kB
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass
        srv.start()
        images = []
        for i in range(2):
            path = tmp_path / f"img{i}.dcm"
            make_dx(path, rows=1024, cols=1024, seed=60 + i)
            images.append(path)
            assert srv.storescu(path).returncode == 0
        uids = [_uid(p) for p in images]
        waiting = wait_until(lambda: (lambda j: all(
            j.get(u, {}).get("state") == "received" and "could not be written" in (j[u].get("reason") or "")
            for u in uids) and j)({r["sop_instance_uid"]: r for r in srv.jobs()}), 60, what="images waiting for disk")
        assert all(waiting[u]["state"] == "received" for u in uids)
        assert not [p for p in results.rglob("*") if p.is_file() and p != filler], "half-written results left"
        status, body = _healthz(srv)
        assert status == 200 and "results_write_error" in body["warnings"], body
        assert any("could not be written" in n for n in body["notices"]), body
        filler.unlink()
        done = _wait_final(srv, 2, timeout=120)
        assert all(done[u]["state"] == "analyzed" for u in uids)
        assert len(list(results.rglob("*.dcm"))) == 6
        status, body = _healthz(srv)
        assert "results_write_error" not in body["warnings"], body
    finally:
        srv.stop()
        subprocess.run(["umount", str(results)], capture_output=True)


@pytest.mark.parametrize("damage", ["deleted", "emptied", "garbage"])
def test_a_lost_journal_is_rebuilt_from_the_spool(tmp_path, edge_server, damage):
    require_tool("storescu")
    srv = edge_server().start()
    images = []
    for i in range(3):
        path = tmp_path / f"img{i}.dcm"
        make_dx(path, rows=1024, cols=1024, seed=70 + i)
        images.append(path)
        assert srv.storescu(path).returncode == 0
    uids = {_uid(p) for p in images}
    _wait_final(srv, 3)
    srv.stop()
    journal = srv.data_dir / "journal.sqlite3"
    for suffix in ("-wal", "-shm"):
        Path(f"{journal}{suffix}").unlink(missing_ok=True)
    if damage == "deleted":
        journal.unlink()
    elif damage == "emptied":
        journal.write_bytes(b"")
    else:
        journal.write_bytes(b"SQLite format 3\0" + os.urandom(8192))
    srv.start()
    # the listener is up at once: a new image is accepted while the journal is rebuilt
    new = tmp_path / "new.dcm"
    make_dx(new, rows=1024, cols=1024, seed=79)
    assert srv.storescu(new).returncode == 0
    jobs = _wait_final(srv, 4)
    assert uids | {_uid(new)} <= set(jobs)
    assert all(jobs[u]["state"] == "analyzed" for u in uids)
    status, body = _healthz(srv)
    assert status == 200
    assert any("recovered from the spool" in n for n in body["notices"]), body
    if damage == "garbage":
        assert list(srv.data_dir.glob("journal.sqlite3.damaged-*")), "the damaged journal was not kept"
        assert any("damaged" in n for n in body["notices"])
    check = srv.edge("journal", "check", check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_edge_journal_rebuild_offline(tmp_path, edge_server):
    require_tool("storescu")
    srv = edge_server().start()
    path = tmp_path / "img.dcm"
    make_dx(path, rows=1024, cols=1024, seed=80)
    assert srv.storescu(path).returncode == 0
    _wait_final(srv, 1)
    srv.stop()
    (srv.data_dir / "journal.sqlite3").unlink()
    for suffix in ("-wal", "-shm"):
        Path(f"{srv.data_dir / 'journal.sqlite3'}{suffix}").unlink(missing_ok=True)
    check = srv.edge("journal", "check", check=False)
    assert check.returncode == 1 and "edge journal rebuild" in check.stdout
    out = srv.edge("journal", "rebuild")
    assert "1 stored image(s) missing from the journal were recovered" in out.stdout
    jobs = srv.jobs()
    assert [j["sop_instance_uid"] for j in jobs] == [_uid(path)] and jobs[0]["state"] == "received"
    assert srv.edge("journal", "check").returncode == 0


def test_sigkill_soak_with_pacs_restarts_loses_and_duplicates_nothing(tmp_path, edge_server):
    """A modality keeps sending while the box is SIGKILLed again and again and the PACS
    restarts twice. Every image the modality had acknowledged is analysed, none of them
    fails for having been in the queue during a kill, and every result object reaches the
    PACS exactly once, counted as C-STORE operations received (not as unique UIDs)."""
    from conftest import OrthancPACS

    require_tool("storescu")
    pacs = OrthancPACS(tmp_path, count_stores=True).start()
    try:
        _soak(tmp_path, edge_server, pacs)
    finally:
        pacs.stop()


def _soak(tmp_path, edge_server, pacs) -> None:
    import random
    import threading
    from collections import Counter

    srv = edge_server(destinations=[pacs.destination()],
                      extra={"delivery": {"initial_backoff_s": 0.2, "max_backoff_s": 1.0}}).start()
    images = []
    for i in range(24):
        path = tmp_path / f"soak{i:02d}.dcm"
        make_dx(path, rows=1024, cols=1024, seed=200 + i)
        images.append(path)
    acknowledged: list[Path] = []
    sending_done = threading.Event()

    def modality() -> None:   # sends each image until the box acknowledges it
        for path in images:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                out = srv.storescu(path)
                if out.returncode == 0 and "failed" not in out.stderr.lower():
                    acknowledged.append(path)
                    break
                time.sleep(0.3)
            time.sleep(0.15)
        sending_done.set()

    sender = threading.Thread(target=modality, daemon=True)
    sender.start()
    rng = random.Random(7)
    kills = 0
    try:
        while not sending_done.is_set() or kills < 8:
            time.sleep(rng.uniform(1.0, 2.5))
            srv.kill()
            kills += 1
            if kills in (3, 6):   # the PACS restarts too, while the box is down
                pacs.stop()
                pacs.start()
            srv.start()
            if kills >= 16:
                break
        sender.join(150)
        assert sending_done.is_set(), "the modality could not deliver every image"
        assert len(acknowledged) == len(images)
        uids = {_uid(p) for p in acknowledged}

        def settled():
            jobs = {j["sop_instance_uid"]: j for j in srv.jobs()}
            done = all(jobs.get(u, {}).get("state") in FINAL and jobs[u]["delivery"] in ("sent", "none")
                       for u in uids)
            return done and jobs
        jobs = wait_until(settled, 180, interval=1.0, what="every image analysed and delivered")
    finally:
        srv.stop()
    states = Counter(jobs[u]["state"] for u in uids)
    assert states == Counter({"analyzed": len(uids)}), {u: (jobs[u]["state"], jobs[u]["reason"]) for u in uids}
    assert all(jobs[u]["delivery"] == "sent" for u in uids)
    stores = Counter(pacs.stores())
    duplicated = {uid: n for uid, n in stores.items() if n > 1}
    assert not duplicated, f"{len(duplicated)} object(s) stored more than once at the PACS: {duplicated}"
    assert len(stores) == 3 * len(uids), f"{len(stores)} objects at the PACS for {len(uids)} images"
    held = pacs.get("/instances")
    assert len(held) == 3 * len(uids)
    print(f"soak: {kills} SIGKILLs, 2 PACS restarts, {len(uids)} images acknowledged, "
          f"{len(stores)} result objects stored once each, 0 failed")
