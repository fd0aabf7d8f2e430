"""Byte-level tests of the sans-I/O FastCGI codec against records written by hand."""

from __future__ import annotations

import random
import struct

import pytest

from corral import fastcgi
from corral.fastcgi import (
    AbortRequest,
    AppConnection,
    BeginRequest,
    EndRequest,
    Params,
    ProtocolError,
    RecordReader,
    ServerConnection,
    Stderr,
    Stdin,
    Stdout,
    UnknownType,
    ValuesResult,
    decode_pairs,
    encode_pairs,
    encode_record,
    encode_stream,
)

# ---------------------------------------------------------------------------
# FastCGI 1.0 written out by hand, with the numbers of the spec (section 8),
# so that no test passes only because the encoder and decoder agree.

BEGIN_REQUEST, ABORT_REQUEST, END_REQUEST, PARAMS = 1, 2, 3, 4
STDIN, STDOUT, STDERR, DATA = 5, 6, 7, 8
GET_VALUES, GET_VALUES_RESULT, UNKNOWN_TYPE = 9, 10, 11
RESPONDER, AUTHORIZER, FILTER = 1, 2, 3
REQUEST_COMPLETE, CANT_MPX_CONN, OVERLOADED, UNKNOWN_ROLE = 0, 1, 2, 3
KEEP_CONN = 1


def rec(rtype: int, rid: int, content: bytes = b"", padding: int | None = None,
        version: int = 1, pad_byte: bytes = b"\0") -> bytes:
    """One record: the 8-byte header field by field, content, then padding."""
    if padding is None:
        padding = -len(content) % 8
    header = struct.pack(">BBHHBB", version, rtype, rid, len(content), padding, 0)
    return header + content + pad_byte * padding


def begin_body(role: int = RESPONDER, flags: int = 0) -> bytes:
    return role.to_bytes(2, "big") + bytes([flags]) + bytes(5)


def end_body(app_status: int, protocol_status: int) -> bytes:
    return app_status.to_bytes(4, "big") + bytes([protocol_status]) + bytes(3)


def length(n: int) -> bytes:
    return bytes([n]) if n < 128 else (n | 0x80000000).to_bytes(4, "big")


def pair(name: bytes, value: bytes) -> bytes:
    return length(len(name)) + length(len(value)) + name + value


def parse(data: bytes) -> list[tuple[int, int, bytes]]:
    """Records as (type, request id, content), every header field checked."""
    records, pos = [], 0
    while pos < len(data):
        version, rtype, rid, clen, plen, reserved = struct.unpack_from(">BBHHBB", data, pos)
        assert (version, reserved) == (1, 0)
        assert (clen + plen) % 8 == 0, "we pad every record to 8"
        assert data[pos + 8 + clen:pos + 8 + clen + plen] == bytes(plen)
        records.append((rtype, rid, data[pos + 8:pos + 8 + clen]))
        pos += 8 + clen + plen
    assert pos == len(data)
    return records


def feed(conn, data: bytes, cuts=()) -> list:
    """Events from `data` handed to conn.receive_data in pieces cut at `cuts`."""
    events, start = [], 0
    for cut in [*cuts, len(data)]:
        events += conn.receive_data(data[start:cut])
        start = cut
    return events


def run_app(data: bytes, cuts=()) -> tuple[list, bytes]:
    """(events, answer bytes) of a fresh AppConnection fed `data`."""
    conn = AppConnection()
    events = feed(conn, data, cuts)
    return events, conn.data_to_send()


def run_server(data: bytes, cuts=()) -> list:
    return feed(ServerConnection(), data, cuts)


def cut_sets(size: int, seed: int = 0, every: bool = True, randoms: int = 30):
    """Ways to cut `size` bytes into reads: whole, byte by byte, at each
    single position (if `every`), and at sets of random positions."""
    yield ()
    yield range(1, size)
    if every:
        for i in range(1, size):
            yield (i,)
    rng = random.Random(seed)
    for _ in range(randoms):
        k = rng.randint(1, min(size - 1, 12))
        yield sorted(rng.sample(range(1, size), k))


def same_every_way(run, data: bytes, every: bool = True):
    """run(data) whatever the read boundaries; asserts they all agree."""
    expected = run(data)
    for cuts in cut_sets(len(data), every=every):
        assert run(data, cuts) == expected, f"differs when cut at {list(cuts)[:20]}"
    return expected


# The spec's appendix B sends these two pairs; the "..." it elides is left out.
SPEC_PARAMS = b"\013\002SERVER_PORT80\013\016SERVER_ADDR199.170.183.42"
SPEC_PAIRS = [(b"SERVER_PORT", b"80"), (b"SERVER_ADDR", b"199.170.183.42")]
PAGE = b"Content-type: text/html\r\n\r\n<html>\n<head> ... "


