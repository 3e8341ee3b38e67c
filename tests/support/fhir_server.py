"""A local FHIR R4 endpoint for the tests: the REST semantics the appliance uses, enforced.

No full FHIR server can be installed on these machines (none in Debian; HAPI FHIR is not
reachable), so the tests run this one. It implements only what the appliance sends, and
refuses anything else the way a real server would:

- ``POST /fhir`` of a ``Bundle`` of type ``transaction`` (anything else: 400);
- each entry a conditional update ``PUT Type?identifier=system|value``: no match creates,
  one match updates (same id, version + 1), several matches is 412;
- references to other entries by ``fullUrl`` (``urn:uuid:``) rewritten to ``Type/id``;
  conditional references ``Patient?identifier=system|value`` resolved to exactly one
  existing patient, else 422 (patients are never created by the appliance);
- every resource validated on receipt against the FHIR R4 models of ``fhir.resources``
  (strict), invalid content 400; a wrong bearer token 401; all errors as OperationOutcome;
- a transaction is all or nothing.

``FhirServer(patients=[(system, value)], token="...")``; ``start()``/``stop()`` (the
store survives a stop, as a real EMR's database does); ``resources(type)``,
``transactions`` (count of accepted ones), ``fail_next`` (answer the next requests 503),
``delay_s`` (answer late: a client that gives up or dies still has its transaction kept).
"""
from __future__ import annotations

import importlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

from conftest import free_port

TYPES = ("Patient", "DiagnosticReport", "Observation", "Device")


class Refused(Exception):
    def __init__(self, status: int, code: str, text: str):
        super().__init__(text)
        self.status, self.code, self.text = status, code, text


def outcome(code: str, text: str) -> dict:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": text}]}


def validate(resource: dict) -> None:
    """Strict validation against the R4 model of its type (fhir.resources 5.x, FHIR 4.0.1)."""
    kind = resource.get("resourceType")
    if kind not in TYPES and kind != "Bundle":
        raise Refused(400, "not-supported", f"resource type {kind!r} is not accepted here")
    module = importlib.import_module(f"fhir.resources.{kind.lower()}")
    try:
        getattr(module, kind)(json.loads(json.dumps(resource)), strict=True)
    except Exception as exc:   # noqa: BLE001 - FHIRValidationError and friends
        raise Refused(400, "invalid", f"{kind} is not valid FHIR R4: {' '.join(str(exc).split())[:400]}")


class FhirServer:
    def __init__(self, *, patients: list[tuple[str, str]] = (), token: str | None = None):
        self.token = token
        self.port = free_port()
        self.lock = threading.Lock()
        self.store: dict[str, dict[str, dict]] = {t: {} for t in TYPES}
        self.transactions = 0
        self.requests = 0
        self.fail_next = 0
        self.delay_s = 0.0       # answer this much later (the transaction is kept anyway)
        self._next_id = 0
        for system, value in patients:
            pid = self._new_id()
            self.store["Patient"][pid] = {"resourceType": "Patient", "id": pid,
                                          "meta": {"versionId": "1"},
                                          "identifier": [{"system": system, "value": value}]}
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def resources(self, kind: str) -> list[dict]:
        with self.lock:
            return [json.loads(json.dumps(r)) for r in self.store[kind].values()]

    def _new_id(self) -> str:
        self._next_id += 1
        return str(self._next_id)

    # ------------------------------------------------------------------ REST
    def _search(self, kind: str, query: str) -> list[str]:
        if not query.startswith("identifier="):
            raise Refused(400, "not-supported", f"search {query!r}: only identifier= is supported")
        wanted = unquote(query[len("identifier="):])
        system, _, value = wanted.partition("|")
        return [rid for rid, r in self.store[kind].items()
                if any(i.get("system") == system and i.get("value") == value
                       for i in r.get("identifier", []))]

    def transaction(self, bundle: dict) -> dict:
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
            raise Refused(400, "invalid", "POST to the base needs a Bundle of type transaction")
        validate(bundle)
        entries = bundle.get("entry") or []
        with self.lock:
            ids: dict[str, tuple[str, str, bool]] = {}   # fullUrl -> (type, id, created)
            for entry in entries:
                resource, request = entry.get("resource") or {}, entry.get("request") or {}
                validate(resource)
                kind = resource["resourceType"]
                if request.get("method") != "PUT" or "?" not in request.get("url", ""):
                    raise Refused(400, "not-supported",
                                  f"{kind}: only conditional updates (PUT Type?identifier=) are accepted")
                url_kind, query = request["url"].split("?", 1)
                if url_kind != kind:
                    raise Refused(400, "invalid", f"request url {request['url']!r} is not a {kind}")
                found = self._search(kind, query)
                if len(found) > 1:
                    raise Refused(412, "multiple-matches", f"{request['url']}: {len(found)} matches")
                rid = found[0] if found else self._new_id()
                ids[entry.get("fullUrl", "")] = (kind, rid, not found)
            staged = {}
            for entry in entries:
                kind, rid, created = ids[entry.get("fullUrl", "")]
                resource = self._resolve(json.loads(json.dumps(entry["resource"])), ids)
                old = self.store[kind].get(rid)
                version = 1 if old is None else int(old["meta"]["versionId"]) + 1
                resource["id"], resource["meta"] = rid, {"versionId": str(version)}
                validate(resource)
                staged[(kind, rid)] = (resource, created)
            for (kind, rid), (resource, _) in staged.items():
                self.store[kind][rid] = resource
            self.transactions += 1
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": [
            {"response": {"status": "201 Created" if created else "200 OK",
                          "location": f"{kind}/{rid}/_history/{resource['meta']['versionId']}"}}
            for (kind, rid), (resource, created) in staged.items()]}

    def _resolve(self, node, ids):
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key == "reference" and isinstance(value, str):
                    out[key] = self._reference(value, ids)
                else:
                    out[key] = self._resolve(value, ids)
            return out
        if isinstance(node, list):
            return [self._resolve(v, ids) for v in node]
        return node

    def _reference(self, value: str, ids) -> str:
        if value in ids:
            kind, rid, _ = ids[value]
            return f"{kind}/{rid}"
        if "?" in value:
            kind, query = value.split("?", 1)
            if kind not in self.store:
                raise Refused(400, "not-supported", f"conditional reference to {kind}")
            found = self._search(kind, query)
            if len(found) != 1:
                raise Refused(422, "processing",
                              f"conditional reference {value!r} matches {len(found)} {kind} resources; "
                              "exactly one is needed")
            return f"{kind}/{found[0]}"
        return value

    # ------------------------------------------------------------------ HTTP
    def start(self) -> "FhirServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):   # quiet
                pass

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):   # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                server.requests += 1
                if server.delay_s:
                    time.sleep(server.delay_s)
                if server.fail_next > 0:
                    server.fail_next -= 1
                    return self._answer(503, outcome("transient", "EMR busy"))
                if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
                    return self._answer(401, outcome("security", "bearer token missing or wrong"))
                if self.path.rstrip("/") != "/fhir":
                    return self._answer(404, outcome("not-found", f"no endpoint {self.path}"))
                if "fhir+json" not in (self.headers.get("Content-Type") or ""):
                    return self._answer(415, outcome("not-supported", "send application/fhir+json"))
                try:
                    return self._answer(200, server.transaction(json.loads(body)))
                except Refused as exc:
                    return self._answer(exc.status, outcome(exc.code, exc.text))
                except ValueError as exc:
                    return self._answer(400, outcome("invalid", f"not JSON: {exc}"))

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True, name="fhir-test-server").start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
