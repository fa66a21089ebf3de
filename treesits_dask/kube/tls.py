"""TLS between the driver, the scheduler and the workers: a certificate authority per Dask
cluster, made by the driver with ``cryptography`` when it creates the cluster.

A Dask scheduler runs whatever code a connected client sends it, with the workers' S3
credentials; with TLS only processes that present a certificate of the cluster's own CA can
connect (distributed requires a client certificate on both sides).  The CA signs two certificates,
one for the cluster's pods (scheduler and workers, kept in the Secret ``<cluster>-tls`` that their
pods mount) and one for the driver (kept in the driver's memory only); then its private key is
thrown away, so nobody can issue another certificate for that cluster.  Certificates and keys
never appear in a log, a manifest or a task graph: :class:`ClusterCertificates` hides them from
``repr``.
"""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "TLS_MOUNT",
    "ClusterCertificates",
    "make_certificates",
    "tls_environment",
    "tls_secret",
    "tls_secret_name",
    "tls_volume",
]

#: Where the scheduler and worker pods mount the cluster's TLS Secret.
TLS_MOUNT = "/etc/dask-tls"


@dataclass(frozen=True)
class ClusterCertificates:
    """PEM texts of one cluster's CA certificate, the pods' certificate and key, and the driver's
    certificate and key (the CA's key is not kept)."""

    cluster: str
    ca: str = field(repr=False)
    cert: str = field(repr=False)
    key: str = field(repr=False)
    client_cert: str = field(repr=False)
    client_key: str = field(repr=False)

    def security(self, role: str = "client") -> Any:
        """``distributed.Security`` of the driver (``role="client"``) or of a process of the
        cluster (``"cluster"``: scheduler, worker and their client connections), TLS only."""
        from distributed import Security

        if role == "client":
            cert, key = self.client_cert, self.client_key
            kw = {"tls_client_cert": cert, "tls_client_key": key}
        elif role == "cluster":
            kw = {
                f"tls_{r}_{part}": value
                for r in ("scheduler", "worker", "client")
                for part, value in (("cert", self.cert), ("key", self.key))
            }
        else:
            raise ValueError(f"role {role!r}: use 'client' or 'cluster'")
        return Security(tls_ca_file=self.ca, require_encryption=True, **kw)


def _name(common_name: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "treesits_dask"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def make_certificates(
    cluster: str, namespace: str = "default", days: float = 7.0
) -> ClusterCertificates:
    """A new CA for the Dask cluster ``cluster`` and the two certificates it signs (valid for
    ``days``; a driver's cluster lives at most the Job's deadline)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # clock skew between nodes
    until = now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"{cluster} Dask CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .sign(ca_key, hashes.SHA256())
    )
    service = f"{cluster}-scheduler"
    hosts = [service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
             f"{service}.{namespace}.svc.cluster.local", "localhost"]  # fmt: skip

    def leaf(common_name: str, dns: list[str]) -> tuple[str, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if dns:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(h) for h in dns]), critical=False
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM).decode(), _pem_key(key)

    cert, key = leaf(f"{cluster} Dask scheduler and workers", hosts)
    client_cert, client_key = leaf(f"{cluster} driver", [])
    return ClusterCertificates(
        cluster=cluster,
        ca=ca.public_bytes(serialization.Encoding.PEM).decode(),
        cert=cert,
        key=key,
        client_cert=client_cert,
        client_key=client_key,
    )


def tls_secret_name(cluster: str) -> str:
    return f"{cluster}-tls"


def tls_secret(
    certs: ClusterCertificates, namespace: str, labels: dict[str, str], owner_uid: str | None
) -> dict:
    """The Secret with the pods' certificate, key and the CA certificate.  Owned by the
    DaskCluster (``owner_uid``), so Kubernetes deletes it with the cluster, also when the
    operator deletes an idle cluster of a dead driver."""

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    meta: dict = {"name": tls_secret_name(certs.cluster), "namespace": namespace, "labels": labels}
    if owner_uid:
        meta["ownerReferences"] = [
            {
                "apiVersion": "kubernetes.dask.org/v1",
                "kind": "DaskCluster",
                "name": certs.cluster,
                "uid": owner_uid,
            }
        ]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": meta,
        "data": {"ca.crt": b64(certs.ca), "tls.crt": b64(certs.cert), "tls.key": b64(certs.key)},
    }


def tls_volume(secret_name: str, mount_path: str = TLS_MOUNT) -> tuple[dict, dict]:
    """The (volume, volumeMount) of the TLS Secret: read-only, readable by the pod's group."""
    volume = {"name": "dask-tls", "secret": {"secretName": secret_name, "defaultMode": 0o440}}
    return volume, {"name": "dask-tls", "mountPath": mount_path, "readOnly": True}


def tls_environment(mount_path: str = TLS_MOUNT) -> dict[str, str]:
    """Dask configuration (environment variables) of a scheduler or worker pod: TLS only, with
    the mounted certificate for every role."""
    env = {
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": f"{mount_path}/ca.crt",
    }
    for role in ("SCHEDULER", "WORKER", "CLIENT"):
        env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__CERT"] = f"{mount_path}/tls.crt"
        env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__KEY"] = f"{mount_path}/tls.key"
    return env
