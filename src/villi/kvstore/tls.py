"""TLS with client certificates between villi's components and etcd.

Why: etcd holds the whole security state (identities, ipcache, policies). Anyone who
can write to it can give themselves an allowed identity or delete a policy. etcd
started with ``--client-cert-auth --trusted-ca-file`` only talks to clients that
present a certificate signed by that CA; villi's agent, operator and CLI present one.

Where the paths come from, first match wins:

- explicit ``KvstoreTLS(...)`` (``open_store(url, tls=...)``);
- the flags ``--kvstore-ca``, ``--kvstore-cert``, ``--kvstore-key`` of every villi
  command, which ``villi`` turns into the environment variables below so that every
  process it starts inherits them;
- the environment: ``VILLI_KVSTORE_CA``, ``VILLI_KVSTORE_CERT``, ``VILLI_KVSTORE_KEY``
  (``villi lab up`` sets them for its agents and operator; the CLI reads them from the
  lab's state file).

``make_pki`` creates a CA, a server certificate and a client certificate with the
``cryptography`` package (imported only there: the agent and CLI need only ``ssl``).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

ENV_CA, ENV_CERT, ENV_KEY = "VILLI_KVSTORE_CA", "VILLI_KVSTORE_CERT", "VILLI_KVSTORE_KEY"


@dataclass(frozen=True, slots=True)
class KvstoreTLS:
    """Paths of the CA bundle that signs etcd's certificate, and of our client
    certificate and key (PEM). ``ca`` alone verifies etcd without a client cert."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> KvstoreTLS | None:
        env = dict(os.environ) if env is None else env
        tls = cls(env.get(ENV_CA) or None, env.get(ENV_CERT) or None, env.get(ENV_KEY) or None)
        return tls if (tls.ca or tls.cert or tls.key) else None

    @classmethod
    def from_dict(cls, data: dict[str, str] | None) -> KvstoreTLS | None:
        if not data:
            return None
        return cls(data.get("ca"), data.get("cert"), data.get("key"))

    def as_dict(self) -> dict[str, str | None]:
        return {"ca": self.ca, "cert": self.cert, "key": self.key}

    def as_env(self) -> dict[str, str]:
        pairs = ((ENV_CA, self.ca), (ENV_CERT, self.cert), (ENV_KEY, self.key))
        return {name: value for name, value in pairs if value}

    def as_flags(self) -> list[str]:
        out: list[str] = []
        for flag, value in (("--kvstore-ca", self.ca), ("--kvstore-cert", self.cert),
                            ("--kvstore-key", self.key)):
            if value:
                out += [flag, value]
        return out

    def context(self) -> ssl.SSLContext:
        """A client SSL context; raises ValueError naming the file that is wrong."""
        if bool(self.cert) != bool(self.key):
            raise ValueError("kvstore TLS: give both --kvstore-cert and --kvstore-key")
        try:
            ctx = ssl.create_default_context(cafile=self.ca)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"kvstore TLS: cannot read CA file {self.ca}: {exc}") from None
        if self.cert and self.key:
            try:
                ctx.load_cert_chain(self.cert, self.key)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"kvstore TLS: cannot load client certificate {self.cert} "
                                 f"/ key {self.key}: {exc}") from None
        return ctx


def export_flags(ca: str | None, cert: str | None, key: str | None) -> None:
    """Command-line flags → environment, so this process and its children use them."""
    for name, value in ((ENV_CA, ca), (ENV_CERT, cert), (ENV_KEY, key)):
        if value:
            os.environ[name] = str(Path(value).resolve())


@dataclass(frozen=True, slots=True)
class Pki:
    """What :func:`make_pki` wrote: etcd's side and the clients' side."""

    ca: str
    server_cert: str
    server_key: str
    client: KvstoreTLS


def make_pki(directory: Path, hosts: list[str], *, days: int = 365) -> Pki:
    """A CA, a server certificate for ``hosts`` (IPs or names) and one client
    certificate, as PEM files in ``directory`` (keys mode 0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "villi"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        data = key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (x509.CertificateBuilder().subject_name(name("villi kvstore CA"))
               .issuer_name(name("villi kvstore CA")).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=True, content_commitment=False, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=True,
                   crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))

    def issue(cn: str, usages: list[x509.ObjectIdentifier], sans: list[str]) -> tuple[
            x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn))
                   .issuer_name(ca_cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
        if sans:
            alt: list[x509.GeneralName] = []
            for host in sans:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    alt.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    # etcd's JSON gateway dials etcd's own gRPC port with the server certificate as
    # its client certificate, so the server certificate must allow client auth too.
    server, server_key = issue("etcd", [ExtendedKeyUsageOID.SERVER_AUTH,
                                        ExtendedKeyUsageOID.CLIENT_AUTH],
                               sorted(set(hosts) | {"127.0.0.1", "localhost"}))
    client, client_key = issue("villi", [ExtendedKeyUsageOID.CLIENT_AUTH], [])

    def write_cert(cert: x509.Certificate, path: Path) -> None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    paths = {n: directory / n for n in ("ca.crt", "server.crt", "server.key",
                                        "client.crt", "client.key")}
    write_cert(ca_cert, paths["ca.crt"])
    write_cert(server, paths["server.crt"])
    write_key(server_key, paths["server.key"])
    write_cert(client, paths["client.crt"])
    write_key(client_key, paths["client.key"])
    return Pki(str(paths["ca.crt"]), str(paths["server.crt"]), str(paths["server.key"]),
               KvstoreTLS(str(paths["ca.crt"]), str(paths["client.crt"]),
                          str(paths["client.key"])))
