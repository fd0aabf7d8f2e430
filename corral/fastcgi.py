"""FastCGI 1.0 wire protocol, sans-I/O, for both ends of a connection.

`AppConnection` is the application side (what a worker runs); `ServerConnection`
is the web-server side (what the front runs toward a worker).  Both take bytes
with `receive_data()` and return events; every outgoing record is built by a
method that returns bytes.  Nothing here touches a socket or logs: a peer that
breaks the protocol raises `ProtocolError`, and that connection is finished.

Names follow the specification (https://fastcgi-archives.github.io/) so the
code can be read beside it.  Multiplexing is not offered: a connection carries
one request at a time, and a second BEGIN_REQUEST while one is in flight is
answered with CANT_MPX_CONN, as the spec allows; one that reuses the id in
flight is a ProtocolError, since any answer would end the request in flight.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

__all__ = [
    "VERSION",
    "FCGI_KEEP_CONN",
    "MAX_CONTENT",
    "RecordType",
    "Role",
    "ProtocolStatus",
    "ProtocolError",
    "Record",
    "RecordReader",
    "encode_record",
    "encode_stream",
    "encode_pairs",
    "decode_pairs",
    "BeginRequest",
    "Params",
    "Stdin",
    "AbortRequest",
    "Stdout",
    "Stderr",
    "EndRequest",
    "ValuesResult",
    "UnknownType",
    "AppConnection",
    "ServerConnection",
]

VERSION = 1
FCGI_KEEP_CONN = 1
MAX_CONTENT = 0xFFFF  # contentLength is 16 bits
HEADER = struct.Struct("!BBHHBx")  # version, type, requestId, contentLength, paddingLength
BEGIN_BODY = struct.Struct("!HB5x")  # role, flags
END_BODY = struct.Struct("!IB3x")  # appStatus, protocolStatus
UNKNOWN_BODY = struct.Struct("!B7x")  # type
NULL_REQUEST_ID = 0  # management records carry request id 0
# Not in the spec: the GET_VALUES name by which a web server asks whether the
# application holds a second request until the first has ended (see
# AppConnection), and the most it holds.
QUEUE_VALUE = b"CORRAL_QUEUE_REQUESTS"
MAX_HELD = 1 << 20


class RecordType(enum.IntEnum):
    BEGIN_REQUEST = 1
    ABORT_REQUEST = 2
    END_REQUEST = 3
    PARAMS = 4
    STDIN = 5
    STDOUT = 6
    STDERR = 7
    DATA = 8
    GET_VALUES = 9
    GET_VALUES_RESULT = 10
    UNKNOWN_TYPE = 11


class Role(enum.IntEnum):
    RESPONDER = 1
    AUTHORIZER = 2
    FILTER = 3


class ProtocolStatus(enum.IntEnum):
    REQUEST_COMPLETE = 0
    CANT_MPX_CONN = 1
    OVERLOADED = 2
    UNKNOWN_ROLE = 3


class ProtocolError(Exception):
    """The peer sent bytes that are not valid FastCGI; close the connection."""


@dataclass(slots=True)
class Record:
    type: int
    request_id: int
    content: bytes


# ---------------------------------------------------------------------------
# Encoding

def encode_record(rtype: int, request_id: int, content: bytes = b"") -> bytes:
    """One record; content is padded to a multiple of 8 as the spec recommends."""
    length = len(content)
    if length > MAX_CONTENT:
        raise ValueError("record content over 65535 bytes; use encode_stream")
    padding = -length & 7
    return (HEADER.pack(VERSION, rtype, request_id, length, padding)
            + content + b"\0" * padding)


def encode_stream(rtype: int, request_id: int, data: bytes | memoryview) -> bytes:
    """`data` as as many records of a stream type as it needs.

    An empty `data` gives nothing: the empty record that ends a stream is
    written on purpose with encode_record(), never by accident here.
    """
    if len(data) <= MAX_CONTENT:
        return encode_record(rtype, request_id, bytes(data)) if data else b""
    view = memoryview(data)
    step = MAX_CONTENT - 7  # keep each record's content a multiple of 8
    return b"".join(encode_record(rtype, request_id, bytes(view[i:i + step]))
                    for i in range(0, len(view), step))


def _encode_length(n: int) -> bytes:
    # Lengths up to 127 take one byte; longer ones four, top bit set (spec 3.4).
    if n < 0x80:
        return bytes((n,))
    if n > 0x7FFFFFFF:
        raise ValueError("name-value length over 2**31-1")
    return struct.pack("!I", n | 0x80000000)


_SHORT_LENGTHS = struct.Struct("!BB").pack


def encode_pairs(pairs) -> bytes:
    """Name-value pairs (an iterable of (bytes, bytes)) as one byte string."""
    out = []
    append = out.append
    for name, value in pairs:
        n, v = len(name), len(value)
        if n < 0x80 and v < 0x80:  # nearly every CGI param: both lengths in a byte
            append(_SHORT_LENGTHS(n, v))
        else:
            append(_encode_length(n) + _encode_length(v))
        append(name)
        append(value)
    return b"".join(out)


def decode_pairs(data: bytes) -> list[tuple[bytes, bytes]]:
    """The inverse of encode_pairs; every length is checked against the data."""
    pairs = []
    append = pairs.append
    pos, end = 0, len(data)
    while pos < end:
        if pos + 2 <= end and data[pos] < 0x80 and data[pos + 1] < 0x80:
            name_len, value_len = data[pos], data[pos + 1]  # the common, short case
            pos += 2
        else:
            name_len, pos = _decode_length(data, pos, end)
            value_len, pos = _decode_length(data, pos, end)
        if pos + name_len + value_len > end:
            raise ProtocolError("name-value pair longer than its stream")
        name = data[pos:pos + name_len]
        pos += name_len
        append((name, data[pos:pos + value_len]))
        pos += value_len
    return pairs


def _decode_length(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """One name-value length at `pos` (one byte, or four with the top bit
    set), and the position after it."""
    if pos >= end:
        raise ProtocolError("name-value pair truncated in its length")
    if data[pos] < 0x80:
        return data[pos], pos + 1
    if pos + 4 > end:
        raise ProtocolError("name-value pair truncated in its length")
    return struct.unpack_from("!I", data, pos)[0] & 0x7FFFFFFF, pos + 4


# ---------------------------------------------------------------------------
# Decoding records from a byte stream split anywhere

class RecordReader:
    """Cuts a byte stream into records, whatever the read boundaries were."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Record]:
        buf = self._buffer
        if buf:  # the start of a record came before: it goes first
            buf += data
            data = bytes(buf)
            buf.clear()
        elif type(data) is not bytes:
            data = bytes(data)  # so that each record's content is bytes
        # Usually a read holds whole records: they are cut from it as it is,
        # and only an unfinished one's start is kept.
        records = []
        pos, end = 0, len(data)
        while end - pos >= 8:
            version, rtype, request_id, length, padding = HEADER.unpack_from(data, pos)
            if version != VERSION:
                buf += memoryview(data)[pos:]  # ProtocolError ends the connection anyway
                raise ProtocolError(f"unsupported FastCGI version {version}")
            stop = pos + 8 + length
            if stop + padding > end:
                break
            records.append(Record(rtype, request_id, data[pos + 8:stop]))
            pos = stop + padding
        if pos < end:
            buf += memoryview(data)[pos:]
        return records

    @property
    def pending(self) -> int:
        """Bytes held back as the start of an unfinished record."""
        return len(self._buffer)