def begun(rid: int = 1, flags: int = 0) -> AppConnection:
    """An AppConnection with request `rid` in flight and its PARAMS read."""
    conn = AppConnection()
    feed(conn, rec(BEGIN_REQUEST, rid, begin_body(RESPONDER, flags))
         + rec(PARAMS, rid, SPEC_PARAMS) + rec(PARAMS, rid))
    return conn


# ---------------------------------------------------------------------------
# Constants and records

def test_constants_match_the_spec():
    assert fastcgi.VERSION == 1
    assert fastcgi.FCGI_KEEP_CONN == KEEP_CONN
    assert fastcgi.MAX_CONTENT == 65535
    assert [(t.name, t.value) for t in fastcgi.RecordType] == [
        ("BEGIN_REQUEST", 1), ("ABORT_REQUEST", 2), ("END_REQUEST", 3), ("PARAMS", 4),
        ("STDIN", 5), ("STDOUT", 6), ("STDERR", 7), ("DATA", 8), ("GET_VALUES", 9),
        ("GET_VALUES_RESULT", 10), ("UNKNOWN_TYPE", 11)]
    assert [r.value for r in fastcgi.Role] == [RESPONDER, AUTHORIZER, FILTER]
    assert [s.value for s in fastcgi.ProtocolStatus] == [
        REQUEST_COMPLETE, CANT_MPX_CONN, OVERLOADED, UNKNOWN_ROLE]


def test_record_header_layout():
    assert encode_record(STDOUT, 0x0102, b"hello") == (
        b"\x01\x06\x01\x02\x00\x05\x03\x00" b"hello" b"\x00\x00\x00")


@pytest.mark.parametrize("n", range(18))
def test_content_is_padded_to_8(n):
    data = encode_record(STDOUT, 1, b"x" * n)
    assert data == rec(STDOUT, 1, b"x" * n)
    assert len(data) % 8 == 0
    assert data[6] == -n % 8


def test_peer_padding_is_skipped():
    # Padding need not round to 8, may be up to 255 bytes, and may hold anything.
    data = (rec(BEGIN_REQUEST, 1, begin_body(), padding=3, pad_byte=b"\xff")
            + rec(PARAMS, 1, SPEC_PARAMS, padding=255, pad_byte=b"\x01")
            + rec(PARAMS, 1, padding=1, pad_byte=b"\x80")
            + rec(STDIN, 1, b"body", padding=0)
            + rec(STDIN, 1, padding=7, pad_byte=b"\x01"))
    events, sent = same_every_way(run_app, data, every=False)
    assert events == [BeginRequest(1, RESPONDER, False), Params(1, SPEC_PAIRS),
                      Stdin(1, b"body"), Stdin(1, b"")]
    assert sent == b""
    reply = rec(STDOUT, 1, b"hi", padding=200, pad_byte=b"\x01") + rec(STDOUT, 1, padding=0)
    assert run_server(reply) == [Stdout(1, b"hi"), Stdout(1, b"")]


def test_record_waits_for_its_padding():
    reader = RecordReader()
    data = rec(STDIN, 1, b"abc", padding=5)
    assert reader.feed(data[:-1]) == []
    assert reader.pending == len(data) - 1
    assert [(r.type, r.request_id, r.content) for r in reader.feed(data[-1:])] == [
        (STDIN, 1, b"abc")]
    assert reader.pending == 0


# ---------------------------------------------------------------------------
# Records the web server writes (ServerConnection) and the app reads

@pytest.mark.parametrize("keep_conn, flags", [(False, 0), (True, KEEP_CONN)])
def test_begin_request_bytes(keep_conn, flags):
    assert ServerConnection.begin_request(7, SPEC_PAIRS, keep_conn) == (
        rec(BEGIN_REQUEST, 7, begin_body(RESPONDER, flags))
        + rec(PARAMS, 7, SPEC_PARAMS) + rec(PARAMS, 7))


def test_begin_request_without_params_has_only_the_terminator():
    assert ServerConnection.begin_request(1, [], False) == (
        rec(BEGIN_REQUEST, 1, begin_body()) + rec(PARAMS, 1))


@pytest.mark.parametrize("flags, keep", [(0, False), (1, True), (0xFF, True), (0xFE, False)])
def test_keep_conn_flag(flags, keep):
    conn = AppConnection()
    events = feed(conn, rec(BEGIN_REQUEST, 1, begin_body(RESPONDER, flags)))
    assert events == [BeginRequest(1, RESPONDER, keep)]
    assert conn.keep_conn is keep


