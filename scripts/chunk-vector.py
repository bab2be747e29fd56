#!/usr/bin/env python3
"""The version 3 chunk example of docs/PROTOCOL.md §5.3, recomputed from the
text alone (HKDF-SHA256 and AES-256-GCM from Python's `cryptography`, which is
OpenSSL): a check that the specification, not just our code, gives the bytes
common/src/schedule.rs pins.

    python3 -m venv /tmp/v && /tmp/v/bin/pip install cryptography
    /tmp/v/bin/python scripts/chunk-vector.py
"""
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def label(s: str) -> bytes:  # §2.3: u8 length ‖ bytes
    b = s.encode()
    return bytes([len(b)]) + b


def hkdf(salt, ikm, lab, id_, ctx):  # §4: info = label ‖ id ‖ context
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt or b"\0" * 32,
                info=label(lab) + id_ + ctx).derive(ikm)


def u(n, width):
    return n.to_bytes(width, "big")


root, sid = b"\x11" * 32, b"\x22" * 16
epoch, seq, offset, last, plain = 0, 0, 0, 1, b"hello"
k0 = hkdf(sid, root, "keyferry/v2 session-0", sid, b"")
g0 = hkdf(None, k0, "keyferry/v3 epoch-gcm", sid, u(epoch, 4))
ad = label("keyferry/v3 chunk") + sid + u(epoch, 4) + u(seq, 8) + u(offset, 8) + bytes([last])
sealed = AESGCM(g0).encrypt(u(epoch, 4) + u(seq, 8), plain, ad)  # C ‖ tag
record = u(epoch, 4) + u(seq, 8) + bytes([last]) + u(len(plain), 4) + sealed
expected = "000000000000000000000000010000000566dbc8c8e4dbfb289c7b3411ffe5c6e787658e8887"
print("K_0   ", k0.hex())
print("G_0   ", g0.hex())
print("record", record.hex())
assert record.hex() == expected, "differs from docs/PROTOCOL.md §5.3"
print("matches docs/PROTOCOL.md §5.3")