# ---------------------------------------------------------------------------
# Events

@dataclass(slots=True)
class BeginRequest:
    """A request started; the application side gets Params next."""
    request_id: int
    role: int
    keep_conn: bool


@dataclass(slots=True)
class Params:
    """The complete PARAMS stream of a request, decoded."""
    request_id: int
    params: list[tuple[bytes, bytes]]


@dataclass(slots=True)
class Stdin:
    """Request body bytes; an empty `data` marks the end of the body."""
    request_id: int
    data: bytes


@dataclass(slots=True)
class AbortRequest:
    request_id: int


@dataclass(slots=True)
class Stdout:
    """Response bytes; an empty `data` marks the end of the stream."""
    request_id: int
    data: bytes


@dataclass(slots=True)
class Stderr:
    request_id: int
    data: bytes


@dataclass(slots=True)
class EndRequest:
    request_id: int
    app_status: int
    protocol_status: int


@dataclass(slots=True)
class ValuesResult:
    values: dict[bytes, bytes]


@dataclass(slots=True)
class UnknownType:
    """The peer did not understand a record type we sent."""
    type: int


# ---------------------------------------------------------------------------
# The application side

class AppConnection:
    """One connection as seen by the application (the worker).

    Events come out of receive_data(); answers the protocol requires by
    itself (GET_VALUES_RESULT, UNKNOWN_TYPE, CANT_MPX_CONN, UNKNOWN_ROLE)
    queue up in data_to_send().  Only the RESPONDER role is served.

    With `queue_requests`, once the peer has asked for QUEUE_VALUE in a
    GET_VALUES (so it knows what it asks for), a second request that arrives
    while one is in flight is not refused but held, and its events come out
    of resume() once the first has ended: requests are still served one at
    a time, in the order they came.  Other peers get CANT_MPX_CONN as ever.
    """

    def __init__(self, values: dict[bytes, bytes] | None = None,
                 queue_requests: bool = False) -> None:
        self.values = values if values is not None else {
            b"FCGI_MAX_CONNS": b"1",
            b"FCGI_MAX_REQS": b"1",
            b"FCGI_MPXS_CONNS": b"0",
        }
        self.request_id: int | None = None  # the request in flight, if any
        self.keep_conn = False
        self._reader = RecordReader()
        self._params = bytearray()
        self._params_done = False
        self._stderr_open = False  # stderr() sent data: finish() must end the stream
        self._outgoing = bytearray()
        self._queue_offered = queue_requests
        self._queue_requests = False  # offered, and the peer asked for it
        self._held: list[Record] = []  # records of requests behind the one in flight
        self._held_bytes = 0

    def data_to_send(self) -> bytes:
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def receive_data(self, data: bytes) -> list:
        events = []
        for record in self._reader.feed(data):
            self._handle(record, events)
        return events

    @property
    def pending(self) -> int:
        """Bytes received that do not make a whole record yet."""
        return self._reader.pending

    def resume(self) -> list:
        """The events of the requests held while another was in flight (see
        queue_requests); call it after finish()."""
        events = []
        held, self._held, self._held_bytes = self._held, [], 0
        for record in held:
            self._handle(record, events)
        return events

    def _handle(self, record: Record, events: list) -> None:
        rtype, rid, content = record.type, record.request_id, record.content
        if rid == NULL_REQUEST_ID:
            self._handle_management(rtype, content)
            return
        if (self._queue_requests and self.request_id is not None
                and rid != self.request_id):
            self._held_bytes += len(content)
            if self._held_bytes > MAX_HELD:
                raise ProtocolError("more than 1 MiB of requests queued behind the one "
                                    "in flight")
            self._held.append(record)
            return
        if rtype == RecordType.BEGIN_REQUEST:
            if len(content) < BEGIN_BODY.size:
                raise ProtocolError("BEGIN_REQUEST body too short")
            role, flags = BEGIN_BODY.unpack_from(content)
            if rid == self.request_id:
                # Spec 3.3: an id stays active until we send its END_REQUEST.
                # Refusing this one with CANT_MPX_CONN would end the request
                # in flight in the server's eyes, so the peer is lost: stop.
                raise ProtocolError(f"BEGIN_REQUEST for request {rid}, already active")
            if self.request_id is not None:
                # Spec 5.1: a non-multiplexing application refuses the
                # second request and carries on with the first.
                self._outgoing += self.end_request(rid, 0, ProtocolStatus.CANT_MPX_CONN)
                return
            if role != Role.RESPONDER:
                self._outgoing += self.end_request(rid, 0, ProtocolStatus.UNKNOWN_ROLE)
                return
            self.request_id = rid
            self.keep_conn = bool(flags & FCGI_KEEP_CONN)
            self._stderr_open = False
            self._params.clear()
            self._params_done = False
            events.append(BeginRequest(rid, role, self.keep_conn))
            return
        if rid != self.request_id:
            # Spec 3.3: records for a request id that is not active are ignored.
            return
        if rtype == RecordType.PARAMS:
            if self._params_done:
                raise ProtocolError("PARAMS after the end of the PARAMS stream")
            if content:
                # A pair may straddle records: decode only the whole stream.
                self._params += content
            else:
                self._params_done = True
                events.append(Params(rid, decode_pairs(bytes(self._params))))
                self._params.clear()
        elif rtype == RecordType.STDIN:
            events.append(Stdin(rid, content))
        elif rtype == RecordType.ABORT_REQUEST:
            events.append(AbortRequest(rid))
        elif rtype == RecordType.DATA:
            pass  # only the FILTER role has a DATA stream; we never accept it
        else:
            self._outgoing += encode_record(
                RecordType.UNKNOWN_TYPE, NULL_REQUEST_ID, UNKNOWN_BODY.pack(rtype))

    def _handle_management(self, rtype: int, content: bytes) -> None:
        if rtype == RecordType.GET_VALUES:
            asked = decode_pairs(content)
            if self._queue_offered and any(name == QUEUE_VALUE for name, _ in asked):
                self._queue_requests = True
            known = [(name, self.values[name]) for name, _ in asked
                     if name in self.values]
            self._outgoing += encode_record(
                RecordType.GET_VALUES_RESULT, NULL_REQUEST_ID, encode_pairs(known))
        else:
            self._outgoing += encode_record(
                RecordType.UNKNOWN_TYPE, NULL_REQUEST_ID, UNKNOWN_BODY.pack(rtype))

    # Records the application writes.

    @staticmethod
    def stdout(request_id: int, data: bytes) -> bytes:
        return encode_stream(RecordType.STDOUT, request_id, data)

    def stderr(self, request_id: int, data: bytes) -> bytes:
        # Not a staticmethod like stdout(): a STDERR stream that carried data
        # must be ended too, and only finish() knows when (spec appendix B,
        # example 3); one that never opened is not sent at all (example 1).
        if data:
            self._stderr_open = True
        return encode_stream(RecordType.STDERR, request_id, data)

    @staticmethod
    def end_request(request_id: int, app_status: int = 0,
                    protocol_status: int = ProtocolStatus.REQUEST_COMPLETE) -> bytes:
        return encode_record(RecordType.END_REQUEST, request_id,
                             END_BODY.pack(app_status, protocol_status))

    def finish(self, app_status: int = 0) -> bytes:
        """Close both output streams and end the request in flight."""
        rid = self.request_id
        if rid is None:
            raise RuntimeError("no request in flight")
        self.request_id = None
        out = encode_record(RecordType.STDOUT, rid)
        if self._stderr_open:
            self._stderr_open = False
            out += encode_record(RecordType.STDERR, rid)
        return out + self.end_request(rid, app_status)


