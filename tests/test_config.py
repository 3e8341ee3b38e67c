"""Configuration: defaults run, bad values stop the start naming the key."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from conftest import write_config
from edge.config import Config, ConfigError, config_from_dict, load_config


def test_no_file_gives_embedded_defaults():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.node.ae_title == "EDGE_AI" and cfg.node.port == 11112
    assert cfg.node.allowed_calling_aets == () and cfg.node.max_associations == 8
    assert cfg.storage.min_free_mb == 512 and cfg.web.port == 8080
    assert cfg.destinations == ()
    assert cfg.models.backend == "auto"


def test_full_example_from_the_readme_loads(tmp_path):
    path = write_config(tmp_path / "edge.toml", {
        "node": {"ae_title": "EDGE_AI", "host": "0.0.0.0", "port": 11112,
                 "allowed_calling_aets": ["XRAY1", "XRAY2"], "max_associations": 4},
        "storage": {"dir": str(tmp_path / "data"), "min_free_mb": 100},
        "web": {"host": "127.0.0.1", "port": 8081},
        "models": {"backend": "onnxruntime", "tb_threshold": 0.4},
        "delivery": {"max_age_hours": 24},
    }, destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242,
                      "outputs": ["sr", "gsps"]}])
    cfg = load_config(path)
    assert cfg.node.allowed_calling_aets == ("XRAY1", "XRAY2")
    assert cfg.destination("pacs").outputs == ("sr", "gsps")
    assert cfg.models.tb_threshold == 0.4
    assert cfg.journal_path == tmp_path / "data" / "journal.sqlite3"


@pytest.mark.parametrize("data, key, hint", [
    ({"node": {"port": 0}}, "node.port", "1-65535"),
    ({"node": {"port": "11112"}}, "node.port", "integer"),
    ({"node": {"ae_title": "A" * 17}}, "node.ae_title", "1-16"),
    ({"node": {"ae_title": "BAD\\AE"}}, "node.ae_title", "backslash"),
    ({"node": {"allowed_calling_aets": "XRAY1"}}, "node.allowed_calling_aets", "list"),
    ({"node": {"max_associations": 0}}, "node.max_associations", "1-64"),
    ({"node": {"tls_cert": "/nonexistent.crt", "tls_key": "/nonexistent.key"}}, "node.tls_cert", "does not exist"),
    ({"node": {"colour": 1}}, "node.colour", "unknown key"),
    ({"storage": {"min_free_mb": -1}}, "storage.min_free_mb", ">= 0"),
    ({"web": {"port": 99999}}, "web.port", "1-65535"),
    ({"web": {"language": "fr"}}, "web.language", "auto, en, vi"),
    ({"models": {"backend": "cuda"}}, "models.backend", "auto, onnxruntime, tensorrt"),
    ({"models": {"tb_threshold": 1.5}}, "models.tb_threshold", "<= 1.0"),
    ({"models": {"skip_broken": "yes"}}, "models.skip_broken", "true or false"),
    ({"fhir": {"base_url": "ftp://emr/fhir"}}, "fhir.base_url", "http or https"),
    ({"fhir": {"base_url": "http://emr/fhir", "language": "fr"}}, "fhir.language", "en, vi"),
    ({"forward": [{"name": "r", "destination": "nowhere", "tb_refer": True}]}, "forward[0].destination", "not a [[destinations]] name"),
    ({"delivery": {"max_age_hours": 0}}, "delivery.max_age_hours", "> 0"),
    ({"logging": {"level": "LOUD"}}, "logging.level", "DEBUG, INFO"),
    ({"nodes": {}}, "nodes", "unknown section"),
    ({"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "x"}]}, "destinations[0].port", "required"),
    ({"destinations": [{"name": "p", "ae_title": "PACS", "host": "h", "port": 1, "outputs": ["pdf"]}]},
     "destinations[0].outputs[0]", "sr, gsps, sc"),
    ({"destinations": [{"name": "p", "ae_title": "A", "host": "h", "port": 1},
                       {"name": "p", "ae_title": "B", "host": "h", "port": 2}]}, "destinations[1].name", "used by another"),
    ({"destinations": [{"name": "p", "ae_title": "A", "host": "h", "port": 1, "source_first": "yes"}]},
     "destinations[0].source_first", "true or false"),
    ({"node": {"commitment": "always"}}, "node.commitment", "off, stored, forwarded"),
    ({"node": {"commitment_timeout_s": 0}}, "node.commitment_timeout_s", "> 0"),
    ({"modalities": [{"name": "dx", "ae_title": "DX", "host": "h"}]}, "modalities[0].port", "required"),
    ({"modalities": [{"name": "a", "ae_title": "DX", "host": "h", "port": 1},
                     {"name": "b", "ae_title": "DX", "host": "h", "port": 2}]}, "modalities[1].ae_title", "used by"),
])
def test_invalid_values_name_the_key_and_what_is_allowed(data, key, hint):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    message = str(err.value)
    assert message.startswith(key), message
    assert hint in message, message


def test_broken_toml_and_missing_file_are_clear(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\nport = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_relative_paths_are_resolved_once_against_the_start_directory(tmp_path, monkeypatch):
    """The default storage dir is relative ("./edge-data"): it means the directory the
    command was started in, whatever later changes the working directory or resolves paths
    against something else (Flask's send_file resolves against the package folder)."""
    start = tmp_path / "start"
    start.mkdir()
    monkeypatch.chdir(start)
    cfg = load_config(None)
    assert cfg.storage_dir == start / "edge-data" and cfg.storage_dir.is_absolute()
    assert cfg.results_dir == start / "edge-data" / "results"
    path = write_config(start / "edge.toml", {"storage": {"dir": "data"},
                                              "models": {"engine_cache_dir": "~/engines"}})
    from_file = load_config("edge.toml")
    monkeypatch.chdir(tmp_path)
    assert from_file.storage_dir == start / "data"
    assert from_file.engine_cache_dir.is_absolute() and "~" not in str(from_file.engine_cache_dir)
    assert load_config(path).storage_dir == tmp_path / "data"   # a new start, a new directory


def test_router_mode_settings(tmp_path):
    """outputs "source" forwards the received images; storage commitment settings."""
    cfg = config_from_dict({
        "node": {"commitment": "forwarded", "commitment_timeout_s": 120, "commitment_report_port": 104},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104,
                          "outputs": ["source", "sr", "gsps", "sc"]},
                         {"name": "viewer", "ae_title": "V", "host": "h", "port": 105, "outputs": ["sc"],
                          "source_first": False}],
        "modalities": [{"name": "room1", "ae_title": "DX_ROOM1", "host": "10.0.0.7", "port": 104}]})
    assert [d.name for d in cfg.source_destinations] == ["pacs"]
    assert cfg.destination("pacs").source_first and not cfg.destination("viewer").source_first
    assert cfg.modality("DX_ROOM1").host == "10.0.0.7" and cfg.modality("OTHER") is None
    assert cfg.node.commitment == "forwarded" and cfg.node.commitment_report_port == 104
    assert Config().node.commitment == "stored" and Config().source_destinations == ()


def test_the_readme_configuration_is_valid(tmp_path):
    """The configuration example users copy from the README loads (files it names are
    stood in by temporary ones)."""
    import re
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"```toml\n(.*?)```", readme, re.S)
    data = tomllib.loads(block)
    stand_in = tmp_path / "token"
    stand_in.write_text("t\n")
    data["fhir"]["token_file"] = str(stand_in)
    cfg = config_from_dict(data)
    assert cfg.destinations and cfg.fhir is not None and cfg.fhir.bearer_token() == "t"
