"""Sending a FHIR transaction Bundle to the EMR (``[fhir] base_url``), for the outbox.

One POST of the Bundle to the service base with ``Content-Type: application/fhir+json``
and, when configured, ``Authorization: Bearer <token>``. The answer decides what the outbox
does (``FhirOutcome``):

- 2xx: delivered;
- 408, 429 and 5xx, no connection, a timeout: retried with the usual backoff;
- any other 4xx (the EMR refuses the content: unknown patient, invalid resource, no
  permission): given up at once, with the server's own message (the OperationOutcome's
  ``diagnostics``/``details.text``) shown to the engineer; sending it again would not help.

Written on the standard library (urllib): one request type, no client library needed.
"""
from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass

from .config_outbound import FhirConfig

__all__ = ["FhirOutcome", "post_transaction", "operation_outcome_text"]

RETRIED_4XX = (408, 429)


@dataclass(frozen=True)
class FhirOutcome:
    delivered: bool
    status: int | None      # HTTP status; None when no answer came
    message: str
    permanent: bool = False  # do not retry: the EMR refused the content


def operation_outcome_text(body: bytes) -> str | None:
    """The issues of an OperationOutcome as one line, or None if ``body`` is not one."""
    try:
        outcome = json.loads(body.decode("utf-8", "replace"))
    except ValueError:
        return None
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return None
    parts = []
    for issue in outcome.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code")
        if text:
            parts.append(f"{issue.get('severity', 'error')}: {text}")
    return "; ".join(parts)[:500] or None


def post_transaction(config: FhirConfig, data: bytes) -> FhirOutcome:
    """POST one transaction Bundle; see the module docstring for what each answer means."""
    headers = {"Content-Type": "application/fhir+json; charset=utf-8",
               "Accept": "application/fhir+json"}
    try:
        token = config.bearer_token()
    except OSError as exc:
        return FhirOutcome(False, None, f"the FHIR token file cannot be read ({exc.strerror or exc})")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(config.base_url, data=data, headers=headers, method="POST")
    context = None
    if config.base_url.startswith("https://"):
        context = ssl.create_default_context(cafile=config.ca_file)
        if not config.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(request, timeout=config.timeout_s, context=context) as answer:
            answer.read()
            return FhirOutcome(True, answer.status, f"HTTP {answer.status}")
    except urllib.error.HTTPError as exc:
        body = exc.read() if exc.fp is not None else b""
        said = operation_outcome_text(body) or (exc.reason if isinstance(exc.reason, str) else "")
        message = f"HTTP {exc.code} from the EMR" + (f": {said}" if said else "")
        permanent = 400 <= exc.code < 500 and exc.code not in RETRIED_4XX
        return FhirOutcome(False, exc.code, message, permanent=permanent)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return FhirOutcome(False, None, f"EMR not reachable: {reason}")
