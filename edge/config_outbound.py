"""Config of the outbound links beyond the PACS: ``[fhir]`` (the hospital's EMR) and
``[[forward]]`` rules (referred images to a remote reading centre).

``[fhir]`` (absent: nothing is sent to an EMR)::

    [fhir]
    name = "emr"                               # how deliveries, logs and the page name it
    base_url = "https://emr.example/fhir"      # the FHIR R4 service base; a transaction
                                               # Bundle is POSTed to it
    token_file = "/etc/edge/fhir-token"        # bearer token (the file's first line); or
    # token = "..."                            # in the config itself (less safe)
    patient_identifier_system = "urn:oid:1.2.3"   # system of DICOM Patient ID without issuer
    issuer_systems = { HOSP_A = "urn:oid:1.2.3.4" }   # Issuer of Patient ID -> system
    language = "vi"                            # conclusion text: "en" or "vi"
    timeout_s = 20
    # ca_file = "/etc/edge/emr-ca.pem"; verify_tls = true

``[[forward]]``, one table per rule::

    [[forward]]
    name = "tb-to-province"                    # shown on the status page and in the journal
    destination = "reading_centre"             # a [[destinations]] entry; it then receives
                                               # only what rules forward
    tb_refer = true                            # TB screen positive ...
    refer = false                              # ... or any refer (a site model's findings too)
    min_nodule_mm = 10.0                       # ... or a nodule/mass at least this long

A matching image is sent there with its results (the image itself, then the
destination's ``outputs``), once, through the same durable outbox.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

FHIR_LANGUAGES = ("en", "vi")
DEFAULT_PATIENT_SYSTEM = "urn:xray-edge:patient-id"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class FhirConfig:
    base_url: str
    name: str = "emr"
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    patient_identifier_system: str = DEFAULT_PATIENT_SYSTEM
    issuer_systems: dict[str, str] = field(default_factory=dict)
    language: str = "en"
    timeout_s: float = 20.0
    ca_file: str | None = None
    verify_tls: bool = True

    # The outbox treats the EMR like a destination: no image goes first.
    source_first = False

    def bearer_token(self) -> str | None:
        """The token from ``token_file`` (read at each use, so that a rotated token is
        picked up) or ``token``; None for no Authorization header."""
        if self.token_file:
            text = Path(self.token_file).read_text(encoding="utf-8").strip()
            return text.splitlines()[0].strip() if text else None
        return self.token


@dataclass(frozen=True)
class ForwardRule:
    name: str
    destination: str
    tb_refer: bool = False
    refer: bool = False
    min_nodule_mm: float | None = None

    def matches(self, findings: Any) -> bool:
        """Whether an image with these findings (``edge.findings.Findings``) is forwarded."""
        if self.tb_refer and findings.tb is not None and findings.tb.positive:
            return True
        if self.refer and findings.refer:
            return True
        if self.min_nodule_mm is not None:
            sizes = [n.diameter_mm for n in findings.nodules]
            sizes += [o.diameter_mm for o in findings.other_detections
                      if o.code and (o.code.get("scheme"), o.code.get("value")) in _NODULE_OR_MASS]
            return any(s is not None and s >= self.min_nodule_mm for s in sizes)
        return False


# Nodule, pulmonary nodule, mass (SNOMED CT): what "nodule/mass" rules look at besides nodules.
_NODULE_OR_MASS = frozenset({("SCT", "27925004"), ("SCT", "786838002"), ("SCT", "4147007")})


def parse_fhir(d: Any, error: type[Exception], exists) -> FhirConfig | None:
    """The ``[fhir]`` table; ``error`` is the config's error class, ``exists(key, value)``
    checks an existing file."""
    if d is None:
        return None
    if not isinstance(d, dict):
        raise error("fhir: expected a table [fhir]")
    known = {f.name for f in fields(FhirConfig)}
    for k in d:
        if k not in known:
            raise error(f"fhir.{k}: unknown key; known keys: {', '.join(sorted(known))}")
    base_url = d.get("base_url")
    if not isinstance(base_url, str) or urlsplit(base_url).scheme not in ("http", "https") \
            or not urlsplit(base_url).netloc:
        raise error(f"fhir.base_url: expected the FHIR service base URL (http or https), got {base_url!r}")
    kw: dict[str, Any] = {"base_url": base_url.rstrip("/")}
    name = d.get("name", "emr")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise error(f"fhir.name: {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    kw["name"] = name
    for key in ("token", "patient_identifier_system"):
        if key in d:
            if not isinstance(d[key], str) or not d[key].strip():
                raise error(f"fhir.{key}: expected a non-empty string")
            kw[key] = d[key].strip()
    if "token" in kw and "token_file" in d:
        raise error("fhir.token_file: give either token or token_file, not both")
    for key in ("token_file", "ca_file"):
        if key in d:
            kw[key] = exists(f"fhir.{key}", d[key])
    systems = d.get("issuer_systems", {})
    if not isinstance(systems, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                               for k, v in systems.items()):
        raise error("fhir.issuer_systems: expected a table of Issuer of Patient ID = system URI")
    kw["issuer_systems"] = {k.strip(): v.strip() for k, v in systems.items()}
    language = d.get("language", "en")
    if language not in FHIR_LANGUAGES:
        raise error(f"fhir.language: expected one of {', '.join(FHIR_LANGUAGES)}, got {language!r}")
    kw["language"] = language
    timeout = d.get("timeout_s", 20.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 1 <= timeout <= 300:
        raise error(f"fhir.timeout_s: expected seconds between 1 and 300, got {timeout!r}")
    kw["timeout_s"] = float(timeout)
    verify = d.get("verify_tls", True)
    if not isinstance(verify, bool):
        raise error(f"fhir.verify_tls: expected true or false, got {verify!r}")
    kw["verify_tls"] = verify
    return FhirConfig(**kw)


def parse_forward(items: Any, destinations: tuple, error: type[Exception]) -> tuple[ForwardRule, ...]:
    """The ``[[forward]]`` rules, checked against the configured destinations."""
    if not isinstance(items, list):
        raise error("forward: expected an array of tables ([[forward]])")
    known = {f.name for f in fields(ForwardRule)}
    names = {d.name for d in destinations}
    out: list[ForwardRule] = []
    for i, d in enumerate(items):
        key = f"forward[{i}]"
        if not isinstance(d, dict):
            raise error(f"{key}: expected a table")
        for k in d:
            if k not in known:
                raise error(f"{key}.{k}: unknown key; known keys: {', '.join(sorted(known))}")
        for k in ("name", "destination"):
            if k not in d:
                raise error(f"{key}.{k}: required for every forward rule")
        name = d["name"]
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise error(f"{key}.name: {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        if any(r.name == name for r in out):
            raise error(f"{key}.name: {name!r} is used by another forward rule")
        if d["destination"] not in names:
            raise error(f"{key}.destination: {d['destination']!r} is not a [[destinations]] name "
                        f"(configured: {', '.join(sorted(names)) or 'none'})")
        flags = {}
        for k in ("tb_refer", "refer"):
            value = d.get(k, False)
            if not isinstance(value, bool):
                raise error(f"{key}.{k}: expected true or false, got {value!r}")
            flags[k] = value
        size = d.get("min_nodule_mm")
        if size is not None and (isinstance(size, bool) or not isinstance(size, (int, float)) or size <= 0):
            raise error(f"{key}.min_nodule_mm: expected a size in mm > 0, got {size!r}")
        if not flags["tb_refer"] and not flags["refer"] and size is None:
            raise error(f"{key}: says when to forward with tb_refer, refer or min_nodule_mm; none is set")
        out.append(ForwardRule(name=name, destination=d["destination"],
                               min_nodule_mm=None if size is None else float(size), **flags))
    return tuple(out)
