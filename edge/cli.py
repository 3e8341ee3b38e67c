"""The ``edge`` command: serve, demo, analyze, jobs, calibrate, echo, engines, models.

``main(args=None)`` with an argparse builder, so tests call it with an argv list.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import datetime

from . import __version__
from .config import Config, ConfigError, load_config

logger = logging.getLogger(__name__)


def _add_config(p: argparse.ArgumentParser, top: bool = False) -> None:
    p.add_argument("--config", "-c", metavar="FILE",
                   default=None if top else argparse.SUPPRESS,
                   help="TOML configuration file (default: built-in defaults)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge", description="Edge AI appliance for X-ray rooms: receives chest X-rays over "
        "DICOM, screens them for TB and lung nodules, and sends the results to the PACS.")
    parser.add_argument("--version", action="version", version=f"edge {__version__}")
    _add_config(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("serve", help="run the appliance (DICOM listener, analysis, delivery, web)")
    _add_config(p)

    p = sub.add_parser("demo", help="start the appliance, send it sample chest X-rays, keep serving")
    _add_config(p)
    from .demo import WORKLIST
    p.add_argument("--count", type=int, default=len(WORKLIST),
                   help=f"number of sample images (default {len(WORKLIST)}: the sample worklist once)")
    p.add_argument("--exit-after", type=float, default=None, metavar="SECONDS",
                   help="stop after this many seconds instead of serving until Ctrl-C")

    p = sub.add_parser("analyze", help="analyze one DICOM file and print the findings")
    _add_config(p)
    p.add_argument("file", help="DICOM file")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("jobs", help="list received instances, their states and deliveries (the "
                       "image column: forwarding of the image itself in router mode), newest first")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--state", choices=("received", "analyzing", "analyzed", "skipped", "failed"))

    p = sub.add_parser("journal", help="check the journal, or rebuild it from the stored images")
    _add_config(p)
    p.add_argument("action", choices=("check", "rebuild"),
                   help="check: integrity and what the spool holds that the journal lacks; "
                        "rebuild: replace a damaged journal and recover every stored image it lacks")

    p = sub.add_parser("calibrate", help="set the TB threshold on local confirmatory results: ROC AUC, "
                       "threshold table with intervals, report; --apply writes it to the config")
    _add_config(p)
    p.add_argument("outcomes", metavar="OUTCOMES.csv",
                   help="one row per person: accession_number, or patient_id and study_date; result "
                        "(positive/negative)")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--target-sensitivity", type=_fraction, default=0.9, metavar="S",
                      help="the highest threshold with at least this sensitivity (default 0.9)")
    rule.add_argument("--max-referral-rate", type=_fraction, default=None, metavar="R",
                      help="the lowest threshold that refers at most this share of people")
    p.add_argument("--out", metavar="DIR", help="report folder (default: <storage.dir>/calibration)")
    p.add_argument("--bootstrap", type=int, default=2000, metavar="N", help="bootstrap replicates (default 2000)")
    p.add_argument("--apply", action="store_true",
                   help="write the threshold to the config file (--config) with an audit entry")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("echo", help="C-ECHO a configured destination, or check the Triton server "
                       "(`edge echo triton`)")
    _add_config(p)
    p.add_argument("destination", help="destination name from the config, or 'triton'")

    p = sub.add_parser("models", help="model folders: check one before installing it")
    _add_config(p)
    from engines import commands as engine_commands
    engine_commands.add_models_arguments(p)

    p = sub.add_parser("engines", help="inference engines: build, list, verify")
    _add_config(p)
    from engines import commands as engine_commands
    engine_commands.add_arguments(p)
    return parser


def _fraction(text: str) -> float:
    """A share between 0 and 1 (exclusive of 0); "90%" is read as 0.9."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.9 or 90%, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def setup_logging(config: Config) -> None:
    logging.basicConfig(
        level=getattr(logging, config.logging.level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from .logs import quiet_libraries
    quiet_libraries()


def main(args: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(args)
    try:
        config = load_config(ns.config)
    except ConfigError as exc:
        print(f"edge: configuration error: {exc}", file=sys.stderr)
        return 2
    handler = _COMMANDS[ns.command]
    try:
        return handler(ns, config)
    except ConfigError as exc:
        print(f"edge: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------------- commands

def cmd_serve(ns, config: Config) -> int:
    from .service import Appliance
    setup_logging(config)
    app = Appliance(config).start()
    app.serve_forever()
    return 0


def cmd_demo(ns, config: Config) -> int:
    from .demo import run_demo
    setup_logging(config)
    return run_demo(config, count=ns.count, exit_after=ns.exit_after)


def cmd_analyze(ns, config: Config) -> int:
    from .analysis import analyze_main
    logging.basicConfig(level=logging.WARNING)
    return analyze_main(ns.file, as_json=ns.json, models_dir=config.models_dir,
                        backend=config.models.backend, tb_threshold=config.models.tb_threshold,
                        triage_rules=config.triage, triton=_triton_settings(config))


def _fmt_time(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def cmd_jobs(ns, config: Config) -> int:
    from .journal import Journal
    rows, deliveries, forwarding, details = [], {}, {}, {}
    if config.journal_path.exists():
        journal = Journal(config.journal_path)
        try:
            rows = journal.list_instances(limit=ns.limit, state=ns.state)
            for r in rows:
                uid = r.sop_instance_uid
                current = [d for d in journal.deliveries_for(uid) if d.current]
                deliveries[uid] = journal.delivery_summary(uid)
                forwarding[uid] = journal.forwarding_summary(uid)
                details[uid] = current
        finally:
            journal.close()
    if ns.json:
        out = []
        for r in rows:
            d = r.to_dict()
            d["delivery"] = deliveries[r.sop_instance_uid]
            d["forwarding"] = forwarding[r.sop_instance_uid]
            d["deliveries"] = [row.to_dict() for row in details[r.sop_instance_uid]]
            out.append(d)
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    if not rows:
        print(f"no instances received yet (journal: {config.journal_path})")
        return 0
    routed = any(forwarding[r.sop_instance_uid] != "none" for r in rows)
    image = f"{'image':8}  " if routed else ""
    print(f"{'received':19}  {'state':9}  {'TB':14}  {'nod':3}  {image}{'delivery':8}  {'calling AE':16}  "
          f"SOP Instance UID / reason")
    for r in rows:
        f = r.findings or {}
        tb = f.get("tb") or {}
        tb_text = (f"{'REFER' if tb.get('positive') else 'no signs'} {tb.get('score', 0):.2f}"
                   if tb else "-")
        nod = str(len(f.get("nodules", []))) if r.state == "analyzed" else "-"
        tail = r.sop_instance_uid + (f"  ({r.reason})" if r.reason else "")
        image = f"{forwarding[r.sop_instance_uid]:8}  " if routed else ""
        print(f"{_fmt_time(r.received_at):19}  {r.state:9}  {tb_text:14}  {nod:>3}  {image}"
              f"{deliveries[r.sop_instance_uid]:8}  {r.calling_ae:16}  {tail}")
    return 0


def cmd_journal(ns, config: Config) -> int:
    from .journal import check_integrity
    from .recovery import RecoveryReport, open_journal, recover_spool

    path = config.journal_path
    if ns.action == "check":
        spool_files = sum(1 for _ in (config.storage_dir / "spool").glob("*/*.dcm"))
        if not path.exists():
            print(f"no journal at {path}; {spool_files} stored image file(s) in the spool"
                  + ("; run `edge journal rebuild` to recover them" if spool_files else ""))
            return 1 if spool_files else 0
        if not check_integrity(path):
            print(f"{path}: DAMAGED (SQLite integrity check failed); run `edge journal rebuild`")
            return 1
        journal = open_journal(path)
        try:
            counts = journal.count_instances_by_state()
            unknown = spool_files - len({p for p in journal.known_paths() if p.startswith("spool/")})
        finally:
            journal.close()
        print(f"{path}: ok; " + ", ".join(f"{n} {state}" for state, n in counts.items()))
        if unknown > 0:
            print(f"{unknown} stored image file(s) are not in the journal; run `edge journal rebuild`")
            return 1
        return 0
    report = RecoveryReport()
    config.storage_dir.mkdir(parents=True, exist_ok=True)
    journal = open_journal(path, report)
    try:
        recover_spool(journal, config.storage_dir, report,
                      forward_to=tuple(d.name for d in config.source_destinations))
    finally:
        journal.close()
    print(report.summary() or "nothing to recover: the journal knows every stored image")
    for rel in report.unreadable:
        print(f"  not readable as DICOM, left in place: {rel}")
    return 0


def cmd_echo(ns, config: Config) -> int:
    from dicom_node.scu import echo

    from .outbox import destination_peer
    if ns.destination == "triton" and not any(d.name == "triton" for d in config.destinations):
        return echo_triton(config)
    dest = config.destination(ns.destination)
    peer = destination_peer(config, dest, timeout_s=min(config.delivery.timeout_s, 15.0))
    started = time.perf_counter()
    outcome = echo(peer)
    ms = (time.perf_counter() - started) * 1000
    if outcome.delivered:
        print(f"{dest.name}: OK ({outcome.message}, {ms:.0f} ms)")
        return 0
    print(f"{dest.name}: FAILED - {outcome.message}. Check the PACS is running and knows "
          f"AE title {peer.calling_ae_title} at this box's address.", file=sys.stderr)
    return 1


def _triton_settings(config: Config):
    from engines.runners.triton_runner import TritonSettings
    return TritonSettings.from_config(config.models)


def echo_triton(config: Config) -> int:
    """``edge echo triton``: the server answers, and each installed model is ready on it
    and matches its manifest (name, version, sha256); 0 when all is well, else 1."""
    from engines.manifest import load_manifest
    from engines.runners.triton_runner import TritonSettings, check_server
    from engines.store import model_folders

    settings = TritonSettings.from_config(config.models)
    if settings is None:
        raise ConfigError("models.triton_url: not set; `edge echo triton` checks the Triton server "
                          "of [models] backend = \"triton\"")
    manifests = [load_manifest(f) for f in model_folders(config.models_dir)]
    result = check_server(settings, manifests)
    where = f"Triton at {settings.url} ({settings.protocol})"
    if not result["reachable"]:
        print(f"{where}: FAILED - {result['error'] or 'not live'}. Check the server runs and this "
              "box can reach it; meanwhile the box analyses locally"
              + ("" if settings.fallback else " (no: triton_fallback is off, images wait)"), file=sys.stderr)
        return 1
    print(f"{where}: OK ({result['round_trip_ms']:.0f} ms)")
    ok = True
    for m in result["models"]:
        if m["ready"]:
            print(f"  {m['name']} {m['version']}: ready, matches the manifest")
        else:
            ok = False
            print(f"  {m['name']} {m['version']}: REFUSED - {m['error']}", file=sys.stderr)
    return 0 if ok else 1


def cmd_calibrate(ns, config: Config) -> int:
    from .calibration_report import calibrate_main
    logging.basicConfig(level=logging.WARNING)
    return calibrate_main(ns, config)


def cmd_engines(ns, config: Config) -> int:
    from engines import commands as engine_commands
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    return engine_commands.run(ns, models_dir=config.models_dir, cache_dir=config.engine_cache_dir,
                               backend=config.models.backend, precision=config.models.precision,
                               calibration_dir=config.models.calibration_dir)


def cmd_models(ns, config: Config | None) -> int:
    from engines import commands as engine_commands
    return engine_commands.run_models(ns)


_COMMANDS = {
    "serve": cmd_serve,
    "demo": cmd_demo,
    "analyze": cmd_analyze,
    "jobs": cmd_jobs,
    "journal": cmd_journal,
    "echo": cmd_echo,
    "calibrate": cmd_calibrate,
    "engines": cmd_engines,
    "models": cmd_models,
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
