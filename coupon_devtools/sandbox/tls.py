"""HTTPS for the sandbox: a certificate authority made for one run, and the server's context.

Capillary is reached over HTTPS, and some failures exist only there (a TLS stream broken once
the request was written is not a refused handshake). The CA's certificate goes to a file that a
client trusts through ``REQUESTS_CA_BUNDLE``; nothing is installed on the machine.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

CA_FILE_NAME: Final = "sandbox-ca.pem"


@dataclass(frozen=True)
class SandboxTls:
    """The server side's TLS context and the CA certificate file clients should trust."""

    context: ssl.SSLContext
    ca_file: Path


def make_tls(directory: Path, hosts: Sequence[str]) -> SandboxTls:
    """A new CA and a certificate for ``hosts``; the CA's certificate is written to
    ``directory/sandbox-ca.pem``."""
    import trustme

    ca = trustme.CA(organization_name="coupon-worker sandbox")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*hosts).configure_cert(context)
    directory.mkdir(parents=True, exist_ok=True)
    ca_file = directory / CA_FILE_NAME
    ca.cert_pem.write_to_path(str(ca_file))
    return SandboxTls(context, ca_file)
