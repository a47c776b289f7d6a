"""A tiny DNS server for the attacks (run as root, outside every target cgroup): answers
every A question with an address made from the name (198.51.100.x, x from a hash of the
name), after an optional delay (an upstream resolver recursing)."""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
import time


def address_for(name: bytes) -> str:
    digest = hashlib.sha256(name.lower()).digest()
    return f"198.51.{100 + digest[0] % 2}.{1 + digest[1] % 250}"


def question_end(packet: bytes) -> int:
    at = 12
    while packet[at]:
        at += 1 + packet[at]
    return at + 5


class Resolver:
    def __init__(self, address: str, delay: float = 0.0, records: int = 1) -> None:
        self.address, self.delay, self.records = address, delay, records
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.sock.bind((address, 53))
        self.answered = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                packet, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            if len(packet) < 17 or packet[2] & 0x80:
                continue
            try:
                end = question_end(packet)
            except IndexError:
                continue
            name = packet[12 : end - 4]
            if self.delay:
                threading.Timer(self.delay, self._reply, (packet, end, name, peer)).start()
            else:
                self._reply(packet, end, name, peer)

    def _reply(self, packet: bytes, end: int, name: bytes, peer) -> None:
        out = packet[:2] + struct.pack("!HHHHH", 0x8180, 1, self.records, 0, 0) + packet[12:end]
        base = address_for(name)
        for i in range(self.records):
            parts = base.split(".")
            parts[3] = str((int(parts[3]) + i) % 250 + 1)
            out += struct.pack("!HHHIH", 0xC00C, 1, 1, 300, 4) + socket.inet_aton(".".join(parts))
        try:
            self.sock.sendto(out, peer)
            self.answered += 1
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