def test_params_stream_becomes_one_event_at_its_end():
    conn = AppConnection()
    assert feed(conn, rec(BEGIN_REQUEST, 1, begin_body())) == [
        BeginRequest(1, RESPONDER, False)]
    assert feed(conn, rec(PARAMS, 1, SPEC_PARAMS[:5])) == []
    assert feed(conn, rec(PARAMS, 1, SPEC_PARAMS[5:])) == []
    assert feed(conn, rec(PARAMS, 1)) == [Params(1, SPEC_PAIRS)]


def test_empty_params_stream():
    events, _ = run_app(rec(BEGIN_REQUEST, 1, begin_body()) + rec(PARAMS, 1))
    assert events[1:] == [Params(1, [])]


def test_stdin_bytes_and_events():
    assert ServerConnection.stdin(1, b"abc") == rec(STDIN, 1, b"abc")
    assert ServerConnection.stdin(1, b"") == rec(STDIN, 1)
    conn = begun()
    assert feed(conn, rec(STDIN, 1, b"abc") + rec(STDIN, 1, b"de") + rec(STDIN, 1)) == [
        Stdin(1, b"abc"), Stdin(1, b"de"), Stdin(1, b"")]


def test_abort_request():
    assert ServerConnection.abort_request(3) == rec(ABORT_REQUEST, 3)
    conn = begun(3)
    assert feed(conn, rec(ABORT_REQUEST, 3)) == [AbortRequest(3)]
    assert conn.finish() == rec(STDOUT, 3) + rec(END_REQUEST, 3, end_body(0, REQUEST_COMPLETE))


def test_pending_counts_the_bytes_of_an_unfinished_record():
    # The worker logs a connection closed inside a record, requests or not.
    conn = AppConnection()
    data = rec(GET_VALUES, 0, pair(b"FCGI_MPXS_CONNS", b""))
    assert feed(conn, data[:5]) == [] and conn.pending == 5
    assert feed(conn, data[5:-1]) == [] and conn.pending == len(data) - 1
    feed(conn, data[-1:])
    assert conn.pending == 0 and conn.data_to_send().startswith(b"\x01\x0a")


def test_data_stream_is_ignored_by_a_responder():
    conn = begun()
    assert feed(conn, rec(DATA, 1, b"filter data") + rec(DATA, 1)) == []
    assert conn.data_to_send() == b""


def test_get_values_bytes():
    assert ServerConnection.get_values([b"FCGI_MAX_CONNS", b"FCGI_MPXS_CONNS"]) == rec(
        GET_VALUES, 0, pair(b"FCGI_MAX_CONNS", b"") + pair(b"FCGI_MPXS_CONNS", b""))


def test_get_values_answered_with_known_names_only():
    conn = AppConnection()
    asked = (pair(b"FCGI_MPXS_CONNS", b"") + pair(b"FCGI_NO_SUCH_VAR", b"")
             + pair(b"FCGI_MAX_REQS", b""))
    assert feed(conn, rec(GET_VALUES, 0, asked)) == []
    answer = conn.data_to_send()
    assert answer == rec(GET_VALUES_RESULT, 0,
                         pair(b"FCGI_MPXS_CONNS", b"0") + pair(b"FCGI_MAX_REQS", b"1"))
    assert conn.data_to_send() == b""
    assert run_server(answer) == [
        ValuesResult({b"FCGI_MPXS_CONNS": b"0", b"FCGI_MAX_REQS": b"1"})]


def test_get_values_with_nothing_known_gets_an_empty_result():
    conn = AppConnection()
    feed(conn, rec(GET_VALUES, 0, pair(b"X", b"")))
    assert conn.data_to_send() == rec(GET_VALUES_RESULT, 0)


def test_get_values_during_a_request_leaves_it_alone():
    conn = begun()
    assert feed(conn, rec(GET_VALUES, 0, pair(b"FCGI_MPXS_CONNS", b""))) == []
    assert parse(conn.data_to_send()) == [
        (GET_VALUES_RESULT, 0, pair(b"FCGI_MPXS_CONNS", b"0"))]
    assert feed(conn, rec(STDIN, 1)) == [Stdin(1, b"")]


@pytest.mark.parametrize("rtype, rid", [
    (0, 0), (12, 0), (200, 0), (255, 0),  # management records of no known type
    (BEGIN_REQUEST, 0), (STDOUT, 0),  # application types sent as management records
    (42, 1), (STDOUT, 1), (END_REQUEST, 1), (GET_VALUES_RESULT, 1),  # wrong way round
])
def test_unknown_type_answered_with_unknown_type(rtype, rid):
    conn = begun()
    assert feed(conn, rec(rtype, rid, b"whatever")) == []
    answer = conn.data_to_send()
    assert answer == rec(UNKNOWN_TYPE, 0, bytes([rtype]) + bytes(7))
    assert run_server(answer) == [UnknownType(rtype)]
    assert feed(conn, rec(STDIN, 1)) == [Stdin(1, b"")]


