#!/usr/bin/env python3
"""Writes the byte vectors of the conntrack sync wire format, v2.

An encoder independent of the Rust one: each field is laid out by hand
from docs/conntrack-sync-protocol.md, and the tag comes from Python's hmac
module. The output is annotated hex (`#` starts a comment); tests/wire.rs
decodes every file and re-encodes it byte for byte.

Run from this directory: python3 make-vectors.py
"""
import hashlib
import hmac
import ipaddress
import struct

KEY = b"tandem-conntrack-sync-test-key-1"  # 32 bytes

def u8(v): return struct.pack(">B", v)
def u16(v): return struct.pack(">H", v)
def u32(v): return struct.pack(">I", v)
def u64(v): return struct.pack(">Q", v)
def ip(a): return ipaddress.ip_address(a).packed

TYPES = {"data": 1, "ack": 2, "alive": 3, "resync-request": 4, "bulk-begin": 5, "bulk-end": 6}

def tuple_(proto, sport, dport, src, dst):
    return [(u8(proto), f"protocol {proto}"), (u16(sport), f"src port {sport}"),
            (u16(dport), f"dst port {dport}"), (ip(src), f"src {src}"), (ip(dst), f"dst {dst}")]

def v6bits(src, dst, sbit, dbit):
    return (sbit if ":" in src else 0) | (dbit if ":" in dst else 0)

def entry(kind, orig, reply, status, timeout, mark, zone, tcp):
    layout = v6bits(orig[3], orig[4], 1, 2) | v6bits(reply[3], reply[4], 4, 8) | (0x10 if tcp else 0)
    f = [(u8(kind), f"record kind {kind} ({'new' if kind == 1 else 'update'})"),
         (u8(layout), f"layout {layout:#04x}")]
    f += [(b, "original " + c) for b, c in tuple_(*orig)]
    f += [(b, "reply " + c) for b, c in tuple_(*reply)]
    f += [(u32(status), f"status {status:#x}"), (u32(timeout), f"timeout {timeout} s"),
          (u32(mark), f"mark {mark:#x}"), (u16(zone), f"zone {zone}")]
    if tcp:
        f.append((bytes(tcp), "tcp state, wscale orig/reply, flags orig/reply"))
    return f

def destroy(orig):
    layout = v6bits(orig[3], orig[4], 1, 2)
    return [(u8(3), "record kind 3 (destroy)"), (u8(layout), f"layout {layout:#04x}")] + \
           [(b, "original " + c) for b, c in tuple_(*orig)]

def write(name, mtype, epoch, seq, ack, payload_fields, note):
    payload = b"".join(b for b, _ in payload_fields)
    flags = 1 if ack else 0
    aepoch, anext = ack if ack else (0, 0)
    header = [(b"TC", "magic \"TC\""), (u8(2), "version 2"), (u8(TYPES[mtype]), f"type {TYPES[mtype]} ({mtype})"),
              (u8(flags), f"flags {flags:#04x}" + (" (ack)" if ack else "")), (u8(0), "reserved"),
              (u16(len(payload)), f"payload length {len(payload)}"), (u64(epoch), f"sender epoch {epoch:#018x}"),
              (u64(seq), f"sequence {seq}"), (u64(aepoch), f"ack epoch {aepoch:#018x}"),
              (u64(anext), f"ack next {anext}")]
    signed = b"".join(b for b, _ in header) + payload
    tag = hmac.new(KEY, signed, hashlib.sha256).digest()[:16]
    with open(name, "w") as f:
        f.write(f"# {note}\n# key: {KEY.decode()!r}; tag = HMAC-SHA256(key, header || payload)[:16]\n")
        for b, c in header + payload_fields + [(tag, "tag")]:
            f.write(f"{b.hex(' '):<50} # {c}\n")

A, B = 0x1111222233334444, 0xAAAABBBBCCCCDDDD
# DNAT 192.0.2.10:80 -> backend 10.1.0.5:8080, SNAT to floating 10.1.0.100:40000.
nat = entry(1, (6, 51000, 80, "198.51.100.7", "192.0.2.10"),
            (6, 8080, 40000, "10.1.0.5", "10.1.0.100"),
            0x1BE, 432000, 0x2A, 0, [3, 7, 7, 0x08, 0x08])
udp = entry(2, (17, 5353, 53, "198.51.100.8", "192.0.2.11"),
            (17, 53, 5353, "10.1.0.6", "198.51.100.8"), 0x1AE, 30, 0, 0, None)
gone = destroy((6, 51001, 80, "198.51.100.7", "192.0.2.10"))
write("data-ipv4.hex", "data", A, 7, (B, 3), [(u16(3), "record count 3")] + nat + udp + gone,
      "Data, seq 7, acking the peer up to 3: New (IPv4 TCP, DNAT+SNAT, be-liberal), Update (UDP), Destroy")
v6 = entry(1, (6, 443, 8443, "2001:db8::7", "2001:db8:1::10"),
           (6, 8443, 443, "2001:db8:2::5", "2001:db8::7"), 0x1AE, 120, 1, 3, [3, 9, 10, 0x0A, 0x08])
gone6 = destroy((17, 9999, 53, "2001:db8::8", "2001:db8:1::11"))
write("data-ipv6.hex", "data", A, 8, None, [(u16(2), "record count 2")] + v6 + gone6,
      "Data, seq 8, no ack yet: New (IPv6 TCP), Destroy (IPv6 UDP)")
write("ack.hex", "ack", B, 4, (A, 5),
      [(u16(2), "2 missing ranges"), (u64(5), "missing from 5"), (u32(2), "2 of them (5, 6)"),
       (u64(10), "missing from 10"), (u32(1), "1 of them (10)")],
      "Ack from B: everything below 5 received, 5-6 and 10 missing (7, 8, 9 held)")
write("alive.hex", "alive", A, 9, None, [], "Alive from a node that has not heard its peer; its next sequence is 9")
write("challenge.hex", "alive", B, 4, (A, 0), [],
      "Alive from B echoing A's epoch with ack next 0: a challenge, B heard A's epoch but joined nothing yet")
write("resync-request.hex", "resync-request", B, 4, (A, 9), [(u32(3), "request id 3")],
      "Resync request 3 from B")
write("bulk-begin.hex", "bulk-begin", A, 9, (B, 4), [(u8(1), "flags 0x01 (complete: the whole table)")],
      "Bulk resync begins at seq 9: the sender's whole table")
write("bulk-end.hex", "bulk-end", A, 12, (B, 4), [(u32(42), "42 records in the bulk")], "Bulk resync ends at seq 12")
