"""gRPC channels and server ports, in plaintext or TLS as the ``tls`` config section says.

The env server <-> policy server streams carry observations and actions; on a shared cluster network
they can be encrypted and the policy server authenticated (``tls.enabled``), with PEM files mounted
from a Secret. Both sides also agree on the largest message they accept (``policy_server.max_message_bytes``).
"""

from __future__ import annotations

from pathlib import Path

import grpc

from gsrl.config import TLSConfig


def message_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)]


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"tls.{what}: cannot read {path}: {exc}") from exc


def server_credentials(tls: TLSConfig) -> grpc.ServerCredentials:
    if not tls.cert_file or not tls.key_file:
        raise ValueError("tls.enabled needs tls.cert_file and tls.key_file on the policy server")
    return grpc.ssl_server_credentials([(_read(tls.key_file, "key_file"), _read(tls.cert_file, "cert_file"))])


def add_port(server: grpc.Server, address: str, tls: TLSConfig | None) -> int:
    """Bind ``address`` (TLS when enabled); returns the port, raising if it could not be bound."""
    if tls is not None and tls.enabled:
        port = server.add_secure_port(address, server_credentials(tls))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot bind a gRPC server to {address}")
    return port


def open_channel(target: str, tls: TLSConfig | None, max_message_bytes: int) -> grpc.Channel:
    """A channel to ``target``; a ``dns:///`` (or ``ipv4:a,b``) target is balanced over all its addresses."""
    options: list[tuple[str, str | int]] = list(message_options(max_message_bytes))
    if target.startswith(("dns:", "ipv4:", "ipv6:")):
        options.append(("grpc.lb_policy_name", "round_robin"))
    if tls is not None and tls.enabled:
        root = _read(tls.ca_file, "ca_file") if tls.ca_file else None
        if tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root), options=options)
    return grpc.insecure_channel(target, options=options)