def test_second_begin_request_gets_cant_mpx_conn():
    conn = begun(1)
    assert feed(conn, rec(BEGIN_REQUEST, 2, begin_body(RESPONDER, KEEP_CONN))) == []
    assert conn.data_to_send() == rec(END_REQUEST, 2, end_body(0, CANT_MPX_CONN))
    # The refused request's records are ignored; the first carries on.
    events = feed(conn, rec(PARAMS, 2, SPEC_PARAMS) + rec(PARAMS, 2) + rec(STDIN, 2, b"x")
                  + rec(STDIN, 1, b"body") + rec(STDIN, 1))
    assert events == [Stdin(1, b"body"), Stdin(1, b"")]
    assert conn.request_id == 1 and conn.keep_conn is False
    assert conn.data_to_send() == b""


def test_begin_request_reusing_the_id_in_flight_is_a_protocol_error():
    # Answering it with END_REQUEST would end request 1 for the server.
    conn = begun(1)
    with pytest.raises(ProtocolError):
        feed(conn, rec(BEGIN_REQUEST, 1, begin_body()))
    assert conn.data_to_send() == b""


@pytest.mark.parametrize("role", [0, AUTHORIZER, FILTER, 4, 0xFFFF])
def test_unknown_role_answered_with_unknown_role(role):
    conn = AppConnection()
    data = (rec(BEGIN_REQUEST, 5, begin_body(role, KEEP_CONN))
            + rec(PARAMS, 5, SPEC_PARAMS) + rec(PARAMS, 5) + rec(STDIN, 5))
    assert feed(conn, data) == []
    assert conn.data_to_send() == rec(END_REQUEST, 5, end_body(0, UNKNOWN_ROLE))
    assert conn.request_id is None
    assert feed(conn, rec(BEGIN_REQUEST, 5, begin_body())) == [
        BeginRequest(5, RESPONDER, False)]


def test_records_for_an_inactive_request_are_ignored():
    conn = AppConnection()
    data = (rec(PARAMS, 9, SPEC_PARAMS) + rec(PARAMS, 9) + rec(STDIN, 9, b"x")
            + rec(ABORT_REQUEST, 9) + rec(DATA, 9, b"y") + rec(77, 9))
    assert feed(conn, data) == []
    conn = begun(1)
    assert feed(conn, data) == []
    conn.finish()
    assert feed(conn, rec(STDIN, 1, b"late") + rec(ABORT_REQUEST, 1)) == []
    assert conn.data_to_send() == b""


def test_params_after_its_terminator_is_a_protocol_error():
    conn = begun()
    with pytest.raises(ProtocolError):
        feed(conn, rec(PARAMS, 1, pair(b"A", b"B")))


def test_next_request_on_a_kept_connection():
    conn = begun(1, KEEP_CONN)
    feed(conn, rec(STDIN, 1))
    conn.finish()
    events = feed(conn, rec(BEGIN_REQUEST, 1, begin_body()) + rec(PARAMS, 1, pair(b"A", b"1"))
                  + rec(PARAMS, 1))
    assert events == [BeginRequest(1, RESPONDER, False), Params(1, [(b"A", b"1")])]
    assert conn.keep_conn is False


# ---------------------------------------------------------------------------
# Records the app writes (AppConnection) and the web server reads

def test_stdout_and_stderr_bytes():
    conn = begun(2)
    assert conn.stdout(2, b"out") == rec(STDOUT, 2, b"out")
    assert conn.stderr(2, b"err") == rec(STDERR, 2, b"err")
    assert conn.stdout(2, b"") == b"" and conn.stderr(2, b"") == b""


def test_end_request_bytes():
    assert AppConnection.end_request(3, 7, fastcgi.ProtocolStatus.OVERLOADED) == rec(
        END_REQUEST, 3, end_body(7, OVERLOADED))
    assert AppConnection.end_request(3) == rec(END_REQUEST, 3, end_body(0, REQUEST_COMPLETE))


def test_finish_ends_stdout_and_the_request():
    conn = begun(4)
    assert conn.finish(5) == rec(STDOUT, 4) + rec(END_REQUEST, 4, end_body(5, REQUEST_COMPLETE))
    assert conn.request_id is None
    with pytest.raises(RuntimeError):
        conn.finish()


