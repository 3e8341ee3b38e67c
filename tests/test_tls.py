"""DICOM TLS with DCMTK peers: the listener (storescu as client) and the outbox (storescp as PACS)."""
from __future__ import annotations

import logging
import socket
import ssl
import subprocess
import time

import pytest

from conftest import make_dx, require_tool, wait_until
from test_outbox import make_outbox, queue_results, states, storescp  # noqa: F401 (fixture)


def _make_pki(d):
    """A CA, a server cert for the box and a client cert for the modality (openssl CLI)."""
    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    for name in ("box", "modality"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.crt")
    return d


def _storescu_tls(srv, f, d, with_client_cert=True, timeout=60):
    args = ["storescu", "-aet", "MODALITY", "-aec", "EDGE_AI"]
    if with_client_cert:
        args += ["+tls", str(d / "modality.key"), str(d / "modality.crt")]
    else:
        args += ["+tla"]
    args += ["+cf", str(d / "ca.crt"), "127.0.0.1", str(srv.port), str(f)]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def test_tls_listener_requires_a_client_certificate_from_the_site_ca(tmp_path, edge_server):
    require_tool("storescu")
    require_tool("openssl")
    pki = tmp_path / "pki"
    pki.mkdir()
    _make_pki(pki)
    srv = edge_server(node={"tls_cert": str(pki / "box.crt"), "tls_key": str(pki / "box.key"),
                            "tls_ca": str(pki / "ca.crt")}).start()
    f = tmp_path / "a.dcm"
    ds = make_dx(f, seed=77)
    plain = srv.storescu(f)
    assert plain.returncode != 0, "a plain TCP association must not be accepted on a TLS port"
    anonymous = _storescu_tls(srv, f, pki, with_client_cert=False)
    assert anonymous.returncode != 0, "a client without a certificate must be refused"
    ok = _storescu_tls(srv, f, pki)
    assert ok.returncode == 0, ok.stderr
    assert [j["sop_instance_uid"] for j in srv.jobs()] == [ds.SOPInstanceUID]


def test_a_silent_tls_client_does_not_block_the_listener(tmp_path, edge_server):
    """pynetdicom does the server-side TLS handshake in its accept loop: one client that
    connects and sends nothing used to keep every other modality out."""
    require_tool("storescu")
    require_tool("openssl")
    pki = tmp_path / "pki"
    pki.mkdir()
    _make_pki(pki)
    srv = edge_server(node={"tls_cert": str(pki / "box.crt"), "tls_key": str(pki / "box.key"),
                            "tls_ca": str(pki / "ca.crt"), "association_request_timeout_s": 1.5}).start()
    f = tmp_path / "a.dcm"
    ds = make_dx(f, seed=78)
    with socket.create_connection(("127.0.0.1", srv.port)) as silent:
        time.sleep(0.3)   # accepted, handshake pending
        started = time.monotonic()
        ok = _storescu_tls(srv, f, pki, timeout=20)
        assert ok.returncode == 0, ok.stderr
        assert time.monotonic() - started < 10
        silent.settimeout(5)
        assert silent.recv(1) == b"", "the silent client is closed at its deadline"
    assert [j["sop_instance_uid"] for j in srv.jobs()] == [ds.SOPInstanceUID]


# ------------------------------------------------------------------ outbound: the box as TLS client

def _make_pacs_pki(d):
    """On top of _make_pki: a PACS server certificate (SAN pacs.test and 127.0.0.1) from the
    site CA, and an unrelated CA that signed nothing the PACS has."""
    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)
    _make_pki(d)
    (d / "san.cnf").write_text("subjectAltName=DNS:pacs.test,IP:127.0.0.1\n")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=pacs.test", "-keyout", "pacs.key",
        "-out", "pacs.csr")
    run("x509", "-req", "-in", "pacs.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-extfile", "san.cnf", "-out", "pacs.crt")
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=other-ca",
        "-keyout", "other-ca.key", "-out", "other-ca.crt")
    return d


def test_outbox_verifies_the_pacs_certificate_and_name(tmp_path, storescp, caplog):
    """storescp (DCMTK, OpenSSL) with a site-CA certificate that requires the box's client
    certificate: right CA and name -> delivered; wrong CA or name -> not delivered, and the
    delivery error says why; tls_verify = false -> delivered, with one warning at start."""
    require_tool("openssl")
    pki = tmp_path / "pki"
    pki.mkdir()
    _make_pacs_pki(pki)
    pacs = storescp(tls_args=["+tls", str(pki / "pacs.key"), str(pki / "pacs.crt"),
                              "+cf", str(pki / "ca.crt"), "--require-peer-cert"])
    tls = {"tls": True}
    outbox, journal = make_outbox(
        tmp_path,
        [pacs.destination("by_ip", **tls),                                   # IP SAN, node.tls_ca
         pacs.destination("by_name", **tls, tls_server_name="pacs.test",
                          tls_ca=str(pki / "ca.crt")),
         pacs.destination("wrong_ca", **tls, tls_ca=str(pki / "other-ca.crt")),
         pacs.destination("wrong_name", **tls, tls_server_name="other.test"),
         pacs.destination("unverified", **tls, tls_verify=False)],
        node={"tls_cert": str(pki / "box.crt"), "tls_key": str(pki / "box.key"),
              "tls_ca": str(pki / "ca.crt")})
    queued = {name: queue_results(outbox, name, 1, seed=40 + i)
              for i, name in enumerate(("by_ip", "by_name", "wrong_ca", "wrong_name", "unverified"))}
    caplog.set_level(logging.INFO, logger="edge.outbox")
    outbox.start()
    try:
        for name in ("by_ip", "by_name", "unverified"):
            wait_until(lambda: states(journal, name) == {"sent": 1}, 30, what=f"{name} delivered")
        for name in ("wrong_ca", "wrong_name"):
            wait_until(lambda: states(journal, name) == {"retrying": 1}, 30, what=f"{name} refused")
        queue_results(outbox, "unverified", 1, seed=50)    # a second send, after the start
        outbox.wake()
        wait_until(lambda: states(journal, "unverified") == {"sent": 2}, 30, what="second send")
        errors = {name: journal.deliveries_for(queued[name])[0].last_error
                  for name in ("wrong_ca", "wrong_name")}
    finally:
        outbox.stop()
        journal.close()
    assert "TLS handshake" in errors["wrong_ca"] and "certificate" in errors["wrong_ca"], errors
    assert "not accepted" in errors["wrong_ca"] and "mismatch" not in errors["wrong_ca"], errors
    assert "mismatch" in errors["wrong_name"] and "other.test" in errors["wrong_name"], errors
    unverified = [r for r in caplog.records
                  if r.levelno == logging.WARNING and "NOT verified" in r.getMessage()]
    assert len(unverified) == 1 and "unverified" in unverified[0].getMessage()
    assert len(pacs.stored()) == 4


def test_outbox_refuses_to_build_an_unverified_context_by_accident():
    from dicom_node.scu import make_client_ssl_context
    with pytest.raises(ValueError, match="ca"):
        make_client_ssl_context(ca=None)        # would have trusted every public CA
    ctx = make_client_ssl_context(verify=False)
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname
