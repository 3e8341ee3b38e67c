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

from .config_outbound import FhirConfig, ForwardRule, parse_fhir, parse_forward
from .triage import TriageRules

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("sr", "gsps", "sc")          # result objects the box makes
SOURCE = "source"                            # the received image itself, forwarded as is
DESTINATION_OUTPUTS = (SOURCE, *OUTPUT_TYPES)
COMMITMENT_MODES = ("off", "stored", "forwarded")
BACKENDS = ("auto", "onnxruntime", "tensorrt", "triton")
TRITON_PROTOCOLS = ("grpc", "http")
PRECISIONS = ("fp16", "fp32", "int8")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")   # default character repertoire, no backslash
# werkzeug.security hashes: "method[:params]$salt$hash"
_PASSWORD_HASH_RE = re.compile(r"(scrypt|pbkdf2)(:[a-z0-9:]+)?\$[^$\s]+\$[0-9a-f]+")


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
    max_associations_per_peer: int = 4      # per remote address: one sender cannot take every slot
    association_request_timeout_s: float = 10.0   # TCP connect -> complete A-ASSOCIATE-RQ
    pdu_timeout_s: float = 60.0             # most time between two complete PDUs from a peer
    max_instance_mb: int = 512              # larger instances are refused at the door
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    # Storage Commitment Push Model SCP: "stored" commits to what is durable on the box,
    # "forwarded" also waits until every destination taking "source" holds the image,
    # "off" does not offer the service.
    commitment: str = "stored"
    commitment_timeout_s: float = 600.0      # "forwarded": longest wait before failures are reported
    commitment_report_port: int | None = None   # modality not in [[modalities]]: report to its IP here


@dataclass(frozen=True)
class ModalityConfig:
    """A sender the box may have to call back: storage commitment results on a new association."""
    name: str
    ae_title: str
    host: str
    port: int


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
    session_hours: float = 12.0          # a login lasts this long; logout ends it at once
    tls_cert: str | None = None          # both set: the status page is served over HTTPS
    tls_key: str | None = None


@dataclass(frozen=True)
class IdentityConfig:
    """This box, as named in every object it creates (General Equipment, Device Observer)."""
    serial_number: str | None = None     # None: derived from /etc/machine-id (stable per box)
    station_name: str | None = None      # None: the host name (up to 16 characters)
    institution_name: str | None = None


@dataclass(frozen=True)
class AnalysisConfig:
    """Limits on analysing one image (the pixel decoder runs in a separate process)."""
    decode_timeout_s: float = 30.0       # a decoder that hangs longer is killed: image failed
    decode_memory_mb: int = 4096         # address-space limit of the decoder process
    stalled_after_s: float = 300.0       # health fails when an image waits longer than this


@dataclass(frozen=True)
class ModelsConfig:
    dir: str | None = None            # None: the models shipped in engines/models
    backend: str = "auto"
    engine_cache_dir: str | None = None   # None: <storage.dir>/engines
    tb_threshold: float | None = None     # None: the manifest's threshold
    workers: int = 1
    precision: str = "fp16"               # TensorRT engines: fp16, fp32 (no TF32) or int8
    calibration_dir: str | None = None    # INT8: folder of .npy model-input tensors
    skip_broken: bool = False             # True: run on the models that load, refuse the others
    # backend "triton": a shared Triton Inference Server (docs/DEPLOY.md, Province hub)
    triton_url: str | None = None         # host:port (gRPC 8001, HTTP 8000 by default)
    triton_protocol: str = "grpc"         # or "http"
    triton_timeout_s: float = 5.0         # a slower answer falls back to local onnxruntime
    triton_retry_s: float = 10.0          # after a failure, Triton is tried again after this
    triton_fallback: bool = True          # False: images wait for Triton instead
    triton_tls: bool = False
    triton_ca: str | None = None          # CA bundle of the server certificate
    triton_cert: str | None = None        # client certificate and key (mutual TLS)
    triton_key: str | None = None
    triton_headers: tuple[tuple[str, str], ...] = ()   # sent with every request (auth proxy, API key)


