"""Which addresses the collector may connect to: the SSRF guard, checked on every connection.

Pages name URLs and servers redirect wherever they like, so a page of a public shop (or one
of its redirects) could point the collector at 169.254.169.254 (a cloud's credentials),
127.0.0.1 (services on this machine) or an intranet host. Every host is therefore resolved
and each of its addresses checked before a socket is opened: loopback, private, link-local,
multicast, reserved, unspecified and other non-public addresses are refused, unless the user
allowed them, explicitly (`politeness.allowed_networks`, `allow_private_networks`) or by
pointing the crawl there (a start URL's own addresses, for a shop on 127.0.0.1 or the
intranet: those addresses only, not their networks).

The check runs inside the connection (an httpcore network backend) and connects to the very
address it checked, so a DNS answer that changes between check and connect (rebinding) gets
nowhere, and every redirect hop is covered without a second code path. `refusal()` is the
rule itself, a pure function of the addresses.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpcore

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AddressRefused(Exception):
    """A host resolved to an address the collector must not reach; nothing was sent."""

    def __init__(self, host: str, why: str):
        super().__init__(f"{host}: {why}; not connecting (allow it with "
                         "politeness.allowed_networks if this network is meant to be crawled)")
        self.host = host
        self.why = why


def _plain(address: Address) -> Address:
    # ::ffff:127.0.0.1 is 127.0.0.1 on the wire; Python 3.11 does not call it loopback.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def kind_of(address: Address) -> str | None:
    """Why `address` is not a public internet address, or None when it is."""
    address = _plain(address)
    for kind, flag in (("loopback", address.is_loopback), ("link-local", address.is_link_local),
                       ("multicast", address.is_multicast),
                       ("unspecified", address.is_unspecified),
                       ("reserved", address.is_reserved), ("private", address.is_private)):
        if flag:
            return kind
    return None if address.is_global else "not public"


def refusal(addresses: Iterable[Address], allowed: Sequence[Network] = ()) -> str | None:
    """The reason to refuse a host with these addresses, or None to connect.

    One refused address refuses the host: a resolver that mixes a public and a private
    answer must not get to pick which one is used.
    """
    for address in addresses:
        address = _plain(address)
        if any(address.version == net.version and address in net for net in allowed):
            continue
        kind = kind_of(address)
        if kind:
            return f"{address} is a {kind} address"
    return None


def resolve(host: str, port: int) -> list[Address]:
    """Every address `host` resolves to (an IP literal is itself)."""
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0])
                              for info in infos))


@dataclass(frozen=True)
class AddressPolicy:
    allowed: tuple[Network, ...] = ()
    allow_all: bool = False

    @classmethod
    def for_crawl(cls, start_urls: Iterable[str], allowed_networks: Iterable[Network] = (),
                  allow_all: bool = False) -> AddressPolicy:
        """The start URLs' own non-public addresses are allowed (the user chose them), each
        as a single address, plus `allowed_networks`."""
        allowed = list(allowed_networks)
        for netloc in dict.fromkeys(urlsplit(u).netloc for u in start_urls):
            parts = urlsplit(f"//{netloc}")
            if not parts.hostname:
                continue
            try:
                addresses = resolve(parts.hostname, parts.port or 443)
            except OSError:
                continue                     # it will fail, with its reason, when fetched
            allowed += [ipaddress.ip_network(_plain(a)) for a in addresses if kind_of(a)]
        return cls(tuple(dict.fromkeys(allowed)), allow_all)

    def addresses(self, host: str, port: int) -> list[Address]:
        """The addresses to connect to, or AddressRefused (before any packet is sent)."""
        try:
            addresses = resolve(host, port)
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
        if not self.allow_all:
            why = refusal(addresses, self.allowed)
            if why:
                raise AddressRefused(host, why)
        return addresses


# Linux delays the ACK of a server's first reply segments up to 40 ms; a server that writes
# headers and body separately without TCP_NODELAY (Python's http.server, the demo shop) then
# holds the body's tail until that ACK (Nagle), so every keep-alive request waited ~44 ms on
# 127.0.0.1 (0.7 ms on a fresh connection), which capped 16 connections at ~360 requests/s.
# TCP_QUICKACK after each request is sent asks for immediate ACKs: 44 -> 0.5 ms a request.
# It does not stick (the kernel falls back to delayed ACKs), hence once per write.
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class _QuickAckStream(httpcore.NetworkStream):
    """A connection's stream that asks the kernel to ACK the answer at once (see above)."""

    def __init__(self, stream: httpcore.NetworkStream):
        self._stream = stream
        self._socket = stream.get_extra_info("socket")

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, timeout)
        if self._socket is not None:
            try:
                self._socket.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                self._socket = None          # not a TCP socket after all: never mind

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _QuickAckStream(self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


class GuardedBackend(httpcore.SyncBackend):
    """httpcore's socket backend, connecting only to addresses the policy allows."""

    def __init__(self, policy: AddressPolicy):
        self.policy = policy

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable | None = None) -> httpcore.NetworkStream:
        error: Exception | None = None
        for address in self.policy.addresses(host, port):
            try:
                # An IP literal: no second lookup, so the address checked is the one used.
                # TLS still names `host` (SNI, certificate), which httpcore passes itself.
                stream = super().connect_tcp(str(address), port, timeout, local_address,
                                             socket_options)
            except httpcore.ConnectError as exc:
                error = exc
                continue
            return _QuickAckStream(stream) if _QUICKACK is not None else stream
        raise error or httpcore.ConnectError(f"{host}: no address")