def test_finish_ends_stderr_only_if_it_carried_data():
    conn = begun(1, KEEP_CONN)
    conn.stderr(1, b"warning\n")
    assert parse(conn.finish()) == [
        (STDOUT, 1, b""), (STDERR, 1, b""), (END_REQUEST, 1, end_body(0, REQUEST_COMPLETE))]
    feed(conn, rec(BEGIN_REQUEST, 2, begin_body()))
    assert [r[0] for r in parse(conn.finish())] == [STDOUT, END_REQUEST]


@pytest.mark.parametrize("status", [REQUEST_COMPLETE, CANT_MPX_CONN, OVERLOADED, UNKNOWN_ROLE])
def test_end_request_statuses_decoded(status):
    data = rec(END_REQUEST, 258, end_body(0xFFFFFFFF, status))
    assert run_server(data) == [EndRequest(258, 0xFFFFFFFF, status)]


def test_stdout_and_stderr_events():
    data = (rec(STDOUT, 1, b"Status: 200\r\n") + rec(STDERR, 1, b"oops\n")
            + rec(STDERR, 1) + rec(STDOUT, 1))
    assert run_server(data) == [Stdout(1, b"Status: 200\r\n"), Stderr(1, b"oops\n"),
                                Stderr(1, b""), Stdout(1, b"")]


@pytest.mark.parametrize("rtype", [BEGIN_REQUEST, ABORT_REQUEST, PARAMS, STDIN, DATA,
                                   GET_VALUES, 0, 12, 255])
def test_server_refuses_records_only_a_server_sends(rtype):
    with pytest.raises(ProtocolError):
        run_server(rec(rtype, 1, begin_body()))


# ---------------------------------------------------------------------------
# Name-value pairs (spec 3.4)

@pytest.mark.parametrize("name_len, value_len, prefix", [
    (0, 0, b"\x00\x00"),
    (1, 127, b"\x01\x7f"),
    (1, 128, b"\x01\x80\x00\x00\x80"),
    (200, 1, b"\x80\x00\x00\xc8\x01"),
    (128, 200, b"\x80\x00\x00\x80\x80\x00\x00\xc8"),
    (127, 0x12345, b"\x7f\x80\x01\x23\x45"),
])
def test_pair_lengths(name_len, value_len, prefix):
    name, value = b"n" * name_len, b"v" * value_len
    wire = prefix + name + value
    assert encode_pairs([(name, value)]) == wire
    assert decode_pairs(wire) == [(name, value)]


def test_four_byte_length_of_a_short_string_is_accepted():
    # Spec 3.4 allows the long form for any length; only the top bit tells.
    assert decode_pairs(b"\x80\x00\x00\x01\x80\x00\x00\x02" b"abc") == [(b"a", b"bc")]


def test_several_pairs_round_trip():
    pairs = [(b"A", b""), (b"", b"B"), (b"N" * 300, b"V" * 127), (b"X" * 127, b"Y" * 128)]
    wire = b"".join(pair(n, v) for n, v in pairs)
    assert encode_pairs(pairs) == wire
    assert decode_pairs(wire) == pairs


@pytest.mark.parametrize("wire", [
    b"\x05",  # no value length
    b"\x80",  # a four-byte name length cut short
    b"\x80\x00\x00",
    b"\x01\x80\x00\x00",  # a four-byte value length cut short
    b"\x03\x01ab",  # the name runs past the end
    b"\x01\x05n1234",  # the value runs past the end
    b"\x80\x00\x01\x00\x00",  # a 256-byte name that is not there
    b"\xff\xff\xff\xff\x00",  # the largest length there is
    b"\x01\x01ab\x01",  # a good pair, then a cut one
])
def test_truncated_pairs_raise_protocol_error(wire):
    with pytest.raises(ProtocolError):
        decode_pairs(wire)


def test_params_over_65535_bytes_span_records_with_a_pair_split():
    pairs = [(b"HTTP_COOKIE", b"c" * 40000), (b"HTTP_X_BIG", b"x" * 40000),
             (b"REQUEST_URI", b"/")]
    stream = b"".join(pair(n, v) for n, v in pairs)
    first = len(pair(*pairs[0]))
    assert first < 65535 < first + len(pair(*pairs[1]))  # the cut falls in pair two
    data = (rec(BEGIN_REQUEST, 1, begin_body()) + rec(PARAMS, 1, stream[:65535])
            + rec(PARAMS, 1, stream[65535:]) + rec(PARAMS, 1))
    events, _ = same_every_way(run_app, data, every=False)
    assert events == [BeginRequest(1, RESPONDER, False), Params(1, pairs)]
    # The codec's own writer splits the stream too, each record at most 65535.
    ours = ServerConnection.begin_request(1, pairs, keep_conn=False)
    records = parse(ours)
    assert [r[0] for r in records] == [BEGIN_REQUEST, PARAMS, PARAMS, PARAMS]
    assert all(len(r[2]) <= 65535 for r in records)
    assert b"".join(r[2] for r in records[1:]) == stream
    assert run_app(ours)[0] == events


