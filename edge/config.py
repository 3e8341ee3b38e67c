"""Appliance configuration: one TOML file, every key has a default.

``load_config(None)`` gives the embedded defaults, so ``edge serve`` runs with no file.
Invalid values stop the start with a ``ConfigError`` naming the key and what is allowed.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .triage import TriageRules

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("sr", "gsps", "sc")
BACKENDS = ("auto", "onnxruntime", "tensorrt")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")   # default character repertoire, no backslash


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class NodeConfig:
    ae_title: str = "EDGE_AI"
    host: str = "0.0.0.0"
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()
    require_called_aet: bool = True
    max_associations: int = 8
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None


@dataclass(frozen=True)
class StorageConfig:
    dir: str = "./edge-data"
    min_free_mb: int = 512


@dataclass(frozen=True)
class WebConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    password_hash: str | None = None
    metrics_token: str | None = None
    language: str = "auto"


@dataclass(frozen=True)
class ModelsConfig:
    dir: str | None = None            # None: the models shipped in engines/models
    backend: str = "auto"
    engine_cache_dir: str | None = None   # None: <storage.dir>/engines
    tb_threshold: float | None = None     # None: the manifest's threshold
    workers: int = 1


@dataclass(frozen=True)
class Destination:
    name: str
    ae_title: str
    host: str
    port: int
    outputs: tuple[str, ...] = OUTPUT_TYPES
    calling_ae_title: str | None = None   # None: node.ae_title
    tls: bool = False


@dataclass(frozen=True)
class DeliveryConfig:
    max_age_hours: float = 72.0
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    timeout_s: float = 30.0


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"


@dataclass(frozen=True)
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    web: WebConfig = field(default_factory=WebConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    triage: TriageRules = field(default_factory=TriageRules)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    destinations: tuple[Destination, ...] = ()
    source: str | None = None   # the file it came from, for messages

    def __post_init__(self) -> None:
        # Relative paths (the default storage dir is "./edge-data") are resolved once, here,
        # against the directory the command was started in. Later consumers (Flask's
        # send_file resolves against the package folder; threads; a changed cwd) then all
        # see the same absolute path.
        node, models = self.node, self.models
        object.__setattr__(self, "storage", replace(self.storage, dir=_absolute(self.storage.dir)))
        object.__setattr__(self, "models", replace(
            models, dir=_absolute(models.dir), engine_cache_dir=_absolute(models.engine_cache_dir)))
        object.__setattr__(self, "node", replace(
            node, tls_cert=_absolute(node.tls_cert), tls_key=_absolute(node.tls_key),
            tls_ca=_absolute(node.tls_ca)))

    @property
    def storage_dir(self) -> Path:
        return Path(self.storage.dir)

    @property
    def journal_path(self) -> Path:
        return self.storage_dir / "journal.sqlite3"

    @property
    def results_dir(self) -> Path:
        return self.storage_dir / "results"

    @property
    def engine_cache_dir(self) -> Path:
        if self.models.engine_cache_dir:
            return Path(self.models.engine_cache_dir)
        return self.storage_dir / "engines"

    @property
    def models_dir(self) -> Path:
        if self.models.dir:
            return Path(self.models.dir)
        from engines import DEFAULT_MODELS_DIR
        return Path(DEFAULT_MODELS_DIR)

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        known = ", ".join(d.name for d in self.destinations) or "none configured"
        raise ConfigError(f"no destination named {name!r} (configured: {known})")


def _absolute(path: str | None) -> str | None:
    """``~`` expanded and made absolute against the current directory (None stays None)."""
    if not path:
        return path
    return os.path.abspath(os.path.expanduser(path))


# ---------------------------------------------------------------- validation helpers

def _check_type(key: str, value: Any, expected: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and expected is not bool and bool not in (expected if isinstance(expected, tuple) else (expected,)):
        raise ConfigError(f"{key}: expected {what}, got {value!r}")
    if not isinstance(value, expected):
        raise ConfigError(f"{key}: expected {what}, got {value!r}")
    return value


def _port(key: str, value: Any) -> int:
    _check_type(key, value, int, "an integer port 1-65535")
    if not 1 <= value <= 65535:
        raise ConfigError(f"{key}: expected a port 1-65535, got {value}")
    return value


def _host(key: str, value: Any) -> str:
    _check_type(key, value, str, "a host name or IP address")
    if not value:
        raise ConfigError(f"{key}: expected a host name or IP address, got an empty string")
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", value):
            raise ConfigError(f"{key}: {value!r} is not a valid host name or IP address") from None
    return value


def _ae(key: str, value: Any) -> str:
    _check_type(key, value, str, "an AE title of 1-16 characters")
    if not _AE_RE.fullmatch(value) or not value.strip():
        raise ConfigError(f"{key}: {value!r} is not a valid AE title (1-16 printable ASCII "
                          f"characters, no backslash, not only spaces)")
    return value.strip()


def _int_range(key: str, value: Any, lo: int, hi: int | None = None) -> int:
    _check_type(key, value, int, f"an integer >= {lo}")
    if value < lo or (hi is not None and value > hi):
        allowed = f"{lo}-{hi}" if hi is not None else f">= {lo}"
        raise ConfigError(f"{key}: expected an integer {allowed}, got {value}")
    return value


def _float_range(key: str, value: Any, lo: float, hi: float | None = None, *, open_lo: bool = False) -> float:
    _check_type(key, value, (int, float), "a number")
    value = float(value)
    if (value <= lo if open_lo else value < lo) or (hi is not None and value > hi):
        allowed = f"{'>' if open_lo else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise ConfigError(f"{key}: expected a number {allowed}, got {value}")
    return value


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of: {', '.join(allowed)}")
    return value


def _str_list(key: str, value: Any, item=None) -> tuple[str, ...]:
    _check_type(key, value, list, "a list of strings")
    out = []
    for i, v in enumerate(value):
        _check_type(f"{key}[{i}]", v, str, "a string")
        out.append(item(f"{key}[{i}]", v) if item else v)
    return tuple(out)


def _opt_path(key: str, value: Any) -> str | None:
    if value is None:
        return None
    _check_type(key, value, str, "a file path")
    return value


def _reject_unknown(section: str, data: dict, cls) -> None:
    known = {f.name for f in fields(cls)}
    for k in data:
        if k not in known:
            raise ConfigError(f"{section}.{k}: unknown key; known keys in [{section}]: {', '.join(sorted(known))}")


# ---------------------------------------------------------------- sections

def _node(d: dict) -> NodeConfig:
    _reject_unknown("node", d, NodeConfig)
    v = NodeConfig()
    kw: dict[str, Any] = {}
    if "ae_title" in d:
        kw["ae_title"] = _ae("node.ae_title", d["ae_title"])
    if "host" in d:
        kw["host"] = _host("node.host", d["host"])
    if "port" in d:
        kw["port"] = _port("node.port", d["port"])
    if "allowed_calling_aets" in d:
        kw["allowed_calling_aets"] = _str_list("node.allowed_calling_aets", d["allowed_calling_aets"], _ae)
    if "require_called_aet" in d:
        kw["require_called_aet"] = _check_type("node.require_called_aet", d["require_called_aet"], bool, "true or false")
    if "max_associations" in d:
        kw["max_associations"] = _int_range("node.max_associations", d["max_associations"], 1, 64)
    for k in ("tls_cert", "tls_key", "tls_ca"):
        if k in d:
            kw[k] = _opt_path(f"node.{k}", d[k])
            if kw[k] and not Path(kw[k]).expanduser().is_file():
                raise ConfigError(f"node.{k}: file {kw[k]!r} does not exist")
    out = NodeConfig(**{**v.__dict__, **kw})
    if bool(out.tls_cert) != bool(out.tls_key):
        raise ConfigError("node.tls_cert and node.tls_key: set both for DICOM TLS, or neither")
    if out.tls_ca and not out.tls_cert:
        raise ConfigError("node.tls_ca: needs node.tls_cert and node.tls_key as well")
    return out


def _storage(d: dict) -> StorageConfig:
    _reject_unknown("storage", d, StorageConfig)
    kw: dict[str, Any] = {}
    if "dir" in d:
        _check_type("storage.dir", d["dir"], str, "a directory path")
        if not d["dir"]:
            raise ConfigError("storage.dir: expected a directory path, got an empty string")
        kw["dir"] = d["dir"]
    if "min_free_mb" in d:
        kw["min_free_mb"] = _int_range("storage.min_free_mb", d["min_free_mb"], 0)
    return StorageConfig(**kw)


def _web(d: dict) -> WebConfig:
    _reject_unknown("web", d, WebConfig)
    kw: dict[str, Any] = {}
    if "host" in d:
        kw["host"] = _host("web.host", d["host"])
    if "port" in d:
        kw["port"] = _port("web.port", d["port"])
    for k in ("password_hash", "metrics_token"):
        if k in d:
            kw[k] = _check_type(f"web.{k}", d[k], str, "a string") or None
    if "language" in d:
        kw["language"] = _choice("web.language", d["language"], ("auto", "en", "vi"))
    return WebConfig(**kw)


def _models(d: dict) -> ModelsConfig:
    _reject_unknown("models", d, ModelsConfig)
    kw: dict[str, Any] = {}
    if "dir" in d:
        kw["dir"] = _opt_path("models.dir", d["dir"])
    if "backend" in d:
        kw["backend"] = _choice("models.backend", d["backend"], BACKENDS)
    if "engine_cache_dir" in d:
        kw["engine_cache_dir"] = _opt_path("models.engine_cache_dir", d["engine_cache_dir"])
    if "tb_threshold" in d:
        kw["tb_threshold"] = _float_range("models.tb_threshold", d["tb_threshold"], 0.0, 1.0, open_lo=True)
    if "workers" in d:
        kw["workers"] = _int_range("models.workers", d["workers"], 1, 8)
    return ModelsConfig(**kw)


def _triage(d: dict) -> TriageRules:
    _reject_unknown("triage", d, TriageRules)
    kw: dict[str, Any] = {}
    for k in ("modalities", "body_parts", "views"):
        if k in d:
            kw[k] = tuple(s.upper() for s in _str_list(f"triage.{k}", d[k]))
    if "min_age_years" in d:
        kw["min_age_years"] = _int_range("triage.min_age_years", d["min_age_years"], 0, 120)
    if "min_side_px" in d:
        kw["min_side_px"] = _int_range("triage.min_side_px", d["min_side_px"], 64)
    if "max_side_px" in d:
        kw["max_side_px"] = _int_range("triage.max_side_px", d["max_side_px"], 64)
    defaults = TriageRules()
    if kw.get("min_side_px", defaults.min_side_px) > kw.get("max_side_px", defaults.max_side_px):
        raise ConfigError("triage.min_side_px: must not be larger than triage.max_side_px")
    try:
        return TriageRules(**kw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"triage: {exc}") from None


def _delivery(d: dict) -> DeliveryConfig:
    _reject_unknown("delivery", d, DeliveryConfig)
    kw: dict[str, Any] = {}
    if "max_age_hours" in d:
        kw["max_age_hours"] = _float_range("delivery.max_age_hours", d["max_age_hours"], 0.0, open_lo=True)
    for k in ("initial_backoff_s", "max_backoff_s", "timeout_s"):
        if k in d:
            kw[k] = _float_range(f"delivery.{k}", d[k], 0.0, open_lo=True)
    out = DeliveryConfig(**kw)
    if out.initial_backoff_s > out.max_backoff_s:
        raise ConfigError("delivery.initial_backoff_s: must not be larger than delivery.max_backoff_s")
    return out


def _logging(d: dict) -> LoggingConfig:
    _reject_unknown("logging", d, LoggingConfig)
    if "level" in d:
        _check_type("logging.level", d["level"], str, "a log level")
        return LoggingConfig(level=_choice("logging.level", d["level"].upper(), LOG_LEVELS))
    return LoggingConfig()


def _destinations(items: Any, node: NodeConfig) -> tuple[Destination, ...]:
    _check_type("destinations", items, list, "an array of tables ([[destinations]])")
    out: list[Destination] = []
    names: set[str] = set()
    for i, d in enumerate(items):
        key = f"destinations[{i}]"
        _check_type(key, d, dict, "a table")
        known = {f.name for f in fields(Destination)}
        for k in d:
            if k not in known:
                raise ConfigError(f"{key}.{k}: unknown key; known keys: {', '.join(sorted(known))}")
        for k in ("name", "ae_title", "host", "port"):
            if k not in d:
                raise ConfigError(f"{key}.{k}: required for every destination")
        name = _check_type(f"{key}.name", d["name"], str, "a name")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ConfigError(f"{key}.name: {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        if name in names:
            raise ConfigError(f"{key}.name: {name!r} is used by another destination")
        names.add(name)
        outputs = OUTPUT_TYPES
        if "outputs" in d:
            outputs = _str_list(f"{key}.outputs", d["outputs"], lambda k, v: _choice(k, v, OUTPUT_TYPES))
            if not outputs:
                raise ConfigError(f"{key}.outputs: empty; choose some of: {', '.join(OUTPUT_TYPES)}")
        out.append(Destination(
            name=name,
            ae_title=_ae(f"{key}.ae_title", d["ae_title"]),
            host=_host(f"{key}.host", d["host"]),
            port=_port(f"{key}.port", d["port"]),
            outputs=tuple(dict.fromkeys(outputs)),
            calling_ae_title=_ae(f"{key}.calling_ae_title", d["calling_ae_title"]) if d.get("calling_ae_title") else None,
            tls=_check_type(f"{key}.tls", d.get("tls", False), bool, "true or false"),
        ))
    return tuple(out)


_SECTIONS = {"node", "storage", "web", "models", "triage", "delivery", "logging", "destinations"}


def config_from_dict(data: dict[str, Any], source: str | None = None) -> Config:
    """Validate a parsed TOML document and build a ``Config``."""
    for k in data:
        if k not in _SECTIONS:
            raise ConfigError(f"{k}: unknown section; known sections: {', '.join(sorted(_SECTIONS))}")
    for k in _SECTIONS - {"destinations"}:
        if k in data and not isinstance(data[k], dict):
            raise ConfigError(f"{k}: expected a table [{k}]")
    node = _node(data.get("node", {}))
    return Config(
        node=node,
        storage=_storage(data.get("storage", {})),
        web=_web(data.get("web", {})),
        models=_models(data.get("models", {})),
        triage=_triage(data.get("triage", {})),
        delivery=_delivery(data.get("delivery", {})),
        logging=_logging(data.get("logging", {})),
        destinations=_destinations(data.get("destinations", []), node),
        source=source,
    )


def load_config(path: str | Path | None) -> Config:
    """Read and validate a TOML config file; ``None`` gives the embedded defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    try:
        return config_from_dict(data, source=str(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
