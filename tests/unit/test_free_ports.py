"""``free_port_block``: a base port whose next neighbours are free too, for processes that number ports from a base."""

from __future__ import annotations

import socket

from gsrl.redis_server import free_port_block


def test_every_port_of_the_block_can_be_bound_at_once() -> None:
    base = free_port_block(5)
    held = []
    try:
        for offset in range(5):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind(("0.0.0.0", base + offset))  # raises if any port of the block were taken
    finally:
        for sock in held:
            sock.close()


def test_a_taken_port_is_never_inside_the_block() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        for _ in range(20):
            base = free_port_block(4)
            assert not base <= busy < base + 4