@pytest.mark.parametrize("cut", range(1, 9))
def test_params_record_boundary_inside_the_lengths(cut):
    stream = pair(b"N" * 200, b"V" * 300) + pair(b"A", b"B")
    data = (rec(BEGIN_REQUEST, 1, begin_body()) + rec(PARAMS, 1, stream[:cut])
            + rec(PARAMS, 1, stream[cut:]) + rec(PARAMS, 1))
    assert run_app(data)[0][1] == Params(1, [(b"N" * 200, b"V" * 300), (b"A", b"B")])


# ---------------------------------------------------------------------------
# Streams longer than one record

def test_encode_stream_of_nothing_is_nothing():
    assert encode_stream(STDOUT, 1, b"") == b""
    assert encode_stream(STDOUT, 1, memoryview(b"")) == b""


def test_encode_stream_of_65535_bytes_is_one_record():
    data = bytes(range(256)) * 255 + bytes(range(255))
    assert len(data) == 65535
    out = encode_stream(STDOUT, 1, data)
    assert out == rec(STDOUT, 1, data)
    assert out[4:7] == b"\xff\xff\x01"


@pytest.mark.parametrize("size", [65536, 131056, 131057, 200000])
def test_encode_stream_splits_long_data(size):
    data = random.Random(size).randbytes(size)
    for source in (data, memoryview(data), bytearray(data)):
        records = parse(encode_stream(STDERR, 3, source))
        assert len(records) >= 2
        assert {(r[0], r[1]) for r in records} == {(STDERR, 3)}
        assert all(0 < len(r[2]) <= 65535 for r in records)
        assert b"".join(r[2] for r in records) == data


def test_long_stdout_reassembles_on_the_server():
    data = random.Random(1).randbytes(150000)
    wire = AppConnection.stdout(1, data) + rec(STDOUT, 1)
    events = same_every_way(run_server, wire, every=False)
    assert b"".join(e.data for e in events) == data
    assert events[-1] == Stdout(1, b"")


def test_long_stdin_reassembles_in_the_app():
    data = random.Random(2).randbytes(150000)
    wire = ServerConnection.stdin(1, data) + ServerConnection.stdin(1, b"")
    conn = begun()
    events = feed(conn, wire, range(1000, len(wire), 1000))
    assert b"".join(e.data for e in events) == data
    assert events[-1] == Stdin(1, b"")


def test_encode_record_refuses_oversized_content():
    with pytest.raises(ValueError):
        encode_record(STDOUT, 1, bytes(65536))


# ---------------------------------------------------------------------------
# The message flows of the spec's appendix B, record for record

def test_spec_flow_1_simple_request():
    request = (rec(BEGIN_REQUEST, 1, begin_body(RESPONDER, 0))
               + rec(PARAMS, 1, SPEC_PARAMS) + rec(PARAMS, 1) + rec(STDIN, 1))
    response = (rec(STDOUT, 1, PAGE) + rec(STDOUT, 1)
                + rec(END_REQUEST, 1, end_body(0, REQUEST_COMPLETE)))
    assert ServerConnection.begin_request(1, SPEC_PAIRS, False) + ServerConnection.stdin(
        1, b"") == request
    events, sent = same_every_way(run_app, request)
    assert events == [BeginRequest(1, RESPONDER, False), Params(1, SPEC_PAIRS), Stdin(1, b"")]
    assert sent == b""
    conn = AppConnection()
    feed(conn, request)
    assert conn.stdout(1, PAGE) + conn.finish() == response
    assert same_every_way(run_server, response) == [
        Stdout(1, PAGE), Stdout(1, b""), EndRequest(1, 0, REQUEST_COMPLETE)]