# ---------------------------------------------------------------------------
# The web-server side

class ServerConnection:
    """One connection as seen by the web server (the front, toward a worker)."""

    def __init__(self) -> None:
        self._reader = RecordReader()

    @staticmethod
    def begin_request(request_id: int, params, keep_conn: bool = True) -> bytes:
        """BEGIN_REQUEST and the whole PARAMS stream, terminator included."""
        return (encode_record(RecordType.BEGIN_REQUEST, request_id,
                              BEGIN_BODY.pack(Role.RESPONDER,
                                              FCGI_KEEP_CONN if keep_conn else 0))
                + encode_stream(RecordType.PARAMS, request_id, encode_pairs(params))
                + encode_record(RecordType.PARAMS, request_id))

    @staticmethod
    def stdin(request_id: int, data: bytes) -> bytes:
        """Body bytes; pass b"" to end the body."""
        if not data:
            return encode_record(RecordType.STDIN, request_id)
        return encode_stream(RecordType.STDIN, request_id, data)

    @staticmethod
    def abort_request(request_id: int) -> bytes:
        return encode_record(RecordType.ABORT_REQUEST, request_id)

    @staticmethod
    def get_values(names) -> bytes:
        return encode_record(RecordType.GET_VALUES, NULL_REQUEST_ID,
                             encode_pairs((name, b"") for name in names))

    def receive_data(self, data: bytes) -> list:
        events = []
        for rec in self._reader.feed(data):
            rtype = rec.type
            if rtype == RecordType.STDOUT:
                events.append(Stdout(rec.request_id, rec.content))
            elif rtype == RecordType.END_REQUEST:
                if len(rec.content) < END_BODY.size:
                    raise ProtocolError("END_REQUEST body too short")
                app_status, protocol_status = END_BODY.unpack_from(rec.content)
                events.append(EndRequest(rec.request_id, app_status, protocol_status))
            elif rtype == RecordType.STDERR:
                events.append(Stderr(rec.request_id, rec.content))
            elif rtype == RecordType.GET_VALUES_RESULT:
                events.append(ValuesResult(dict(decode_pairs(rec.content))))
            elif rtype == RecordType.UNKNOWN_TYPE:
                if not rec.content:
                    raise ProtocolError("UNKNOWN_TYPE body too short")
                events.append(UnknownType(rec.content[0]))
            else:
                raise ProtocolError(f"unexpected record type {rtype} from application")
        return events