@dataclass(frozen=True)
class Destination:
    name: str
    ae_title: str
    host: str
    port: int
    outputs: tuple[str, ...] = OUTPUT_TYPES
    calling_ae_title: str | None = None   # None: node.ae_title
    tls: bool = False
    tls_ca: str | None = None             # CA bundle that signed the PACS certificate (None: node.tls_ca)
    tls_server_name: str | None = None    # name the PACS certificate must carry (None: host)
    tls_verify: bool = True               # False: no certificate check (logged loudly at start)
    source_first: bool = True             # results of an image wait until the image itself is there

    @property
    def forwards_source(self) -> bool:
        return SOURCE in self.outputs


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
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    triage: TriageRules = field(default_factory=TriageRules)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    destinations: tuple[Destination, ...] = ()
    modalities: tuple[ModalityConfig, ...] = ()
    fhir: FhirConfig | None = None          # the EMR (edge.config_outbound)
    forward: tuple[ForwardRule, ...] = ()   # referred images to a reading centre
    source: str | None = None   # the file it came from, for messages

    def __post_init__(self) -> None:
        # Relative paths (the default storage dir is "./edge-data") are resolved once, here,
        # against the directory the command was started in. Later consumers (Flask's
        # send_file resolves against the package folder; threads; a changed cwd) then all
        # see the same absolute path.
        node, models = self.node, self.models
        object.__setattr__(self, "storage", replace(self.storage, dir=_absolute(self.storage.dir)))
        object.__setattr__(self, "models", replace(
            models, dir=_absolute(models.dir), engine_cache_dir=_absolute(models.engine_cache_dir),
            calibration_dir=_absolute(models.calibration_dir), triton_ca=_absolute(models.triton_ca),
            triton_cert=_absolute(models.triton_cert), triton_key=_absolute(models.triton_key)))
        object.__setattr__(self, "node", replace(
            node, tls_cert=_absolute(node.tls_cert), tls_key=_absolute(node.tls_key),
            tls_ca=_absolute(node.tls_ca)))
        object.__setattr__(self, "web", replace(
            self.web, tls_cert=_absolute(self.web.tls_cert), tls_key=_absolute(self.web.tls_key)))
        object.__setattr__(self, "destinations", tuple(
            replace(d, tls_ca=_absolute(d.tls_ca)) for d in self.destinations))

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

    @property
    def forward_only(self) -> frozenset[str]:
        """Destinations named by [[forward]] rules: they get only what the rules send."""
        return frozenset(r.destination for r in self.forward)

    @property
    def source_destinations(self) -> tuple[Destination, ...]:
        """Destinations the received images are forwarded to (router mode)."""
        return tuple(d for d in self.destinations if d.forwards_source)

    def modality(self, ae_title: str) -> ModalityConfig | None:
        """The configured modality with this AE title, if any."""
        for modality in self.modalities:
            if modality.ae_title == ae_title.strip():
                return modality
        return None

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