def test_spec_flow_2_stdin_data_and_params_split_mid_pair():
    request = (rec(BEGIN_REQUEST, 1, begin_body(RESPONDER, 0))
               + rec(PARAMS, 1, b"\013\002SERVER_PORT80\013\016SER")
               + rec(PARAMS, 1, b"VER_ADDR199.170.183.42") + rec(PARAMS, 1)
               + rec(STDIN, 1, b"quantity=100&item=3047936") + rec(STDIN, 1))
    events, sent = same_every_way(run_app, request)
    assert events == [BeginRequest(1, RESPONDER, False), Params(1, SPEC_PAIRS),
                      Stdin(1, b"quantity=100&item=3047936"), Stdin(1, b"")]
    assert sent == b""
    response = (rec(STDOUT, 1, PAGE) + rec(STDOUT, 1)
                + rec(END_REQUEST, 1, end_body(0, REQUEST_COMPLETE)))
    assert same_every_way(run_server, response) == [
        Stdout(1, PAGE), Stdout(1, b""), EndRequest(1, 0, REQUEST_COMPLETE)]


def test_spec_flow_3_stderr_and_split_stdout():
    request = (rec(BEGIN_REQUEST, 1, begin_body(RESPONDER, 0))
               + rec(PARAMS, 1, SPEC_PARAMS) + rec(PARAMS, 1) + rec(STDIN, 1))
    head, tail = b"Content-type: text/html\r\n\r\n<ht", b"ml>\n<head> ... "
    error = b"config error: missing SI_UID\n"
    response = (rec(STDOUT, 1, head) + rec(STDERR, 1, error) + rec(STDOUT, 1, tail)
                + rec(STDOUT, 1) + rec(STDERR, 1)
                + rec(END_REQUEST, 1, end_body(938, REQUEST_COMPLETE)))
    conn = AppConnection()
    assert feed(conn, request)[-1] == Stdin(1, b"")
    written = conn.stdout(1, head) + conn.stderr(1, error) + conn.stdout(1, tail)
    assert written + conn.finish(938) == response
    assert same_every_way(run_server, response) == [
        Stdout(1, head), Stderr(1, error), Stdout(1, tail), Stdout(1, b""),
        Stderr(1, b""), EndRequest(1, 938, REQUEST_COMPLETE)]


def test_spec_flow_4_multiplexed_requests_get_cant_mpx_conn():
    # The server's side of the spec's flow, in its order.  We do not
    # multiplex: request 2 is refused and request 1 completes.
    request = (rec(BEGIN_REQUEST, 1, begin_body(RESPONDER, KEEP_CONN))
               + rec(PARAMS, 1, SPEC_PARAMS) + rec(PARAMS, 1)
               + rec(BEGIN_REQUEST, 2, begin_body(RESPONDER, KEEP_CONN))
               + rec(PARAMS, 2, SPEC_PARAMS) + rec(STDIN, 1)
               + rec(PARAMS, 2) + rec(STDIN, 2))
    events, sent = same_every_way(run_app, request)
    assert events == [BeginRequest(1, RESPONDER, True), Params(1, SPEC_PAIRS), Stdin(1, b"")]
    assert sent == rec(END_REQUEST, 2, end_body(0, CANT_MPX_CONN))
    conn = AppConnection()
    feed(conn, request)
    response = conn.data_to_send() + conn.stdout(1, PAGE) + conn.finish()
    assert response == (rec(END_REQUEST, 2, end_body(0, CANT_MPX_CONN))
                        + rec(STDOUT, 1, PAGE) + rec(STDOUT, 1)
                        + rec(END_REQUEST, 1, end_body(0, REQUEST_COMPLETE)))
    assert same_every_way(run_server, response) == [
        EndRequest(2, 0, CANT_MPX_CONN), Stdout(1, PAGE), Stdout(1, b""),
        EndRequest(1, 0, REQUEST_COMPLETE)]
    # With FCGI_KEEP_CONN the server may now retry request 2 on this connection.
    retry = (rec(BEGIN_REQUEST, 2, begin_body(RESPONDER, KEEP_CONN))
             + rec(PARAMS, 2, SPEC_PARAMS) + rec(PARAMS, 2) + rec(STDIN, 2))
    assert feed(conn, retry) == [BeginRequest(2, RESPONDER, True), Params(2, SPEC_PAIRS),
                                 Stdin(2, b"")]


# ---------------------------------------------------------------------------
# Malformed input

@pytest.mark.parametrize("version", [0, 2, 255])
def test_bad_version_is_a_protocol_error(version):
    bad = rec(STDIN, 1, b"x", version=version)
    with pytest.raises(ProtocolError):
        run_app(bad)
    with pytest.raises(ProtocolError):
        run_server(bad)
    with pytest.raises(ProtocolError):
        run_app(rec(BEGIN_REQUEST, 1, begin_body()) + bad)


