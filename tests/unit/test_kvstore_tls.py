"""Client TLS settings for the kvstore and the addresses the datapath guards."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from villi.agent.guard import kvstore_endpoints
from villi.kvstore.tls import ENV_CA, ENV_CERT, ENV_KEY, KvstoreTLS, make_pki


def test_make_pki_gives_a_working_client_context(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", ["172.30.0.1"])
    ctx = pki.client.context()
    assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_REQUIRED
    assert (tmp_path / "pki" / "client.key").stat().st_mode & 0o777 == 0o600
    from cryptography import x509

    server = x509.load_pem_x509_certificate(Path(pki.server_cert).read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "172.30.0.1" in {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}


def test_env_round_trip_and_flags(tmp_path: Path) -> None:
    tls = KvstoreTLS("ca.pem", "c.pem", "k.pem")
    assert KvstoreTLS.from_env(tls.as_env()) == tls
    assert tls.as_flags() == ["--kvstore-ca", "ca.pem", "--kvstore-cert", "c.pem",
                              "--kvstore-key", "k.pem"]
    assert KvstoreTLS.from_env({}) is None
    assert set(tls.as_env()) == {ENV_CA, ENV_CERT, ENV_KEY}


def test_bad_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="missing.pem"):
        KvstoreTLS(ca=str(tmp_path / "missing.pem")).context()
    with pytest.raises(ValueError, match="both"):
        KvstoreTLS(cert="c.pem").context()


def test_guarded_kvstore_endpoints() -> None:
    assert kvstore_endpoints("https://172.30.0.1:2379,http://10.0.0.2:4001") == [
        ("172.30.0.1", 2379), ("10.0.0.2", 4001)]
    assert kvstore_endpoints("embedded:///var/lib/villi/kv.db") == []
    assert kvstore_endpoints("unix:///run/etcd.sock") == []
    assert kvstore_endpoints("http://127.0.0.1") == [("127.0.0.1", 2379)]