def _existing_file(key: str, value: Any) -> str | None:
    path = _opt_path(key, value)
    if path and not Path(path).expanduser().is_file():
        raise ConfigError(f"{key}: file {path!r} does not exist")
    return path


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
    if "max_associations_per_peer" in d:
        kw["max_associations_per_peer"] = _int_range(
            "node.max_associations_per_peer", d["max_associations_per_peer"], 1, 64)
    for k in ("association_request_timeout_s", "pdu_timeout_s"):
        if k in d:
            kw[k] = _float_range(f"node.{k}", d[k], 0.0, 3600.0, open_lo=True)
    if "max_instance_mb" in d:
        kw["max_instance_mb"] = _int_range("node.max_instance_mb", d["max_instance_mb"], 1, 65536)
    for k in ("tls_cert", "tls_key", "tls_ca"):
        if k in d:
            kw[k] = _existing_file(f"node.{k}", d[k])
    if "commitment" in d:
        kw["commitment"] = _choice("node.commitment", d["commitment"], COMMITMENT_MODES)
    if "commitment_timeout_s" in d:
        kw["commitment_timeout_s"] = _float_range("node.commitment_timeout_s", d["commitment_timeout_s"],
                                                  0.0, 7 * 86400.0, open_lo=True)
    if "commitment_report_port" in d:
        kw["commitment_report_port"] = _port("node.commitment_report_port", d["commitment_report_port"])
    out = NodeConfig(**{**v.__dict__, **kw})
    if bool(out.tls_cert) != bool(out.tls_key):
        raise ConfigError("node.tls_cert and node.tls_key: set both for DICOM TLS, or neither")
    if out.tls_ca and not out.tls_cert:
        raise ConfigError("node.tls_ca: needs node.tls_cert and node.tls_key as well")
    if out.max_associations_per_peer > out.max_associations:
        raise ConfigError("node.max_associations_per_peer: must not be larger than node.max_associations")
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
    if kw.get("password_hash") and not _PASSWORD_HASH_RE.fullmatch(kw["password_hash"]):
        raise ConfigError("web.password_hash: not a password hash (expected 'scrypt:...' or "
                          "'pbkdf2:...'); a plain password must not be stored in the config. "
                          "Make one with: python -c \"from werkzeug.security import "
                          "generate_password_hash as h; print(h(input('password: ')))\"")
    if "language" in d:
        kw["language"] = _choice("web.language", d["language"], ("auto", "en", "vi"))
    if "session_hours" in d:
        kw["session_hours"] = _float_range("web.session_hours", d["session_hours"], 0.0, 24.0 * 30, open_lo=True)
    for k in ("tls_cert", "tls_key"):
        if k in d:
            kw[k] = _existing_file(f"web.{k}", d[k])
    if bool(kw.get("tls_cert")) != bool(kw.get("tls_key")):
        raise ConfigError("web.tls_cert and web.tls_key: set both to serve the status page over HTTPS, or neither")
    return WebConfig(**kw)


def _identity(d: dict) -> IdentityConfig:
    _reject_unknown("identity", d, IdentityConfig)
    kw: dict[str, Any] = {}
    # DICOM lengths (SH 16, LO 64) are checked as UTF-8 bytes, as validators count them: a
    # Vietnamese letter with its marks takes 2-3 bytes.
    for k, limit in (("serial_number", 64), ("station_name", 16), ("institution_name", 64)):
        if k in d:
            value = _check_type(f"identity.{k}", d[k], str, "a string").strip()
            if (not value or len(value.encode("utf-8")) > limit or "\\" in value
                    or any(ord(c) < 32 for c in value)):
                raise ConfigError(f"identity.{k}: {value!r} must be 1-{limit} bytes in UTF-8 "
                                  "(a Vietnamese letter takes 2-3), without backslashes or "
                                  "control characters")
            kw[k] = value
    return IdentityConfig(**kw)


def _analysis(d: dict) -> AnalysisConfig:
    _reject_unknown("analysis", d, AnalysisConfig)
    kw: dict[str, Any] = {}
    for k in ("decode_timeout_s", "stalled_after_s"):
        if k in d:
            kw[k] = _float_range(f"analysis.{k}", d[k], 0.0, 86400.0, open_lo=True)
    if "decode_memory_mb" in d:
        kw["decode_memory_mb"] = _int_range("analysis.decode_memory_mb", d["decode_memory_mb"], 256)
    return AnalysisConfig(**kw)


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
    if "precision" in d:
        kw["precision"] = _choice("models.precision", d["precision"], PRECISIONS)
    if "skip_broken" in d:
        if not isinstance(d["skip_broken"], bool):
            raise ConfigError(f"models.skip_broken: expected true or false, got {d['skip_broken']!r}")
        kw["skip_broken"] = d["skip_broken"]
    if "calibration_dir" in d:
        kw["calibration_dir"] = _opt_path("models.calibration_dir", d["calibration_dir"])
        if kw["calibration_dir"] and not Path(kw["calibration_dir"]).expanduser().is_dir():
            raise ConfigError(f"models.calibration_dir: folder {kw['calibration_dir']!r} does not exist")
    kw.update(_triton_keys(d))
    out = ModelsConfig(**kw)
    if out.backend == "triton" and not out.triton_url:
        raise ConfigError("models.triton_url: backend 'triton' needs the server address, "
                          "e.g. triton_url = \"triton.hospital.lan:8001\" (gRPC)")
    if out.precision == "int8" and not out.calibration_dir:
        raise ConfigError("models.precision: int8 needs models.calibration_dir (a folder of .npy "
                          "model-input tensors); without one use fp16")
    if out.calibration_dir and out.precision != "int8":
        raise ConfigError(f"models.calibration_dir: a calibration set is only used with precision "
                          f"int8, not {out.precision}")
    return out


