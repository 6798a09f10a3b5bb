"""DICOM TLS on the listener: dcmtk's TLS clients with a certificate of the site's CA are served; a
plain client on the TLS port, and a TLS client without a client certificate when a CA is configured,
are refused in the handshake (one log line, counted); a silent TLS client is cut at the deadline.

The test CA, node and client certificates are made in the test with the openssl command line tool.
"""

from __future__ import annotations

import os
import re
import ssl
import subprocess
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import func, select
from test_attack_assoc_pdu import refusals_metric
from test_listener import write_series

from node.db.database import Database
from node.db.schema import Instance
from node.ops.health import check_listener
from node.settings import load_settings
from support.hostile import closed_within, connect
from support.listener import ListenerProcess

pytestmark = [pytest.mark.integration]

DEADLINE = 3.0


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_pki(folder: Path) -> dict[str, Path]:
    """A test CA, a node certificate (localhost, 127.0.0.1) and a client certificate, both signed by it."""
    folder.mkdir(parents=True, exist_ok=True)
    p = {n: folder / n for n in ("ca.key", "ca.crt", "node.key", "node.crt", "pacs.key", "pacs.crt")}
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=msknode test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", str(p["ca.key"]), "-out", str(p["ca.crt"]),
    )  # fmt: skip
    for name, ext in (
        ("node", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"),
        ("pacs", "extendedKeyUsage=clientAuth\n"),
    ):
        csr, extfile = folder / f"{name}.csr", folder / f"{name}.ext"
        extfile.write_text(ext)
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", str(p[f"{name}.key"]), "-out", str(csr),
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(p["ca.crt"]), "-CAkey", str(p["ca.key"]),
            "-CAcreateserial", "-days", "2", "-extfile", str(extfile), "-out", str(p[f"{name}.crt"]),
        )  # fmt: skip
    return p


def tls_echo(port: int, pki: dict[str, Path]) -> bool:
    """C-ECHO over TLS with pynetdicom and the client certificate."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca.crt"]))
    context.load_cert_chain(str(pki["pacs.crt"]), str(pki["pacs.key"]))
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="MSKNODE", tls_args=(context, "localhost"))
    if not assoc.is_established:
        return False
    try:
        return int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()


def dcmtk(tool: str, port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool, "-aet", "PACS", "-aec", "MSKNODE", *args, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        env=dict(os.environ, TCP_NODELAY="1"),
        timeout=60,
    )


def test_dicom_tls_with_client_certificates(tmp_path):
    pki = make_pki(tmp_path / "pki")
    node = ListenerProcess(
        tmp_path / "data",
        env={
            "MSKNODE_LISTENER_TLS_CERT_FILE": str(pki["node.crt"]),
            "MSKNODE_LISTENER_TLS_KEY_FILE": str(pki["node.key"]),
            "MSKNODE_LISTENER_TLS_CA_FILE": str(pki["ca.crt"]),
            "MSKNODE_ASSOCIATION_REQUEST_TIMEOUT": str(DEADLINE),
        },
    ).start(ready=lambda port: tls_echo(port, pki))
    try:
        tls = ["+tls", str(pki["pacs.key"]), str(pki["pacs.crt"]), "+cf", str(pki["ca.crt"])]
        r = dcmtk("echoscu", node.port, *tls)
        assert r.returncode == 0, r.stdout + r.stderr

        _, _, paths = write_series(tmp_path / "series", n=3)
        r = subprocess.run(
            ["storescu", "-aet", "PACS", "-aec", "MSKNODE", *tls, "127.0.0.1", str(node.port), *map(str, paths)],
            capture_output=True,
            text=True,
            env=dict(os.environ, TCP_NODELAY="1"),
            timeout=120,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        db = Database(f"sqlite:///{node.data_dir / 'msknode.db'}", migrate=False)
        with db.session() as s:
            assert s.scalar(select(func.count()).select_from(Instance)) == 3
        db.dispose()

        plain = dcmtk("echoscu", node.port)  # a plain client on the TLS port
        assert plain.returncode != 0
        anonymous = dcmtk("echoscu", node.port, "+tla", "+cf", str(pki["ca.crt"]))  # TLS, no client certificate
        assert anonymous.returncode != 0

        silent = connect(node.port)  # connects and never starts the handshake
        waited = closed_within(silent, DEADLINE + 5)
        silent.close()
        assert waited is not None and waited < DEADLINE + 1.5, waited

        assert tls_echo(node.port, pki)  # still serving
        # msknode health's listener check speaks TLS too (presenting the node's certificate)
        settings = load_settings(
            data_dir=node.data_dir,
            port=node.port,
            listener_tls_cert_file=pki["node.crt"],
            listener_tls_key_file=pki["node.key"],
            listener_tls_ca_file=pki["ca.crt"],
        )
        health = check_listener(settings)
        assert health["ok"], health
        log = node.log_path.read_text(errors="replace")
        handshakes = re.findall(
            r"connection from 127\.0\.0\.1:\d+ refused \(tls_handshake\): TLS handshake failed", log
        )
        assert len(handshakes) == 2, log  # the plain client and the one without a certificate
        assert re.search(r"refused \(request_deadline\): no TLS handshake within the deadline", log)
        assert "Traceback" not in log
        counts = refusals_metric(node)
        assert counts.get("tls_handshake") == 2 and counts.get("request_deadline") == 1, counts
    finally:
        assert node.stop() == 0


def test_tls_settings_that_cannot_be_loaded_stop_the_listener_with_a_message(tmp_path):
    missing = tmp_path / "missing.crt"
    node = ListenerProcess(
        tmp_path / "data",
        env={"MSKNODE_LISTENER_PROCESSES": "1", "MSKNODE_LISTENER_TLS_CERT_FILE": str(missing)},
    )
    with pytest.raises(RuntimeError, match="cannot load the listener's TLS certificate"):
        node.start(timeout=30)
