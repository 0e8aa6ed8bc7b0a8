"""A real DNS server for tests, on 127.0.0.1 (or ::1), UDP and TCP.

It answers from a zone given as Python data and can misbehave on request::

    with DNSStub([("example.org", "MX", "10 mx.example.org."),
                  ("mx.example.org", "A", "192.0.2.1")]) as stub:
        stub.fault("broken.example", "servfail")
        resolver = Resolver(stub.settings())

- Records are ``(name, type, rdata text)`` triples in zone-file syntax
  (names in the rdata are absolute; ``"0 ."`` is a null MX). Lookups follow
  CNAME chains in the zone (at most 8 steps), as a recursive server would.
- A name with no record but with records below it (an empty non-terminal)
  answers NOERROR with no data; any other unknown name NXDOMAIN. Negative
  answers carry an SOA so that resolvers can cache them.
- :meth:`DNSStub.fault` makes a name (or every name, ``None``), for one
  type or all, answer ``"servfail"``, ``"refused"``, ``"timeout"`` (no answer
  at all), ``"truncate"`` (a UDP answer with the TC bit and no records, so
  the client asks again over TCP, which answers fully) or ``"truncate_tcp"``
  (the same, but the TCP answer has the TC bit too, with what records
  there are: a broken or overflowing server). An answer too big for the
  query's UDP payload comes truncated, as from a real server.
- :meth:`DNSStub.delay` makes a name answer (over UDP) only after a while.
- :attr:`DNSStub.queries` records every question as ``(name, type,
  transport)``.

The server runs in a thread of its own, stops when the ``with`` block (or
the ``dns_stub`` fixture) ends, and handles at most a few TCP connections at
once, each for a few seconds: it is bounded like any test helper.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
from collections.abc import Iterable
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from bonzo.dns import DNSSettings, Resolver, format_nameserver

FAULTS = ("servfail", "refused", "timeout", "truncate", "truncate_tcp")
#: The negative-caching TTL of the stub's synthetic SOA.
NEGATIVE_TTL = 60
MAX_TCP_CONNECTIONS = 8
TCP_IDLE = 3.0

Record = tuple[str, str, str]


def _name(text: str) -> dns.name.Name:
    return dns.name.from_text(text if text.endswith(".") else text + ".")


class DNSStub:
    """A DNS server answering from ``records`` (see the module docs).

    :arg records: ``(name, type, rdata)`` triples.
    :arg ttl: the TTL of every record.
    :arg host: ``"127.0.0.1"`` or ``"::1"``.
    """

    def __init__(self, records: Iterable[Record] = (), *, ttl: int = 300, host: str = "127.0.0.1"):
        self.ttl = ttl
        self.host = host
        self.zone: dict[tuple[dns.name.Name, int], list[dns.rdata.Rdata]] = {}
        self.faults: dict[tuple[dns.name.Name | None, int | None], str] = {}
        self.delays: dict[dns.name.Name, float] = {}
        #: Every question received: ``(name, type, "udp" or "tcp")``.
        self.queries: list[tuple[str, str, str]] = []
        #: Exceptions raised while answering (a bug in the stub or a test's
        #: zone): :meth:`stop` raises the first.
        self.errors: list[BaseException] = []
        self.port = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._connections: list[threading.Thread] = []
        for record in records:
            self.add(*record)

    # ---------------------------------------------------------------- zone
    def add(self, name: str, rdtype: str, text: str) -> None:
        """Add one record."""
        kind = dns.rdatatype.from_text(rdtype)
        rdata = dns.rdata.from_text(
            dns.rdataclass.IN, kind, text, origin=dns.name.root, relativize=False
        )
        with self._lock:
            self.zone.setdefault((_name(name), kind), []).append(rdata)

    def remove(self, name: str, rdtype: str | None = None) -> None:
        """Remove the records of ``name`` (of one type, or all)."""
        key = _name(name)
        with self._lock:
            for owner, kind in list(self.zone):
                if owner == key and (rdtype is None or kind == dns.rdatatype.from_text(rdtype)):
                    del self.zone[(owner, kind)]

    def fault(self, name: str | None, kind: str, rdtype: str | None = None) -> None:
        """Make ``name`` (``None``: every name) misbehave for ``rdtype``
        (``None``: every type): ``kind`` is one of :data:`FAULTS`."""
        if kind not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}, not {kind!r}")
        key = (
            None if name is None else _name(name),
            None if rdtype is None else int(dns.rdatatype.from_text(rdtype)),
        )
        with self._lock:
            self.faults[key] = kind

    def delay(self, name: str, seconds: float) -> None:
        """Answer UDP questions about ``name`` only after ``seconds``."""
        with self._lock:
            self.delays[_name(name)] = seconds

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def asked(self, rdtype: str | None = None) -> list[str]:
        """The names asked for (of one type), in order."""
        with self._lock:
            return [name for name, kind, _ in self.queries if rdtype in (None, kind)]

    # ---------------------------------------------------------- answering
    def _fault(self, name: dns.name.Name, kind: int) -> str | None:
        for key in ((name, kind), (name, None), (None, kind), (None, None)):
            if key in self.faults:
                return self.faults[key]
        return None

    def _exists(self, name: dns.name.Name) -> bool:
        return any(owner.is_subdomain(name) for owner, _ in self.zone)

    def answer(self, wire: bytes, transport: str) -> bytes | None:
        """The response to one query message, or ``None`` for no answer."""
        try:
            return self._answer(wire, transport)
        except Exception as exc:
            self.errors.append(exc)
            return None

    def _answer(self, wire: bytes, transport: str) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None  # not DNS: say nothing, like a server would
        if len(query.question) != 1:
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        qname, kind = question.name, int(question.rdtype)
        with self._lock:
            self.queries.append(
                (qname.to_text(omit_final_dot=True), dns.rdatatype.to_text(kind), transport)
            )
            fault = self._fault(qname, kind)
            response = dns.message.make_response(query, recursion_available=True)
            if fault == "timeout":
                return None
            if fault == "servfail":
                response.set_rcode(dns.rcode.SERVFAIL)
                return response.to_wire()
            if fault == "refused":
                response.set_rcode(dns.rcode.REFUSED)
                return response.to_wire()
            if fault in ("truncate", "truncate_tcp") and transport == "udp":
                response.flags |= dns.flags.TC
                return response.to_wire()
            self._fill(response, qname, kind)
            if fault == "truncate_tcp":
                response.flags |= dns.flags.TC
        if transport == "tcp":
            return response.to_wire(max_size=65535)
        try:
            return response.to_wire()  # at most the query's EDNS payload
        except dns.exception.TooBig:
            # As a real server does: TC, and the client asks over TCP.
            truncated = dns.message.make_response(query, recursion_available=True)
            truncated.flags |= dns.flags.TC
            return truncated.to_wire()

    def _fill(self, response: dns.message.Message, qname: dns.name.Name, kind: int) -> None:
        current = qname
        for _ in range(8):
            records = self.zone.get((current, kind))
            if records:
                response.answer.append(self._rrset(current, kind, records))
                return
            cname = self.zone.get((current, dns.rdatatype.CNAME))
            if kind == dns.rdatatype.CNAME or not cname:
                break
            response.answer.append(self._rrset(current, dns.rdatatype.CNAME, cname))
            current = cname[0].target  # type: ignore[attr-defined]
        if not self._exists(current):
            response.set_rcode(dns.rcode.NXDOMAIN)
        soa = dns.rdata.from_text(
            dns.rdataclass.IN,
            dns.rdatatype.SOA,
            f"stub. hostmaster.stub. 1 3600 600 86400 {NEGATIVE_TTL}",
            relativize=False,
        )
        response.authority.append(self._rrset(dns.name.root, dns.rdatatype.SOA, [soa]))

    def _rrset(
        self, name: dns.name.Name, kind: int, records: list[dns.rdata.Rdata]
    ) -> dns.rrset.RRset:
        rrset = dns.rrset.RRset(name, dns.rdataclass.IN, dns.rdatatype.RdataType.make(kind))
        for rdata in records:
            rrset.add(rdata, self.ttl)
        return rrset

    # ------------------------------------------------------------ serving
    def start(self) -> DNSStub:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # One free port for both UDP and TCP: take a UDP port, then try the
        # same TCP port (a few times, in case another test holds it).
        for _ in range(20):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.bind((self.host, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(family, socket.SOCK_STREAM)
            try:
                tcp.bind((self.host, port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(16)
            break
        else:  # pragma: no cover - the machine is out of ports
            raise OSError("no free port for the DNS stub")
        udp.setblocking(False)
        tcp.setblocking(False)
        self._udp, self._tcp, self.port = udp, tcp, port
        self._thread = threading.Thread(target=self._serve, name="dns-stub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for thread in self._connections:
            thread.join(TCP_IDLE + 1)
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()
        if self.errors:
            raise RuntimeError(f"the DNS stub failed: {self.errors[0]!r}") from self.errors[0]

    def __enter__(self) -> DNSStub:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._udp, selectors.EVENT_READ, "udp")
            selector.register(self._tcp, selectors.EVENT_READ, "tcp")
            while not self._stop.is_set():
                for key, _ in selector.select(0.05):
                    if key.data == "udp":
                        self._serve_udp()
                    else:
                        self._accept()

    def _serve_udp(self) -> None:
        assert self._udp is not None
        try:
            wire, peer = self._udp.recvfrom(65535)
        except OSError:
            return
        reply = self.answer(wire, "udp")
        if reply is None:
            return
        delay = self._delay(wire)
        if delay:
            timer = threading.Timer(delay, self._send_late, (reply, peer))
            timer.daemon = True
            timer.start()
        else:
            self._udp.sendto(reply, peer)

    def _delay(self, wire: bytes) -> float:
        with self._lock:
            if not self.delays:
                return 0.0
        name = dns.message.from_wire(wire).question[0].name
        with self._lock:
            return self.delays.get(name, 0.0)

    def _send_late(self, reply: bytes, peer: Any) -> None:
        if self._stop.is_set() or self._udp is None:
            return
        try:
            self._udp.sendto(reply, peer)
        except OSError:
            pass  # stopped meanwhile

    def _accept(self) -> None:
        assert self._tcp is not None
        try:
            conn, _ = self._tcp.accept()
        except OSError:
            return
        self._connections = [t for t in self._connections if t.is_alive()]
        if len(self._connections) >= MAX_TCP_CONNECTIONS:
            conn.close()
            return
        thread = threading.Thread(target=self._serve_tcp, args=(conn,), daemon=True)
        self._connections.append(thread)
        thread.start()

    def _serve_tcp(self, conn: socket.socket) -> None:
        conn.setblocking(True)
        conn.settimeout(TCP_IDLE)
        with conn:
            for _ in range(16):  # a few queries per connection at most
                if self._stop.is_set():
                    return
                try:
                    header = _read(conn, 2)
                    wire = _read(conn, struct.unpack("!H", header)[0])
                except OSError:
                    return
                reply = self.answer(wire, "tcp")
                if reply is None:
                    return  # "timeout": close without a word
                try:
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
                except OSError:
                    return

    # ------------------------------------------------------------ helpers
    @property
    def nameserver(self) -> str:
        """This server for ``[dns] nameservers``: ``127.0.0.1:PORT``."""
        return format_nameserver(self.host, self.port)

    def settings(self, **overrides: Any) -> DNSSettings:
        """:class:`~bonzo.dns.DNSSettings` asking this server only, quick to
        give up (timeout 1 s, 1 attempt) and without a cache, unless
        overridden."""
        values: dict[str, Any] = {
            "nameservers": (self.nameserver,),
            "timeout": 1.0,
            "attempts": 1,
            "cache_size": 0,
        }
        values.update(overrides)
        return DNSSettings(**values)

    def resolver(self, **overrides: Any) -> Resolver:
        """A :class:`~bonzo.dns.Resolver` for :meth:`settings`, which keeps
        MX hosts of equal preference in zone order (no shuffle)."""
        return Resolver(self.settings(**overrides), shuffle=lambda hosts: None)


def _read(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data
