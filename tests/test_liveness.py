"""Health tells the truth: a dead worker, a listener that does not accept, or analysis that
stalls fail /healthz and the systemd watchdog; only the image under analysis when the
service died is suspect, and it is failed only if it crashes the analysis in isolation."""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import free_port, make_dx, wait_until
from edge.config import AnalysisConfig, Config, NodeConfig, StorageConfig, WebConfig
from edge.journal import Journal, NewInstance
from edge.rehearsal import rehearse

FAULTY_REHEARSAL = [sys.executable, str(Path(__file__).parent / "support" / "faulty_rehearsal.py")]


def _config(tmp_path: Path, **analysis) -> Config:
    return Config(node=NodeConfig(host="127.0.0.1", port=free_port()),
                  storage=StorageConfig(dir=str(tmp_path / "data"), min_free_mb=0),
                  web=WebConfig(host="127.0.0.1", port=free_port()),
                  analysis=AnalysisConfig(**analysis))


@pytest.fixture
def appliance(tmp_path):
    from edge.service import Appliance
    apps = []

    def start(**analysis):
        app = Appliance(_config(tmp_path, **analysis)).start()
        apps.append(app)
        return app
    yield start
    for app in apps:
        app.stop()


def _healthz(app) -> tuple[int, dict]:
    r = requests.get(f"{app.web.url}/healthz", timeout=10)
    return r.status_code, r.json()


def test_healthy_appliance_pets_the_watchdog(appliance):
    app = appliance()
    assert _healthz(app)[0] == 200 and app.healthy()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")   # on purpose
def test_a_dead_worker_thread_fails_health_and_the_watchdog(appliance):
    app = appliance()
    journal = app.journal

    def die(*args, **kwargs):   # what an uncatchable failure in the claim would do
        raise SystemExit("worker killed")
    original = journal.claim_next_instance
    journal.claim_next_instance = die
    app.work_available.set()
    wait_until(lambda: app.pipeline.dead_workers(), 10, what="the prepare thread to die")
    status, body = _healthz(app)
    assert status == 503 and "worker_dead:pipeline-prepare" in body["problems"], body
    assert not app.healthy()
    journal.claim_next_instance = original


def test_a_listener_that_does_not_accept_fails_health(appliance):
    app = appliance()
    app.scp._server.socket.close()   # the port is gone although the server object exists
    status, body = _healthz(app)
    assert status == 503 and "listener_down" in body["problems"], body
    metrics = requests.get(f"{app.web.url}/metrics", timeout=10).text
    assert "edge_listener_up 0.0" in metrics and "edge_healthy 0.0" in metrics


def test_analysis_stalled_fails_health(tmp_path):
    from edge.health import HealthMonitor
    config = _config(tmp_path, stalled_after_s=1.0)
    journal = Journal(config.journal_path)
    journal.record_received(NewInstance("1.2.3.4", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3", "1.2.3.5",
                                        "", "X", "spool/a.dcm", "0" * 64, 10), now=time.time() - 30)
    snap = HealthMonitor(config, journal).snapshot()
    assert "analysis_stalled" in snap["critical"] and snap["oldest_waiting_analysis_s"] >= 29
    # a backlog that is being worked through is not a stall
    busy = HealthMonitor(config, journal, last_progress=lambda: time.time() - 0.2).snapshot()
    assert "analysis_stalled" not in busy["problems"]
    idle = HealthMonitor(config, journal, last_progress=lambda: time.time() - 5).snapshot()
    assert "analysis_stalled" in idle["critical"]
    journal.close()


def test_only_the_image_under_inference_counts_an_interruption(tmp_path):
    journal = Journal(tmp_path / "j.sqlite3")
    for i in range(3):
        journal.record_received(NewInstance(f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3", "1.2.4",
                                            "", "X", f"spool/{i}.dcm", str(i) * 64, 10), now=100.0 + i)
    first, second = journal.claim_next_instance(), journal.claim_next_instance()
    journal.begin_inference(first.sop_instance_uid)      # the models run on the first ...
    assert journal.resume_interrupted() == 2             # ... when the power goes
    rows = {r.sop_instance_uid: r.attempts for r in journal.list_instances()}
    assert rows == {"1.2.3.0": 1, "1.2.3.1": 0, "1.2.3.2": 0}
    journal.finish_instance("1.2.3.0", "failed", reason="x")
    assert journal.requeue_instance("1.2.3.0")           # "analyze again" starts afresh
    assert journal.find_instance("1.2.3.0").attempts == 0
    journal.close()


def test_rehearsal_tells_a_crashing_image_from_a_power_cut(tmp_path):
    config = _config(tmp_path)
    good, crash = tmp_path / "good.dcm", tmp_path / "CRASH.dcm"
    make_dx(good, rows=1024, cols=1024, seed=5)
    make_dx(crash, rows=1024, cols=1024, seed=6)
    assert rehearse(config, good) is None
    assert rehearse(config, good, command=FAULTY_REHEARSAL) is None
    problem = rehearse(config, crash, command=FAULTY_REHEARSAL)
    assert problem and "crashed (SIGSEGV)" in problem


def test_watchdog_quick_check_does_not_hold_the_journal_lock(tmp_path):
    journal = Journal(tmp_path / "j.sqlite3")
    with journal._lock:   # a C-STORE commit in progress holds the lock ...
        done = threading.Event()
        threading.Thread(target=lambda: (journal.check_integrity(), done.set()), daemon=True).start()
        assert done.wait(5), "the integrity check waited for the journal lock"
    journal.close()


def test_a_slow_part_of_the_shutdown_is_named_in_the_log(appliance, monkeypatch, caplog):
    """systemd kills a stop that takes too long; the log says which part held it up."""
    import edge.service

    app = appliance()
    monkeypatch.setattr(edge.service, "SLOW_STOP_S", 1.0)
    outbox_stop = app.outbox.stop if app.outbox is not None else (lambda: None)

    def slow_outbox_stop():
        time.sleep(1.5)
        outbox_stop()

    if app.outbox is not None:
        monkeypatch.setattr(app.outbox, "stop", slow_outbox_stop)
    else:
        monkeypatch.setattr(app, "outbox", type("Outbox", (), {"stop": staticmethod(slow_outbox_stop)})())
    with caplog.at_level("INFO", logger="edge.service"):
        app.stop()
    slow = [r.getMessage() for r in caplog.records if "took" in r.getMessage()]
    assert any(m.startswith("stopping: the outbox took") for m in slow), caplog.text
    assert len(slow) == 1, slow       # the other parts stop within the second
    assert any(r.getMessage().startswith("stopped in") for r in caplog.records)
