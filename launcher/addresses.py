"""Bind and advertised addresses of a worker, and the UCX interface its KV transfers use.

A worker binds its gRPC server on `--internal-host` (127.0.0.1 by default: nothing leaves the
machine) and tells its peers an address they can reach: the bind address itself, or for a wildcard
bind (0.0.0.0, ::) the node's address (Ray's node IP under the ray launcher, loopback under the
local one, whose peers all run on this machine).

NIXL's UCX backend opens a TCP listener on every network interface by default (UCX_NET_DEVICES=all),
whatever tandem binds. A worker bound to one address therefore restricts UCX to that address's
interface (`lo` for loopback) unless the user set UCX_NET_DEVICES: measured with `ss -ltnp` on a
CPU worker, UCX then listens on 127.0.0.1 only. Shared-memory and CUDA IPC transports are not
network devices and are unaffected; a wildcard bind leaves UCX's choice alone.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import socket
import struct

logger = logging.getLogger(__name__)

WILDCARD_HOSTS = ("0.0.0.0", "::", "")
LOOPBACK = "127.0.0.1"
SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


def is_wildcard(host: str) -> bool:
    return host in WILDCARD_HOSTS


def advertised_host(bind_host: str, node_ip: str | None = None) -> str:
    """The host peers dial: the bind host, or for a wildcard bind the node's IP (loopback when
    the caller knows none, as on one machine)."""
    if not is_wildcard(bind_host):
        return bind_host
    return node_ip or LOOPBACK


def restrict_ucx_to(bind_host: str, environ: dict[str, str] | None = None) -> str | None:
    """Set UCX_NET_DEVICES to the interface of `bind_host` unless the user set it; returns what
    was set (None: left alone)."""
    environ = os.environ if environ is None else environ
    if "UCX_NET_DEVICES" in environ or is_wildcard(bind_host):
        return None
    interface = interface_of(bind_host)
    if interface is None:
        logger.warning("no network interface holds %s; UCX keeps its default interfaces",
                       bind_host)
        return None
    environ["UCX_NET_DEVICES"] = interface
    return interface


def interface_of(host: str) -> str | None:
    """Name of the local interface that holds the IPv4 address `host` (`lo` for 127.x)."""
    try:
        address = ipaddress.ip_address(socket.gethostbyname(host))
    except (OSError, ValueError):
        return None
    for _, name in socket.if_nameindex():
        if _ipv4_of(name) == address or (address.is_loopback and name == "lo"):
            return name
    return None


def _ipv4_of(interface: str) -> ipaddress.IPv4Address | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR,
                                 struct.pack("256s", interface.encode()[:15]))
        except OSError:  # no IPv4 address on this interface
            return None
    return ipaddress.IPv4Address(packed[20:24])
