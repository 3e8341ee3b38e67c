"""DICOM TLS on the listener, with DCMTK storescu as a TLS client."""
from __future__ import annotations

import subprocess

import pytest

from conftest import make_dx, require_tool


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


def _storescu_tls(srv, f, d, with_client_cert=True):
    args = ["storescu", "-aet", "MODALITY", "-aec", "EDGE_AI"]
    if with_client_cert:
        args += ["+tls", str(d / "modality.key"), str(d / "modality.crt")]
    else:
        args += ["+tla"]
    args += ["+cf", str(d / "ca.crt"), "127.0.0.1", str(srv.port), str(f)]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


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