def _triton_keys(d: dict) -> dict[str, Any]:
    """The ``[models] triton_*`` keys."""
    kw: dict[str, Any] = {}
    if "triton_url" in d:
        url = _check_type("models.triton_url", d["triton_url"], str, "host:port")
        if "://" in url:
            raise ConfigError(f"models.triton_url: {url!r}: give host:port without a scheme "
                              "(set triton_protocol and triton_tls instead)")
        if not re.fullmatch(r"[A-Za-z0-9.\-]{1,253}:\d{1,5}|\[[0-9A-Fa-f:]+\]:\d{1,5}", url):
            raise ConfigError(f"models.triton_url: {url!r} is not host:port")
        kw["triton_url"] = url
    if "triton_protocol" in d:
        kw["triton_protocol"] = _choice("models.triton_protocol", d["triton_protocol"], TRITON_PROTOCOLS)
    if "triton_timeout_s" in d:
        kw["triton_timeout_s"] = _float_range("models.triton_timeout_s", d["triton_timeout_s"], 0.0, 600.0,
                                              open_lo=True)
    if "triton_retry_s" in d:
        kw["triton_retry_s"] = _float_range("models.triton_retry_s", d["triton_retry_s"], 0.0, 3600.0)
    for k in ("triton_fallback", "triton_tls"):
        if k in d:
            kw[k] = _check_type(f"models.{k}", d[k], bool, "true or false")
    for k in ("triton_ca", "triton_cert", "triton_key"):
        if k in d:
            kw[k] = _existing_file(f"models.{k}", d[k])
    if "triton_headers" in d:
        headers = _check_type("models.triton_headers", d["triton_headers"], dict,
                              "a table of header names and values")
        for name, value in headers.items():
            if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", name):
                raise ConfigError(f"models.triton_headers.{name}: not an HTTP header name")
            _check_type(f"models.triton_headers.{name}", value, str, "a string")
        kw["triton_headers"] = tuple((k.lower(), v) for k, v in headers.items())
    if bool(kw.get("triton_cert")) != bool(kw.get("triton_key")):
        raise ConfigError("models.triton_cert and models.triton_key: set both for mutual TLS, or neither")
    if (kw.get("triton_ca") or kw.get("triton_cert")) and not kw.get("triton_tls"):
        raise ConfigError("models.triton_tls: set it to true to use triton_ca / triton_cert")
    return kw


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
            outputs = _str_list(f"{key}.outputs", d["outputs"],
                                lambda k, v: _choice(k, v, DESTINATION_OUTPUTS))
            if not outputs:
                raise ConfigError(f"{key}.outputs: empty; choose some of: {', '.join(DESTINATION_OUTPUTS)}")
        tls = _check_type(f"{key}.tls", d.get("tls", False), bool, "true or false")
        tls_verify = _check_type(f"{key}.tls_verify", d.get("tls_verify", True), bool, "true or false")
        tls_ca = _existing_file(f"{key}.tls_ca", d.get("tls_ca"))
        if tls and tls_verify and not (tls_ca or node.tls_ca):
            raise ConfigError(f"{key}.tls_ca: DICOM TLS to {name!r} needs the CA that signed the "
                              f"PACS certificate ({key}.tls_ca or node.tls_ca), so that the box "
                              f"checks whom it sends patient data to; or set {key}.tls_verify = false")
        server_name = d.get("tls_server_name")
        if server_name is not None:
            server_name = _host(f"{key}.tls_server_name", server_name)
        out.append(Destination(
            name=name,
            ae_title=_ae(f"{key}.ae_title", d["ae_title"]),
            host=_host(f"{key}.host", d["host"]),
            port=_port(f"{key}.port", d["port"]),
            outputs=tuple(dict.fromkeys(outputs)),
            calling_ae_title=_ae(f"{key}.calling_ae_title", d["calling_ae_title"]) if d.get("calling_ae_title") else None,
            tls=tls,
            tls_ca=tls_ca,
            tls_server_name=server_name,
            tls_verify=tls_verify,
            source_first=_check_type(f"{key}.source_first", d.get("source_first", True), bool,
                                     "true or false"),
        ))
    return tuple(out)


def _modalities(items: Any) -> tuple[ModalityConfig, ...]:
    _check_type("modalities", items, list, "an array of tables ([[modalities]])")
    out: list[ModalityConfig] = []
    for i, d in enumerate(items):
        key = f"modalities[{i}]"
        _check_type(key, d, dict, "a table")
        known = {f.name for f in fields(ModalityConfig)}
        for k in d:
            if k not in known:
                raise ConfigError(f"{key}.{k}: unknown key; known keys: {', '.join(sorted(known))}")
        for k in ("name", "ae_title", "host", "port"):
            if k not in d:
                raise ConfigError(f"{key}.{k}: required for every modality")
        name = _check_type(f"{key}.name", d["name"], str, "a name")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ConfigError(f"{key}.name: {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        modality = ModalityConfig(name=name, ae_title=_ae(f"{key}.ae_title", d["ae_title"]),
                                  host=_host(f"{key}.host", d["host"]), port=_port(f"{key}.port", d["port"]))
        for other in out:
            if other.name == modality.name:
                raise ConfigError(f"{key}.name: {name!r} is used by another modality")
            if other.ae_title == modality.ae_title:
                raise ConfigError(f"{key}.ae_title: {modality.ae_title!r} is used by modality "
                                  f"{other.name!r}; storage commitment results are sent by AE title")
        out.append(modality)
    return tuple(out)


_SECTIONS = {"node", "storage", "web", "models", "analysis", "identity", "triage", "delivery",
             "logging", "destinations", "modalities", "fhir", "forward"}
_ARRAYS = {"destinations", "modalities", "forward"}


def config_from_dict(data: dict[str, Any], source: str | None = None) -> Config:
    """Validate a parsed TOML document and build a ``Config``."""
    for k in data:
        if k not in _SECTIONS:
            raise ConfigError(f"{k}: unknown section; known sections: {', '.join(sorted(_SECTIONS))}")
    for k in _SECTIONS - _ARRAYS:
        if k in data and not isinstance(data[k], dict):
            raise ConfigError(f"{k}: expected a table [{k}]")
    node = _node(data.get("node", {}))
    destinations = _destinations(data.get("destinations", []), node)
    return Config(
        node=node,
        storage=_storage(data.get("storage", {})),
        web=_web(data.get("web", {})),
        models=_models(data.get("models", {})),
        analysis=_analysis(data.get("analysis", {})),
        identity=_identity(data.get("identity", {})),
        triage=_triage(data.get("triage", {})),
        delivery=_delivery(data.get("delivery", {})),
        logging=_logging(data.get("logging", {})),
        destinations=destinations,
        modalities=_modalities(data.get("modalities", [])),
        fhir=parse_fhir(data.get("fhir"), ConfigError, _existing_file),
        forward=parse_forward(data.get("forward", []), destinations, ConfigError),
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
    except IsADirectoryError:
        raise ConfigError(f"config file {str(path)!r} is a directory") from None
    except PermissionError:
        raise ConfigError(f"config file {str(path)!r} cannot be read (permission denied)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {exc.start}); "
                          "save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    try:
        return config_from_dict(data, source=str(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
