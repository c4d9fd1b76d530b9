"""Ports for the suite's own servers: never one that an outgoing connection may take."""

from __future__ import annotations

import socket

from coupon_devtools.harness.processes import LOWEST_SERVER_PORT, _ephemeral_low, free_port


def test_ports_for_servers_come_from_below_the_ephemeral_range_and_never_twice() -> None:
    # Given the kernel's range of source ports for outgoing connections
    low = _ephemeral_low()
    # When the suite asks for ports to start servers on
    ports = [free_port() for _ in range(50)]
    # Then each is below that range (no client connection can hold it between the pick and
    # the server's bind), none is handed out twice, and each can be bound now
    assert all(LOWEST_SERVER_PORT <= port < low for port in ports), ports
    assert len(set(ports)) == len(ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))