def test_content_past_the_buffer_waits_for_more():
    data = rec(BEGIN_REQUEST, 1, begin_body()) + rec(PARAMS, 1, pair(b"K", b"v" * 500))
    conn = AppConnection()
    assert feed(conn, data[:16 + 100]) == [BeginRequest(1, RESPONDER, False)]
    assert feed(conn, data[16 + 100:] + rec(PARAMS, 1)) == [Params(1, [(b"K", b"v" * 500)])]
    server = ServerConnection()
    reply = rec(STDOUT, 1, b"s" * 1000)
    assert feed(server, reply[:7]) == [] and feed(server, reply[7:-1]) == []
    assert feed(server, reply[-1:]) == [Stdout(1, b"s" * 1000)]


@pytest.mark.parametrize("size", range(8))
def test_truncated_begin_request_body(size):
    with pytest.raises(ProtocolError):
        run_app(rec(BEGIN_REQUEST, 1, begin_body(RESPONDER, KEEP_CONN)[:size]))


@pytest.mark.parametrize("size", range(8))
def test_truncated_end_request_body(size):
    with pytest.raises(ProtocolError):
        run_server(rec(END_REQUEST, 1, end_body(0, REQUEST_COMPLETE)[:size]))


def test_empty_unknown_type_body():
    with pytest.raises(ProtocolError):
        run_server(rec(UNKNOWN_TYPE, 0))


def test_pair_lengths_past_the_stream():
    bad = b"\x0b\x20SERVER_PORT80"  # says 32 bytes of value, has 2
    with pytest.raises(ProtocolError):
        run_app(rec(BEGIN_REQUEST, 1, begin_body()) + rec(PARAMS, 1, bad) + rec(PARAMS, 1))
    with pytest.raises(ProtocolError):
        run_app(rec(GET_VALUES, 0, bad))
    with pytest.raises(ProtocolError):
        run_server(rec(GET_VALUES_RESULT, 0, bad))


# A few thousand inputs, fixed seed: nothing but ProtocolError may escape.

VALID_INPUTS = [
    ServerConnection.begin_request(1, SPEC_PAIRS + [(b"N" * 130, b"V" * 300)], True)
    + rec(STDIN, 1, b"quantity=100") + rec(STDIN, 1) + rec(ABORT_REQUEST, 1)
    + rec(GET_VALUES, 0, pair(b"FCGI_MPXS_CONNS", b"")) + rec(DATA, 1, b"d"),
    rec(STDOUT, 1, PAGE) + rec(STDERR, 1, b"err") + rec(STDOUT, 1) + rec(STDERR, 1)
    + rec(END_REQUEST, 1, end_body(938, REQUEST_COMPLETE))
    + rec(GET_VALUES_RESULT, 0, pair(b"FCGI_MAX_CONNS", b"1"))
    + rec(UNKNOWN_TYPE, 0, bytes([99]) + bytes(7)),
]


def random_records(rng: random.Random) -> bytes:
    """Records with plausible headers and random bodies, types and ids."""
    out = b""
    for _ in range(rng.randint(1, 6)):
        content = rng.randbytes(rng.choice([0, 1, 5, 8, rng.randint(0, 300)]))
        out += rec(rng.randint(0, 13), rng.choice([0, 1, 2, 0xFFFF]), content,
                   padding=rng.choice([None, 0, rng.randint(0, 255)]))
    return out


def mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(len(data))
        action = rng.randrange(4)
        if action == 0:
            data[pos] = rng.randrange(256)
        elif action == 1:
            del data[pos:pos + rng.randint(1, 16)]
        elif action == 2:
            data[pos:pos] = rng.randbytes(rng.randint(1, 16))
        else:
            del data[pos:]
        if not data:
            break
    return bytes(data)


def fuzz_inputs(count: int):
    rng = random.Random(20240611)
    for i in range(count):
        kind = i % 3
        if kind == 0:
            data = rng.randbytes(rng.randint(0, 120))
            if data and rng.random() < 0.8:
                data = b"\x01" + data[1:]  # get past the version check
        elif kind == 1:
            data = random_records(rng)
        else:
            data = mutate(rng, rng.choice(VALID_INPUTS))
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, 3))) if data else ()
        yield data, cuts


def test_fuzz_only_protocol_error_escapes():
    outcomes = {"events": 0, "ProtocolError": 0}
    for data, cuts in fuzz_inputs(4000):
        for conn in (AppConnection(), ServerConnection()):
            try:
                feed(conn, data, cuts)
                if isinstance(conn, AppConnection):
                    conn.data_to_send()
                    if conn.request_id is not None:
                        conn.stderr(conn.request_id, b"e")
                        conn.finish()
                outcomes["events"] += 1
            except ProtocolError:
                outcomes["ProtocolError"] += 1
    # Both outcomes must be common, or the inputs are not testing much.
    assert min(outcomes.values()) > 1000, outcomes
