#!/usr/bin/env python3
"""bench_broker.py - load benchmark for broker.py, measured beside a minimal epoll "floor" server.

    python bench_broker.py --quick                    # small sizes, every scenario but retention
    python bench_broker.py                            # the full run (retention aside), about 6 minutes
    python bench_broker.py --scenarios retention      # 1,000,000 inserts: the file with --keep-versions
    python bench_broker.py --scenarios fanout,insert --subscribers 1000 --repeat 3
    python bench_broker.py --servers floor            # the harness alone, without broker.py
    python bench_broker.py --scenarios throughput,insert,fanout,connect --workers 1,2
    .venv/bin/python bench_broker.py --quick --db postgres                # the scenarios on PostgreSQL
    .venv/bin/python bench_broker.py --scenarios nodes --db postgres      # two broker nodes, one database
    .venv/bin/python bench_broker.py --db postgresql://me@127.0.0.1/db    # on a server of yours

Starts `python broker.py --port 0 --db <temp file> --quiet` and the floor (this file with
--serve-floor, same flags), drives each from separate client processes over non-blocking loopback
sockets, runs them interleaved (broker, floor, broker, floor, ...) and prints one table per scenario
with broker / floor ratios beside the targets; --json keeps the same tables. On a shared, noisy
2-core machine only the ratios and the CPU-per-operation figures mean much.
--workers 1,2 adds broker.py --workers 2 beside them in the throughput, insert, fanout and connect
scenarios, with its ratio to one process; its CPU and memory are those of the parent and every worker.
--db postgres gives each broker a new database on a private PostgreSQL cluster instead of a temp
file (test_postgres.PostgresServer, fsync on: a commit as durable as SQLite's --sync full);
--db postgresql://... uses that server, whose user must be allowed to CREATE DATABASE (the bench
drops what it made). Either needs psycopg, so run the bench with .venv/bin/python: the brokers are
started with the same interpreter. On PostgreSQL, tables also show the CPU of the PostgreSQL server
(the postmaster and its children, the backends), and the nodes scenario runs: two brokers on one
database, the fan-out latency on the publisher's node and on the other, and inserts per s beside
SQLite in one process, with what limits each run (CPU per process group, run-queue wait, iowait).
Only 127.0.0.1 (and the server of a --db URL) is ever contacted. Linux (epoll, /proc), Python 3.9+,
standard library only (psycopg for PostgreSQL).
"""
import argparse
import array
import ctypes
import errno
import importlib.util
import json
import multiprocessing
import os
import re
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.parse

HOST = "127.0.0.1"                 # loopback only: nothing here ever talks to another address
HERE = os.path.dirname(os.path.abspath(__file__))
TICKS = os.sysconf("SC_CLK_TCK")
LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")
CROWD_RATE = 5.0                   # records per second in the crowd scenario
CONNECT_EVENTS = 100               # distinct events stored before the connect scenario
SLOW_READ_BYTES = 64 << 10         # a slow reader takes this much (and its receive buffer holds this)
SLOW_READ_INTERVAL = 0.5           # ... every this many seconds: progress, so it is never dropped
SLOW_PAUSE_MARGIN = 1.25           # slow readers first read nothing until this many times off the ring
RING_BYTES = 16 << 20              # broker.py's RING_BYTES: a reader further behind catches up from SQLite
PAGE_BYTES = 1 << 20               # broker.py's PAGE_BYTES: what it may hold for a reader beyond the sockets
BATCH_RECORDS = 100                # batch: records in each POST /insert array
BATCH_PUBLISHERS = 8               # ... and keep-alive connections, for single inserts and batches alike
NODES_PUBLISHERS = 8               # nodes: keep-alive /insert connections, over 2 client processes
RETENTION_EVENTS = 100             # retention: distinct events the inserts cycle through
RETENTION_KEEP = 10                # ... --keep-versions of the broker that prunes
RETENTION_BATCH = 1000             # ... records per POST /insert array (broker.py's largest)
RETENTION_PUBLISHERS = 4           # ... keep-alive connections
RETENTION_SAMPLES = 10             # ... file sizes taken during the load, at every tenth of it
RETENTION_LOAD_SECONDS = 300.0     # ... stop loading after this long
SERVERS = ("broker", "floor")
SENT = re.compile(rb'"sent":\s*(\d+)')
BROKER_WORKER = re.compile(r"\r\nbroker-worker:[ \t]*(\d+)", re.IGNORECASE)

# Sizes per mode; a flag given on the command line wins over both columns.
#   flag                    quick       full         help
SIZES = [
    ("subscribers",          "300,1000", "1000,3000", "fanout: idle subscriber counts, comma-separated"),
    ("records",              30,         60,          "fanout: records published per run"),
    ("rate",                 20.0,       20.0,        "fanout: records per second"),
    ("crowd",                2000,       10000,       "crowd: subscribers connected at once"),
    ("crowd_records",        10,         25,          f"crowd: records published at {CROWD_RATE:g}/s"),
    ("slow_readers",         10,         10,          "slow: readers that stall, then read "
                                                      f"{SLOW_READ_BYTES >> 10} KiB/{SLOW_READ_INTERVAL:g} s"),
    ("slow_record_kib",      160,        160,         "slow: KiB of data in each record"),
    ("slow_rate",            20.0,       20.0,        "slow: records per second"),
    ("slow_alone_seconds",   6.0,        15.0,        "slow: seconds published before slow readers come"),
    ("slow_seconds",         18.0,       40.0,        "slow: seconds published with them"),
    ("throughput_seconds",   2.0,        3.0,         "throughput: seconds of closed-loop publishing"),
    ("memory_subscribers",   "500,1000", "1000,3000", "memory: subscriber counts, comma-separated"),
    ("connect_subscribers",  1000,       1000,        "connect: subscribers syncing at once"),
    ("insert_seconds",       1.5,        3.0,         "insert: seconds per publisher count"),
    ("batch_seconds",        2.0,        3.0,         "batch: seconds of single inserts, then as long "
                                                      f"of arrays of {BATCH_RECORDS}"),
    ("history_versions",     20000,      1000000,     "history: versions of one event to load"),
    ("history_events",       5000,       100000,      "history: distinct events to load"),
    ("history_load_seconds", 30.0,       420.0,       "history: stop loading after this long"),
    ("retention_inserts",    200000,     1000000,     f"retention: records on {RETENTION_EVENTS} events"),
    ("retention_rate",       0.0,        0.0,         "retention: records per s, 0 as fast as acknowledged"),
    ("nodes_subscribers",    1000,       1000,        "nodes: idle subscribers, split over the nodes (fanout's "
                                                      "--records at --rate)"),
    ("nodes_seconds",        3.0,        5.0,         f"nodes: seconds of inserts from {NODES_PUBLISHERS} "
                                                      "publishers, per store"),
    ("repeat",               1,          2,           "runs per server, interleaved broker, floor, ..."),
]
SCENARIOS = ("fanout", "crowd", "slow", "throughput", "memory", "connect", "insert", "batch", "nodes",
             "history", "retention")
ON_REQUEST = ("retention",)        # run only when named in --scenarios: a million inserts take 90 s
POSTGRES_ONLY = ("nodes",)         # several brokers on one database: with --db postgres or a URL only
WORKER_SCENARIOS = ("fanout", "throughput", "connect", "insert")   # a broker per --workers count, side by side
CROSS_WORKER_P99 = 1.5             # issue 10: fan-out p99 on other workers / on the publisher's worker,
CROSS_WORKER_AT = (1000, 20.0)     # ... at this many subscribers and records per second
WORKERS_NOTE = ("N workers: broker.py --workers N, its server CPU, run-queue wait and RSS summed over the "
                "parent and every worker (shared pages count once per process)")
RATIO_NOTE = "; 'N workers / 1' is its figure over that of broker.py in one process"
CROSS_NODE_P99 = 2.0               # fan-out p99 on the other node / on the publisher's node, at CROSS_WORKER_AT
BROKER_TABLES = ("broker_records", "broker_latest", "broker_counter")   # broker.py's PostgresStore.TABLES


# --- small helpers: statistics, /proc, limits -----------------------------------------------------

def percentile(sorted_values, fraction):
    """Nearest-rank percentile of an already sorted sequence; None when it is empty."""
    if not sorted_values:
        return None
    rank = max(1, round(fraction * len(sorted_values) + 0.5))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(nanoseconds):
    """p50, p99 and max of latencies given in ns, as milliseconds."""
    ordered = [ns / 1e6 for ns in sorted(nanoseconds)]
    return {"p50_ms": percentile(ordered, 0.50), "p99_ms": percentile(ordered, 0.99),
            "max_ms": ordered[-1] if ordered else None}


def per(total, count, scale=1.0):
    return None if not count or total is None else total * scale / count


def stat_fields(pid):
    """/proc/<pid>/stat after the command name: [state, ppid, ...], so field n of proc(5) is [n - 3]."""
    with open(f"/proc/{pid}/stat", "rb") as file:
        stat = file.read()
    return stat[stat.rindex(b")") + 2:].split()       # the command name may hold spaces


def cpu_seconds(pid):
    """utime + stime of every thread of pid, dead or alive, from /proc/<pid>/stat."""
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / TICKS


def cpu_and_reaped_seconds(pid):
    # cutime + cstime as well: a worker that ended and was waited for leaves its CPU time there,
    # so a process tree's total never goes down when one of its members is replaced.
    fields = stat_fields(pid)
    return sum(int(field) for field in fields[11:15]) / TICKS


def process_tree(pid):
    """pid and every live descendant (parents before children), from the ppid in each /proc/<n>/stat."""
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                children.setdefault(int(stat_fields(name)[1]), []).append(int(name))
            except (OSError, IndexError):
                pass                   # it ended while /proc was being read
    tree = [pid]
    for parent in tree:                # grows as it goes: children, then theirs
        tree.extend(children.get(parent, ()))
    return tree


def summed_over(pids, read):
    """read(pid) added up over pids; a process that ended since the list was made counts 0."""
    total = 0
    for pid in pids:
        try:
            total += read(pid) or 0
        except (OSError, ValueError):
            pass
    return total


def start_time(pid):
    """When pid started, in clock ticks after boot; with the pid, it names one process for good."""
    try:
        return int(stat_fields(pid)[19])
    except (OSError, IndexError):
        return None


def runqueue_seconds(pid):
    """Time pid's live threads spent runnable but waiting for a CPU: how busy the machine was."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as file:
                total += int(file.read().split()[1])
        except (OSError, IndexError):
            pass                       # the thread ended meanwhile
    return total / 1e9


def machine_ticks():
    """(busy, iowait, steal, all) clock ticks of every CPU since boot, from /proc/stat's cpu line."""
    with open("/proc/stat") as file:
        ticks = [int(field) for field in file.readline().split()[1:9]]    # guest time is in user already
    user, nice, system, _idle, iowait, irq, softirq, steal = ticks
    return user + nice + system + irq + softirq, iowait, steal, sum(ticks)


class Meter:
    """A server's CPU time and run-queue wait (every process of it) from creation to read(); the
    same of the PostgreSQL server it uses, if any (server.database); and the whole machine's."""

    def __init__(self, server):
        self.server, self.database = server, server.database
        self.started, self.machine = time.monotonic(), machine_ticks()
        self.cpu, self.waited = server.cpu_seconds(), server.waited_seconds()
        self.database_cpu, self.database_waited = self._database_now()

    def read(self):
        """(CPU seconds used, seconds spent waiting for a CPU) since the meter was made."""
        return self.server.cpu_seconds() - self.cpu, self.server.waited_seconds() - self.waited

    def read_database(self):
        """As read(), for the PostgreSQL server: (None, None) on SQLite or when it runs elsewhere."""
        cpu, waited = self._database_now()
        if cpu is None:
            return None, None
        return cpu - self.database_cpu, waited - self.database_waited

    def _database_now(self):
        if self.database is None or self.database.postmaster is None:
            return None, None
        return self.database.cpu_seconds(), self.database.waited_seconds()

    def read_machine(self):
        """Seconds since the meter was made, and the % of every CPU's time busy, in iowait and
        stolen by the hypervisor meanwhile."""
        now = machine_ticks()
        busy, iowait, steal, ticks = (after - before for after, before in zip(now, self.machine))
        return (time.monotonic() - self.started, per(busy, ticks, 100), per(iowait, ticks, 100),
                per(steal, ticks, 100))


def memory_kib(pid, field):
    """A /proc/<pid>/status figure in KiB: VmRSS now, VmHWM the peak."""
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def reset_peak_memory(pid):
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux 4.0+), so a peak is per step.
    with open(f"/proc/{pid}/clear_refs", "w") as file:
        file.write("5")


def own_cpu_seconds():
    times = os.times()
    return times.user + times.system


def raise_open_file_limit():
    # Each subscriber is an open socket, on both sides: allow as many as the hard limit does.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


PRCTL = getattr(ctypes.CDLL(None), "prctl", None)
PR_SET_PDEATHSIG = 1


def prepare_server_process():
    """preexec_fn for servers: more open files, and die with the benchmark even if it is killed."""
    raise_open_file_limit()
    if PRCTL is not None:
        PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


def split_evenly(total, parts):
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def log(message):
    print(message, file=sys.stderr, flush=True)


# --- HTTP on raw sockets ----------------------------------------------------------------------------

class Dechunker:
    """Incremental chunked transfer-encoding decoder: raw bytes in, body bytes out."""

    def __init__(self):
        self.raw = b""        # an incomplete chunk-size line kept for the next feed
        self.left = 0         # bytes the current chunk still owes, its trailing CRLF included
        self.done = False     # the zero-size chunk was seen

    def feed(self, data):
        raw = self.raw + data if self.raw else data
        pos, body = 0, []
        while pos < len(raw) and not self.done:
            if self.left == 0:
                eol = raw.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(raw[pos:eol].split(b";", 1)[0], 16)
                pos = eol + 2
                self.done = size == 0
                self.left = size + 2 if size else 0
                continue
            take = min(self.left, len(raw) - pos)
            payload = min(take, max(self.left - 2, 0))  # the last 2 bytes owed are the CRLF
            body.append(raw[pos:pos + payload])
            pos += take
            self.left -= take
        self.raw = raw[pos:]
        return b"".join(body)


class StreamReader:
    """One HTTP response as it arrives: the head, then the body de-chunked and split into SSE messages."""

    def __init__(self):
        self.head = b""
        self.status = None
        self.worker = None        # which of broker.py's workers answered; None for a single process
        self.dechunker = None     # None for a body that is not chunked
        self.text = b""

    def feed_body(self, data):
        """Return the body bytes, de-chunked, that data carried."""
        if self.status is None:
            data = self._take_head(data)
            if self.status is None:
                return b""
        return self.dechunker.feed(data) if self.dechunker else data

    def feed(self, data):
        """Return the complete SSE messages (bytes, without the blank line) that data finished."""
        self.text += self.feed_body(data)
        if b"\n\n" not in self.text:
            return []
        *messages, self.text = self.text.split(b"\n\n")
        return messages

    def _take_head(self, data):
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            return b""
        head, rest = self.head[:end].decode("latin-1"), self.head[end + 4:]
        self.status = int(head.split(" ", 2)[1])
        self.worker = answering_worker(head)
        if re.search(r"\r\ntransfer-encoding:[^\r]*chunked", head, re.IGNORECASE):
            self.dechunker = Dechunker()
        return rest


def answering_worker(head):
    """The Broker-Worker header of a response head: which worker of broker.py --workers N answered."""
    found = BROKER_WORKER.search(head)
    return int(found.group(1)) if found else None


def sse_fields(message):
    """(id, data) of one SSE message; None where absent. Comment lines (':') are skipped."""
    if message.startswith(b"id: "):          # fast path for the usual id/event/data shape
        lines = message.split(b"\n")
        if len(lines) == 3 and lines[1].startswith(b"event: ") and lines[2].startswith(b"data: "):
            return int(lines[0][4:]), lines[2][6:]
    ident = data = None
    for line in message.split(b"\n"):
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"id":
            ident = int(value)
        elif name == b"data":
            data = value if data is None else data + b"\n" + value
    return ident, data


def split_response(buf):
    """(status, head, body, rest) for a complete Content-Length response at the start of buf, else None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end].decode("latin-1")
    length = re.search(r"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
    if length is None:
        raise ValueError(f"response without Content-Length: {head.splitlines()[0]}")
    stop = end + 4 + int(length.group(1))
    if len(buf) < stop:
        return None
    return int(head.split(" ", 2)[1]), head, buf[end + 4:stop], buf[stop:]


def insert_request(port, event, seq, pad=0):
    # The send time rides in the record, so any subscriber can compute its own latency;
    # pad adds that many bytes of data after it, for scenarios that need large records.
    data = {"sent": time.time_ns(), "seq": seq}
    if pad:
        data["pad"] = "x" * pad
    return post_insert_request(port, json.dumps({"event": event, "data": data}).encode())


def batch_request(port, events, seq):
    """One POST /insert of a JSON array: a record per event name, numbered from seq on."""
    sent = time.time_ns()
    return post_insert_request(port, json.dumps(
        [{"event": event, "data": {"sent": sent, "seq": seq + i}} for i, event in enumerate(events)]).encode())


def post_insert_request(port, body):
    return (b"POST /insert HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (HOST.encode(), port, len(body), body))


def http_get(port, path, timeout=30):
    """(status, body) of one GET over a blocking socket, chunked or not; for the parent's small reads."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n" % (
            path.encode(), HOST.encode(), port))
        reader, body = StreamReader(), []
        while not (reader.dechunker and reader.dechunker.done):
            data = sock.recv(1 << 20)
            if not data:
                break
            body.append(reader.feed_body(data))
    return reader.status, b"".join(body)


def metric(text, name):
    """One unlabelled sample of a Prometheus text exposition, or None."""
    found = re.search(r"^%s (\S+)$" % re.escape(name), text, re.MULTILINE)
    return None if found is None else float(found.group(1))


# --- the floor server -------------------------------------------------------------------------------

SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


class FloorConnection:
    __slots__ = ("sock", "fd", "rbuf", "out", "streaming")

    def __init__(self, sock):
        self.sock, self.fd = sock, sock.fileno()
        self.rbuf = self.out = b""
        self.streaming = False


class Floor:
    """The floor: the least work an SSE broadcaster can do. One epoll loop, frames encoded once,
    no database, no threads; what broker.py is compared with. Everything belongs to serve()."""

    def __init__(self, port):
        self.listener = socket.create_server((HOST, port), backlog=4096)
        self.listener.setblocking(False)
        self.epoll = select.epoll()
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        self.connections = {}     # fd -> FloorConnection, every accepted socket
        self.subscribers = {}     # fd -> FloorConnection streaming /events
        self.latest = {}          # event -> (id, frame): what a new subscriber is sent first
        self.last_id = 0
        self.stopping = False     # set by the SIGTERM handler; serve() notices within 0.2 s

    @property
    def port(self):
        return self.listener.getsockname()[1]

    def serve(self):
        listener = self.listener.fileno()
        while not self.stopping:
            for fd, mask in self.epoll.poll(0.2):
                if fd == listener:
                    self.accept()
                elif fd in self.connections:
                    self.on_ready(self.connections[fd], mask)
        for connection in list(self.connections.values()):
            self.close(connection)

    def accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = FloorConnection(sock)
            self.connections[connection.fd] = connection
            self.epoll.register(connection.fd, select.EPOLLIN)

    def on_ready(self, connection, mask):
        if mask & select.EPOLLOUT:
            self.flush(connection)
        if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            try:
                data = connection.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.close(connection)
            elif not connection.streaming:
                connection.rbuf += data
                self.serve_requests(connection)

    def serve_requests(self, connection):
        while not connection.streaming and connection.fd in self.connections:
            end = connection.rbuf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = connection.rbuf[:end].decode("latin-1")
            length = re.search(r"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
            stop = end + 4 + (int(length.group(1)) if length else 0)
            if len(connection.rbuf) < stop:
                return
            body, connection.rbuf = connection.rbuf[end + 4:stop], connection.rbuf[stop:]
            method, target = head.split(" ", 2)[:2]
            self.route(connection, method, target.split("?", 1)[0], body)

    def route(self, connection, method, path, body):
        if (method, path) == ("POST", "/insert"):
            self.insert(connection, body)
        elif (method, path) == ("GET", "/events"):
            self.subscribe(connection)
        elif (method, path) == ("GET", "/healthz"):
            self.reply(connection, 200, b'{"status":"ok","subscribers":%d,"last_id":%d}'
                       % (len(self.subscribers), self.last_id))
        else:
            self.reply(connection, 404, b'{"error":"the floor has no such endpoint"}')

    def insert(self, connection, body):
        try:
            message = json.loads(body)
            event, data = message["event"], json.dumps(message["data"], separators=(",", ":")).encode()
        except (ValueError, KeyError, TypeError):
            self.reply(connection, 400, b'{"error":"body must be {\\"event\\": ..., \\"data\\": ...}"}')
            return
        self.last_id += 1
        self.reply(connection, 200, b'{"id":%d,"event":%s,"timestamp":%d,"data":%s}' % (
            self.last_id, json.dumps(event).encode(), time.time_ns() // 1000, data))
        frame = b"id: %d\nevent: %s\ndata: %s\n\n" % (self.last_id, event.encode(), data)
        self.latest[event] = (self.last_id, frame)
        self.broadcast(b"%x\r\n%s\r\n" % (len(frame), frame))

    def subscribe(self, connection):
        connection.streaming = True
        self.subscribers[connection.fd] = connection
        frames = b"".join(frame for _, frame in sorted(self.latest.values()))
        sync = b"retry: 3000\n\n%sid: %d\n\n" % (frames, self.last_id)
        self.send(connection, SSE_HEAD + b"%x\r\n%s\r\n" % (len(sync), sync))

    def reply(self, connection, status, body):
        reason = b"OK" if status == 200 else b"Error"
        self.send(connection, b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (status, reason, len(body), body))

    def broadcast(self, payload):
        for connection in list(self.subscribers.values()):
            self.send(connection, payload)

    def send(self, connection, payload):
        if connection.out:                     # already waiting for EPOLLOUT: keep the order
            connection.out += payload
            return
        try:
            sent = connection.sock.send(payload)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.close(connection)
            return
        if sent < len(payload):
            connection.out = payload[sent:]
            self.epoll.modify(connection.fd, select.EPOLLIN | select.EPOLLOUT)

    def flush(self, connection):
        try:
            sent = connection.sock.send(connection.out)
        except BlockingIOError:
            return
        except OSError:
            self.close(connection)
            return
        connection.out = connection.out[sent:]
        if not connection.out:
            self.epoll.modify(connection.fd, select.EPOLLIN)

    def close(self, connection):
        if self.connections.pop(connection.fd, None) is None:
            return
        self.subscribers.pop(connection.fd, None)
        self.epoll.unregister(connection.fd)
        connection.sock.close()


def floor_main(argv):
    """`bench_broker.py --serve-floor --port 0 --db FILE --quiet`: the same shape as broker.py's."""
    parser = argparse.ArgumentParser(prog="bench_broker.py --serve-floor")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--db", default="(none)", help="ignored: the floor keeps nothing")
    parser.add_argument("--heartbeat", type=float, help="ignored: the floor sends no heartbeats")
    parser.add_argument("--quiet", action="store_true", help="ignored: the floor never logs")
    args, _ = parser.parse_known_args(argv)
    floor = Floor(args.port)

    def stop(*_):
        floor.stopping = True
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"floor listening on http://{HOST}:{floor.port} (db {args.db})", flush=True)
    floor.serve()
    return 0


# --- servers under test ------------------------------------------------------------------------------

class ServerProcess:
    """One server under test (broker.py or the floor), read through /proc: one process, or for a
    broker with workers > 1 a tree (the parent and its workers), whose figures are summed."""

    live = set()      # started and not yet stopped: cleanup() kills these on any exit

    def __init__(self, kind, command, workdir, workers=1, name=None, db=None, database=None):
        self.kind, self.command, self.workdir, self.workers = kind, command, workdir, workers
        self.name = name or kind  # its output files' name: nodes of one kind run at once
        self.db = db              # its --db: a file, or a postgresql:// URL
        self.database = database  # the PostgresDatabases db is on; None on SQLite
        self.process = self.port = None
        self.exit_code = self.stop_seconds = None

    def start(self, timeout=20.0):
        self.stdout = open(os.path.join(self.workdir, f"{self.name}.out"), "w+")
        self.stderr = open(os.path.join(self.workdir, f"{self.name}.err"), "w+")
        # --workers decides how many processes a broker has, not the caller's environment.
        environment = {name: value for name, value in os.environ.items() if name != "BROKER_WORKERS"}
        self.process = subprocess.Popen(self.command, stdout=self.stdout, stderr=self.stderr,
                                        stdin=subprocess.DEVNULL, env=environment,
                                        preexec_fn=prepare_server_process)
        ServerProcess.live.add(self)
        deadline = time.monotonic() + timeout
        while self.port is None:
            self.stdout.seek(0)
            found = LISTENING.search(self.stdout.read())
            if found:
                self.port = int(found.group(1))
            elif self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} did not start: {' '.join(self.command)}\n{self.stderr_tail()}")
            else:
                time.sleep(0.02)
        if self.workers > 1:
            self.check_workers()
        return self

    def check_workers(self):
        """Fail at once, rather than measure the wrong thing, unless /healthz reports the workers asked for."""
        status, body = http_get(self.port, "/healthz", timeout=10)
        reported = json.loads(body).get("workers") if status == 200 else f"status {status}"
        if reported != self.workers:
            self.stop()
            raise RuntimeError(f"{self.kind}: asked for {self.workers} workers, GET /healthz says {reported}")

    @property
    def pid(self):
        return self.process.pid

    def read_proc(self, read):
        """read(pid) for a server in one process; summed over the tree for a broker with workers."""
        if self.workers == 1:
            return read(self.pid)
        return summed_over(process_tree(self.pid), read)

    def cpu_seconds(self):
        if self.workers == 1:
            return cpu_seconds(self.pid)
        return summed_over(process_tree(self.pid), cpu_and_reaped_seconds)

    def waited_seconds(self):
        return self.read_proc(runqueue_seconds)

    def rss_kib(self):
        # Summed over a tree, pages the workers share (forked from one parent) count once in each.
        return self.read_proc(lambda pid: memory_kib(pid, "VmRSS"))

    def peak_kib(self):
        # Summed over a tree: each process's own peak, whenever it came, so at most the tree's peak.
        return self.read_proc(lambda pid: memory_kib(pid, "VmHWM"))

    def reset_peak(self):
        self.read_proc(reset_peak_memory)

    def descendants(self):
        """{pid: start time} of every process below this server's, while it runs; {} for one process."""
        if self.workers == 1 or self.process.poll() is not None:
            return {}
        return {pid: start_time(pid) for pid in process_tree(self.pid)[1:]}

    def stop(self, timeout=15.0):
        """SIGTERM, and SIGKILL if it has not exited within timeout; records how it went."""
        if self.process is None or self.exit_code is not None:
            return
        started = time.monotonic()
        workers = self.descendants()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.exit_code = "killed"
        self.stop_seconds = time.monotonic() - started
        ServerProcess.live.discard(self)
        errors = self.stderr_tail()          # a traceback from the server is worth seeing at once
        outlived = kill_survivors(workers)
        if self.exit_code != 0 or self.stop_seconds > 2 or errors or outlived:
            orphans = f"; {outlived} of its processes outlived it and were killed" if outlived else ""
            log(f"  ! {self.name} exited with {self.exit_code}, {self.stop_seconds:.1f} s after SIGTERM"
                f"{orphans}\n{errors}")
        self.stdout.close()
        self.stderr.close()

    def kill(self):
        """SIGKILL the server and, since a worker runs in its own session, each of its processes."""
        if self.process.poll() is None:
            workers = self.descendants()
            self.process.kill()
            self.process.wait(5)
            kill_survivors(workers)
        ServerProcess.live.discard(self)

    def stderr_tail(self, lines=15):
        self.stderr.seek(0)
        return "".join(self.stderr.readlines()[-lines:])

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()


def still_running(pid, started):
    """Whether pid is still the process that started then, and not a zombie."""
    try:
        fields = stat_fields(pid)
    except OSError:
        return False
    return int(fields[19]) == started and fields[0] != b"Z"


def kill_survivors(processes, patience=2.0):
    """SIGKILL those of {pid: start time} still running after patience s (a pid whose start time
    changed is another process now, and is left alone); how many there were."""
    deadline = time.monotonic() + patience
    alive = list(processes.items())
    while True:
        alive = [(pid, started) for pid, started in alive if still_running(pid, started)]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for pid, _started in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(alive)


class Nodes:
    """broker.py nodes on one database, started one after the other and measured as one server
    (a Meter reads it): CPU and run-queue wait summed over the nodes; database is the PostgreSQL
    server they share (None for a single node on SQLite)."""

    def __init__(self, bench, count, extra=(), store=None):
        self.servers = [bench.server(bench.broker, extra, store=store)]
        try:
            for _ in range(count - 1):
                self.servers.append(bench.server(bench.broker, extra, db=self.servers[0].db))
        except BaseException:
            self.stop()
            raise
        self.database = self.servers[0].database
        self.exit_code = self.stop_seconds = None

    @property
    def ports(self):
        return [server.port for server in self.servers]

    def cpu_seconds(self):
        return sum(server.cpu_seconds() for server in self.servers)

    def waited_seconds(self):
        return sum(server.waited_seconds() for server in self.servers)

    def stop(self):
        """Stop every node; exit_code is the first that is not 0, stop_seconds the longest stop."""
        for server in self.servers:
            server.stop()
        codes = [server.exit_code for server in self.servers]
        self.exit_code = next((code for code in codes if code != 0), 0)
        self.stop_seconds = max(server.stop_seconds or 0 for server in self.servers)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()


class PostgresDatabases:
    """The PostgreSQL server of --db postgres (a private cluster: test_postgres.PostgresServer,
    fsync on, so a commit is as durable as SQLite's --sync full) or of --db postgresql://...,
    whose user must be allowed to CREATE DATABASE. new() makes each broker start an empty
    database of its own; close() drops those made on a server of the user's, or removes the
    private cluster whole. The server's CPU and run-queue wait are those of the postmaster and
    every child of it (a backend per connection, the WAL writer, autovacuum, ...), read from /proc
    when the server runs on this machine. psycopg is imported here, and only for PostgreSQL."""

    def __init__(self, url=None):
        import psycopg
        self.psycopg = psycopg
        self.cluster, self.created = None, []
        if url is None:
            from test_postgres import PostgresServer
            self.cluster = PostgresServer(fsync=True)
            url = self.cluster.url()
        self.url = url
        try:
            with self.connect(url) as db:
                self.version = db.execute("SHOW server_version").fetchone()[0].split()[0]   # "15.18 (Debian ...)"
                may_create = db.execute("SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user"
                                        ).fetchone()[0]
                self.postmaster = postmaster_of(db.execute("SELECT pg_backend_pid()").fetchone()[0])
            if not may_create:
                raise RuntimeError(f"the user of {url} may not CREATE DATABASE, and every broker start gets "
                                   f"a new one: ALTER ROLE ... CREATEDB, or use --db postgres")
        except BaseException:
            self.close()
            raise

    def describe(self):
        address = urllib.parse.urlsplit(self.url)
        where = "a private cluster, fsync on" if self.cluster else f"{address.hostname}:{address.port or 5432}"
        return f"PostgreSQL {self.version} ({where})"

    def connect(self, url):
        return self.psycopg.connect(url, autocommit=True, connect_timeout=10)

    def new(self):
        """The postgresql:// URL of a new, empty database on the server."""
        name = f"bench_broker_{os.getpid()}_{len(self.created) + 1}"
        with self.connect(self.url) as db:
            db.execute(f"CREATE DATABASE {name}")
        self.created.append(name)
        return urllib.parse.urlsplit(self.url)._replace(path="/" + name).geturl()

    def tables_mib(self, url):
        """broker.py's tables in the database at url, with their indexes and TOAST, in MiB."""
        with self.connect(url) as db:
            size = db.execute("SELECT coalesce(sum(pg_total_relation_size(to_regclass(name))), 0)"
                              " FROM unnest(%s::text[]) AS name", (list(BROKER_TABLES),)).fetchone()[0]
        return int(size) / 2 ** 20

    def cpu_seconds(self):
        # cutime too: a backend that ended (its broker stopped) leaves its CPU time in the postmaster's.
        return summed_over(process_tree(self.postmaster), cpu_and_reaped_seconds)

    def waited_seconds(self):
        return summed_over(process_tree(self.postmaster), runqueue_seconds)

    def close(self):
        if self.cluster is not None:
            self.cluster.close()
            return
        try:
            with self.connect(self.url) as db:
                for name in self.created:
                    db.execute(f"DROP DATABASE IF EXISTS {name}")
        except self.psycopg.Error as error:
            log(f"could not drop the databases made on {urllib.parse.urlsplit(self.url).netloc}: "
                f"{', '.join(self.created)}: {error}")


def is_postgres_url(db):
    return db.startswith(("postgresql://", "postgres://"))      # as broker.py tells its stores apart


def postmaster_of(backend):
    """The postmaster's pid: the parent of the backend serving a connection, if that backend is a
    process of this machine (its command line says postgres); else None."""
    try:
        with open(f"/proc/{backend}/cmdline", "rb") as file:
            if not file.read().startswith(b"postgres"):
                return None
        return int(stat_fields(backend)[1])
    except (OSError, IndexError, ValueError):
        return None


# --- client processes ---------------------------------------------------------------------------------

FORK = multiprocessing.get_context("fork")     # clients inherit everything; no pickling of setup


class ClientProcess:
    """A client function run in its own process; it and the parent talk over a Pipe."""

    live = set()

    def __init__(self, function, **kwargs):
        self.pipe, child_end = FORK.Pipe()
        self.process = FORK.Process(target=run_client, args=(child_end, function, kwargs), daemon=True)
        self.process.start()
        child_end.close()
        ClientProcess.live.add(self)

    def send(self, message):
        self.pipe.send(message)

    def receive(self, timeout):
        if not self.pipe.poll(timeout):
            raise TimeoutError(f"a client process gave no answer within {timeout:.0f} s")
        try:
            message = self.pipe.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"a client process died without answering "
                               f"(exit code {self.process.exitcode})") from None
        if isinstance(message, dict) and "error" in message:
            raise RuntimeError(f"client process failed:\n{message['error']}")
        return message

    def finish(self, timeout=10.0):
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        ClientProcess.live.discard(self)


def run_client(pipe, function, kwargs):
    try:
        raise_open_file_limit()
        function(pipe, **kwargs)
    except KeyboardInterrupt:
        pass
    except BaseException:
        try:
            pipe.send({"error": traceback.format_exc()})
        except OSError:
            pass


def run_in_client(function, timeout, **kwargs):
    """Run function(pipe, **kwargs) in a client process and return the one answer it sends."""
    client = ClientProcess(function, **kwargs)
    try:
        return client.receive(timeout)
    finally:
        client.finish()


class Subscriber:
    """One /events stream as a client sees it: when it started, synced, and every live frame."""
    __slots__ = ("sock", "reader", "started", "synced", "sync_id", "sync_frames",
                 "ids", "latencies", "last_id", "closed")

    def __init__(self):
        self.sock = self.reader = self.sync_id = None
        self.started = self.synced = 0.0
        self.sync_frames = 0
        self.ids = array.array("q")
        self.latencies = array.array("q")     # ns from the publisher's send to this receive, -1 unknown
        self.last_id = 0
        self.closed = None                    # why the stream ended early, if it did


class SubscriberClient:
    """Many /events streams in one process and one epoll loop; connects at most `inflight` at a time."""

    def __init__(self, port, count, inflight, path):
        self.address = (HOST, port)
        self.request = b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nAccept: text/event-stream\r\n\r\n" % (
            path.encode(), HOST.encode(), port)
        self.subs = [Subscriber() for _ in range(count)]
        self.waiting = list(reversed(self.subs))    # not yet connecting
        self.inflight_limit = inflight
        self.inflight = 0
        self.unsettled = count                      # neither synced nor failed
        self.streaming = 0                          # synced and still open
        self.by_fd = {}
        self.epoll = select.epoll()
        self.target = float("inf")                  # a stream is done once it has seen this id
        self.done = 0
        self.last_frame_ns = 0

    def open_more(self):
        while self.waiting and self.inflight < self.inflight_limit:
            sub = self.waiting.pop()
            sub.started = time.time()
            sub.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sub.sock.setblocking(False)
            self.inflight += 1
            error = sub.sock.connect_ex(self.address)
            if error not in (0, errno.EINPROGRESS):
                self.fail(sub, f"connect: {errno.errorcode.get(error, error)}")
                continue
            self.by_fd[sub.sock.fileno()] = sub
            self.epoll.register(sub.sock.fileno(), select.EPOLLOUT)

    def poll(self, timeout):
        events = self.epoll.poll(timeout)
        now_ns = time.time_ns()        # one clock read per wake-up: the data was ready by then
        for fd, _mask in events:
            sub = self.by_fd.get(fd)
            if sub is None:
                continue
            if sub.reader is None:
                self.send_request(sub)
            else:
                self.read(sub, now_ns)

    def send_request(self, sub):
        error = sub.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self.fail(sub, f"connect: {errno.errorcode.get(error, error)}")
            return
        try:
            sub.sock.send(self.request)
        except OSError as error:
            self.fail(sub, f"send: {error.strerror}")
            return
        sub.reader = StreamReader()
        self.epoll.modify(sub.sock.fileno(), select.EPOLLIN)

    def read(self, sub, now_ns):
        try:
            data = sub.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError as error:
            data, reason = b"", f"recv: {error.strerror}"
        else:
            reason = "closed by the server"
        if not data:
            self.fail(sub, reason)
            return
        for message in sub.reader.feed(data):
            self.on_message(sub, message, now_ns)
        if sub.reader.status not in (None, 200):
            self.fail(sub, f"status {sub.reader.status}")

    def on_message(self, sub, message, now_ns):
        ident, data = sse_fields(message)
        if sub.sync_id is None:
            if data is not None:
                sub.sync_frames += 1
            elif ident is not None:                  # the id-only block: the sync is complete
                sub.sync_id, sub.synced = ident, time.time()
                self.inflight -= 1
                self.unsettled -= 1
                self.streaming += 1
            return
        if data is None:
            return                                   # a heartbeat comment
        sent = SENT.search(data)           # a regex, not json.loads: the client must stay cheap
        sent = int(sent.group(1)) if sent else -1
        sub.ids.append(ident)
        sub.latencies.append(now_ns - sent if sent > 0 else -1)
        self.last_frame_ns = now_ns
        if sub.last_id < self.target <= ident:
            self.done += 1
        sub.last_id = max(sub.last_id, ident)

    def fail(self, sub, reason):
        if sub.sock is not None and sub.sock.fileno() in self.by_fd:
            self.epoll.unregister(sub.sock.fileno())
            del self.by_fd[sub.sock.fileno()]
        if sub.sock is not None:
            sub.sock.close()
        if sub.closed is None:
            sub.closed = reason
            if sub.sync_id is None:
                self.inflight -= 1
                self.unsettled -= 1
            else:
                self.streaming -= 1

    def expect(self, last_id):
        """From now on count streams that have seen last_id (or beyond)."""
        self.target = last_id
        self.done = sum(1 for sub in self.subs if sub.last_id >= last_id)

    def close(self):
        for sub in self.subs:
            if sub.sock is not None:
                sub.sock.close()
        self.epoll.close()


def subscriber_worker(pipe, port, count, inflight, path, sync_timeout):
    """Client process: open `count` streams, report once they are synced, record live frames
    until the parent says which ids to expect, then report what arrived."""
    client = SubscriberClient(port, count, inflight, path)
    pipe.send("ready")
    if not pipe.poll(30):
        return
    pipe.recv()                                       # "go": every worker starts together
    cpu, started = own_cpu_seconds(), time.time()
    deadline = time.monotonic() + sync_timeout
    while client.unsettled and time.monotonic() < deadline:
        client.open_more()
        client.poll(0.05)
    pipe.send(sync_report(client, own_cpu_seconds() - cpu, time.time() - started))
    cpu, started = own_cpu_seconds(), time.time()
    command = wait_for_command(client, pipe, deadline=time.monotonic() + 600)
    if command is None or command[0] != "expect":
        client.close()
        return
    _, expected_ids, grace = command
    client.expect(max(expected_ids, default=0))
    deadline = time.monotonic() + grace
    while client.done < client.streaming and time.monotonic() < deadline:
        client.poll(0.05)
    pipe.send(live_report(client, expected_ids, own_cpu_seconds() - cpu, time.time() - started))
    client.close()


def wait_for_command(client, pipe, deadline):
    """Keep reading the streams until the parent sends a command (or goes away)."""
    while time.monotonic() < deadline:
        if pipe.poll():
            try:
                return pipe.recv()
            except EOFError:
                return None
        client.poll(0.02)
    return None


def sync_report(client, cpu, wall):
    synced = [sub for sub in client.subs if sub.sync_id is not None]
    failures = {}
    for sub in client.subs:
        if sub.sync_id is None:
            reason = sub.closed or "no sync before the deadline"
            failures[reason] = failures.get(reason, 0) + 1
    return {"synced": len(synced), "failures": failures,
            "sync_seconds": [sub.synced - sub.started for sub in synced],
            "first_start": min((sub.started for sub in client.subs if sub.started), default=None),
            "last_sync": max((sub.synced for sub in synced), default=None),
            "sync_frames_min": min((sub.sync_frames for sub in synced), default=0),
            "sync_frames_max": max((sub.sync_frames for sub in synced), default=0),
            "cpu": cpu, "wall": wall}


def live_report(client, expected_ids, cpu, wall):
    """Lost, duplicated and out-of-order frames per (stream, record) pair, and their latencies
    grouped by the worker that serves the stream (None for a broker in one process)."""
    expected = set(expected_ids)
    lost = duplicated = disordered = unexpected = delivered = 0
    latencies_by_worker, subscribers_by_worker = {}, {}
    for sub in client.subs:
        if sub.sync_id is None:
            continue
        worker = sub.reader.worker
        subscribers_by_worker[worker] = subscribers_by_worker.get(worker, 0) + 1
        latencies = latencies_by_worker.setdefault(worker, array.array("q"))
        seen, highest = set(), 0
        for ident, latency in zip(sub.ids, sub.latencies):
            delivered += 1
            if ident in seen:
                duplicated += 1
                continue
            if ident < highest:
                disordered += 1
            highest = max(highest, ident)
            seen.add(ident)
            if ident not in expected:
                unexpected += 1
            elif latency >= 0:
                latencies.append(latency)
        lost += len(expected - seen)
    closed = sum(1 for sub in client.subs if sub.sync_id is not None and sub.closed)
    return {"delivered": delivered, "lost": lost, "duplicated": duplicated, "disordered": disordered,
            "unexpected": unexpected, "closed": closed, "latencies_by_worker": latencies_by_worker,
            "subscribers_by_worker": subscribers_by_worker, "last_frame_ns": client.last_frame_ns,
            "cpu": cpu, "wall": wall}


def merge_by_worker(parts):
    """{broker.py worker: figure} over every client process: counts added, latency arrays joined."""
    merged = {}
    for part in parts:
        for worker, value in part.items():
            merged[worker] = merged[worker] + value if worker in merged else value
    return merged


class SubscriberPool:
    """`count` subscribers spread over client processes: the parent's handle on them. port may be
    a list (broker nodes): the processes take its ports in turn."""

    def __init__(self, bench, port, count, path="/events", sync_timeout=None):
        ports = port if isinstance(port, list) else [port]
        processes = max(len(ports), min(bench.args.client_procs, count // 50))
        self.count = count
        self.sync_timeout = sync_timeout or max(30.0, count / 100)
        inflight = split_evenly(bench.args.inflight, processes)
        self.ports = [ports[i % len(ports)] for i in range(processes)]
        self.workers = [ClientProcess(subscriber_worker, port=port, count=share, inflight=max(1, limit),
                                      path=path, sync_timeout=self.sync_timeout)
                        for port, share, limit in zip(self.ports, split_evenly(count, processes), inflight)]
        for worker in self.workers:
            worker.receive(30)
        for worker in self.workers:
            worker.send("go")

    def wait_synced(self):
        """Merged sync figures of every worker: counts, per-stream sync seconds, wall span."""
        reports = [worker.receive(self.sync_timeout + 30) for worker in self.workers]
        failures = {}
        for report in reports:
            for reason, n in report["failures"].items():
                failures[reason] = failures.get(reason, 0) + n
        starts = [r["first_start"] for r in reports if r["first_start"]]
        ends = [r["last_sync"] for r in reports if r["last_sync"]]
        return {"synced": sum(r["synced"] for r in reports), "failed": sum(failures.values()),
                "failures": failures,
                "sync_seconds": sorted(s for r in reports for s in r["sync_seconds"]),
                "span": max(ends) - min(starts) if starts and ends else None,
                "sync_frames_min": min(r["sync_frames_min"] for r in reports),
                "sync_frames_max": max(r["sync_frames_max"] for r in reports),
                "client_cpu_pct": max(per(r["cpu"], r["wall"], 100) or 0 for r in reports)}

    def collect(self, expected_ids, grace):
        """Tell the workers which ids were published; merged delivery figures once all arrived."""
        ids = list(expected_ids)
        for worker in self.workers:
            worker.send(("expect", ids, grace))
        reports = [worker.receive(grace + 30) for worker in self.workers]
        merged = {key: sum(r[key] for r in reports)
                  for key in ("delivered", "lost", "duplicated", "disordered", "unexpected", "closed")}
        for key in ("latencies_by_worker", "subscribers_by_worker"):
            merged[key] = merge_by_worker(r[key] for r in reports)
        merged["latencies"] = [ns for latencies in merged["latencies_by_worker"].values() for ns in latencies]
        merged["latencies_by_port"] = merge_by_worker(
            {port: array.array("q", [ns for part in r["latencies_by_worker"].values() for ns in part])}
            for port, r in zip(self.ports, reports))
        merged["subscribers_by_port"] = merge_by_worker(
            {port: sum(r["subscribers_by_worker"].values())} for port, r in zip(self.ports, reports))
        merged["last_frame_ns"] = max(r["last_frame_ns"] for r in reports)
        merged["client_cpu_pct"] = max(per(r["cpu"], r["wall"], 100) or 0 for r in reports)
        merged["client_cpu_s"] = sum(r["cpu"] for r in reports)
        return merged

    def close(self):
        for worker in self.workers:
            try:
                worker.send(("close",))
            except OSError:
                pass
        for worker in self.workers:
            worker.finish()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class SlowReader:
    """One /events stream read a little at a time, as over a slow link: how far it got, in what order."""
    __slots__ = ("sock", "reader", "sync_id", "last_id", "frames", "bytes", "skipped", "repeated",
                 "ages", "closed")

    def __init__(self, sock):
        self.sock, self.reader = sock, StreamReader()
        self.sync_id = None
        self.last_id = self.frames = self.bytes = self.skipped = self.repeated = 0
        self.ages = []            # (receive time ns, age in ns of the newest record it received then)
        self.closed = None        # why the stream ended, if it did

    def read(self, size, now_ns):
        if self.closed:
            return
        try:
            data = self.sock.recv(size)
        except BlockingIOError:
            return
        except OSError as error:
            data, reason = b"", f"recv: {error}"
        else:
            reason = "closed by the server"
        if not data:
            self.closed = reason
            return
        newest_sent = None
        for message in self.reader.feed(data):
            ident, body = sse_fields(message)
            if self.sync_id is None:
                if body is None and ident is not None:
                    self.sync_id = self.last_id = ident      # the id-only block ends the sync
                continue
            if body is None:
                continue                                     # a heartbeat comment
            self.frames += 1
            self.bytes += len(message) + 2
            if ident <= self.last_id:
                self.repeated += 1
                continue
            self.skipped += ident - self.last_id - 1         # one event, so the ids are consecutive
            self.last_id = ident
            sent = SENT.search(body)
            newest_sent = int(sent.group(1)) if sent else newest_sent
        if newest_sent is not None:
            self.ages.append((now_ns, now_ns - newest_sent))

    def report(self):
        return {"synced": self.sync_id is not None, "last_id": self.last_id, "frames": self.frames,
                "bytes": self.bytes, "skipped": self.skipped, "repeated": self.repeated,
                "ages": self.ages, "closed": self.closed}


def slow_reader_worker(pipe, port, count, read_bytes, interval, pause):
    """Client process: open `count` /events streams with receive buffers of read_bytes and read
    each sync; then read nothing for pause seconds, then take read_bytes from each every interval
    seconds until the parent asks how far each got."""
    request = b"GET /events HTTP/1.1\r\nHost: %s:%d\r\nAccept: text/event-stream\r\n\r\n" % (
        HOST.encode(), port)
    readers = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, read_bytes)   # before connect: a small window
        # ... and an Ethernet-sized MSS, not loopback's 64 KiB, so the broker's send buffer for this
        # socket stays as small as for a remote reader and it writes (and catches up) often.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1460)
        sock.settimeout(10)
        sock.connect((HOST, port))
        sock.sendall(request)
        readers.append(SlowReader(sock))
    for reader in readers:             # the sync is read at once, so the stream is live before it stalls
        while reader.sync_id is None and not reader.closed:
            reader.read(read_bytes, time.time_ns())
        reader.sock.setblocking(False)
    pipe.send(sum(1 for r in readers if r.sync_id is not None and not r.closed))
    started = time.monotonic()
    next_read = started + pause
    while not pipe.poll(max(0.0, next_read - time.monotonic())):
        now_ns = time.time_ns()
        for reader in readers:
            reader.read(read_bytes, now_ns)
        next_read += interval
    pipe.recv()                        # "report"
    pipe.send({"readers": [reader.report() for reader in readers],
               "read_seconds": max(0.0, time.monotonic() - started - pause)})
    for reader in readers:
        reader.sock.close()


class InsertConnection:
    __slots__ = ("sock", "buf", "sent_ns", "busy", "quickack")

    def __init__(self, port, quickack):
        self.sock = socket.create_connection((HOST, port), timeout=10)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.sent_ns = 0
        self.busy = False
        self.quickack = quickack


class Publisher:
    """Keep-alive /insert connections with one request in flight on each. rate > 0 paces them
    (record k is due k / rate s after the start); rate 0 is closed-loop, as fast as acknowledged.
    batch > 0 sends arrays of that many records; on_progress(acknowledged) is called each time
    another `progress` records have been acknowledged."""

    def __init__(self, port, connections, count, seconds, event, rate, distinct, quickack, pad=0, batch=0,
                 progress=0, on_progress=None):
        self.port, self.count, self.event, self.rate, self.distinct = port, count, event, rate, distinct
        self.pad, self.batch = pad, batch
        self.progress, self.on_progress = progress, on_progress
        self.next_progress = progress
        self.conns = [InsertConnection(port, quickack) for _ in range(connections)]
        self.by_fd = {conn.sock.fileno(): conn for conn in self.conns}
        self.epoll = select.epoll()
        for fd in self.by_fd:
            self.epoll.register(fd, select.EPOLLIN)
        self.ids, self.latencies, self.statuses = array.array("q"), array.array("q"), {}
        self.workers = {}      # Broker-Worker (None without one) -> responses it sent
        self.seq, self.slip = 0, 0.0
        self.started = time.monotonic()
        self.stop_at = self.started + seconds

    def run(self, grace):
        """Send until count or seconds is reached, then wait (up to grace) for the last answers."""
        while True:
            now = time.monotonic()
            sending = self.seq < self.count and now < self.stop_at
            if not sending and not any(conn.busy for conn in self.conns) or now > self.stop_at + grace:
                return
            if sending:
                self.send_due(now)
            for fd, _mask in self.epoll.poll(self.wait_time()):
                read_acks(self.by_fd[fd], self.ids, self.latencies, self.statuses, self.workers)
                if self.progress and len(self.ids) >= self.next_progress:
                    self.on_progress(len(self.ids))
                    self.next_progress = (len(self.ids) // self.progress + 1) * self.progress

    def due(self, now):
        return self.started + self.seq / self.rate if self.rate else now

    def send_due(self, now):
        for conn in self.conns:
            if conn.busy or self.seq >= self.count or now < self.due(now):
                continue
            self.slip = max(self.slip, now - self.due(now))
            size = min(self.batch, self.count - self.seq) if self.batch else 1
            names = [f"{self.event}{seq % self.distinct}" if self.distinct else self.event
                     for seq in range(self.seq, self.seq + size)]
            if self.batch:
                request = batch_request(self.port, names, self.seq)
            else:
                request = insert_request(self.port, names[0], self.seq, self.pad)
            if self.pad or self.batch:     # a large request may not fit the socket buffer: send it whole
                conn.sock.settimeout(10)
                conn.sock.sendall(request)
                conn.sock.setblocking(False)
            else:
                conn.sock.send(request)
            conn.sent_ns, conn.busy = time.monotonic_ns(), True
            self.seq += size

    def wait_time(self):
        if self.rate and self.seq < self.count:
            return max(0.0, min(self.due(0) - time.monotonic(), 0.05))
        return 0.05

    def close(self):
        for conn in self.conns:
            conn.sock.close()
        self.epoll.close()


def publisher_worker(pipe, port, connections, count, seconds, event, rate=0.0, distinct=0, grace=10.0,
                     quickack=False, pad=0, batch=0, progress=0):
    """Client process: run a Publisher; the answer lists every acknowledged id, each request's
    latency and how many responses each of broker.py's workers sent. quickack ACKs every response
    at once, so a server's Nagle delay cannot slow a bulk load. progress > 0 also sends
    ("progress", acknowledged) every that many records."""
    cpu = own_cpu_seconds()
    publisher = Publisher(port, connections, count, seconds, event, rate, distinct, quickack, pad, batch,
                          progress, lambda acked: pipe.send(("progress", acked)))
    publisher.run(grace)
    publisher.close()
    pipe.send({"ids": publisher.ids, "latencies": publisher.latencies, "statuses": publisher.statuses,
               "workers": publisher.workers, "sent": publisher.seq,
               "unanswered": sum(conn.busy for conn in publisher.conns),
               "slip": publisher.slip, "seconds": time.monotonic() - publisher.started,
               "cpu": own_cpu_seconds() - cpu})


def read_acks(conn, ids, latencies, statuses, workers):
    data = conn.sock.recv(65536)
    if not data:
        raise ConnectionError("the server closed a keep-alive /insert connection")
    if conn.quickack:                  # Linux clears it after each ACK: set it again every read
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    conn.buf += data
    while True:
        response = split_response(conn.buf)
        if response is None:
            return
        status, head, body, conn.buf = response
        worker = answering_worker(head)
        workers[worker] = workers.get(worker, 0) + 1
        if status == 200:
            answer = json.loads(body)
            if isinstance(answer, list):          # a batch: its records, in the order sent
                ids.extend(record["id"] for record in answer)
            else:
                ids.append(answer["id"])
            latencies.append(time.monotonic_ns() - conn.sent_ns)
        else:
            statuses[status] = statuses.get(status, 0) + 1
        conn.busy = False


def fetch_worker(pipe, port, path, socket_timeout):
    """Client process: one GET; time to the first response byte, to the end, size, entry count."""
    sock = socket.create_connection((HOST, port), timeout=socket_timeout)
    cpu, started = own_cpu_seconds(), time.monotonic()
    sock.sendall(b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n" % (
        path.encode(), HOST.encode(), port))
    reader, first, body = StreamReader(), None, []
    while not (reader.dechunker and reader.dechunker.done):
        data = sock.recv(1 << 20)
        if first is None:
            first = time.monotonic() - started
        if not data:
            break
        body.append(reader.feed_body(data))
    total = time.monotonic() - started
    sock.close()
    body = b"".join(body)
    entries = len(json.loads(body)) if reader.status == 200 else None
    pipe.send({"status": reader.status, "first_byte": first, "total": total, "bytes": len(body),
               "entries": entries, "cpu": own_cpu_seconds() - cpu})


def publish(bench, server, count, seconds, event, connections=1, rate=0.0, distinct=0, quickack=False,
            pad=0, batch=0):
    """Run a publisher process against server and return its answer."""
    timeout = min(seconds, count / rate if rate else seconds) + 60
    return run_in_client(publisher_worker, timeout, port=server.port, connections=connections,
                         count=count, seconds=seconds, event=event, rate=rate, distinct=distinct,
                         quickack=quickack, pad=pad, batch=batch)


# --- the report ---------------------------------------------------------------------------------------

# A row's target is None, one (op, limit) or a list of them. Ops ending in x are ratios to the floor,
# in w ratios to the table's base (the broker in one process unless it names another; judged for each
# other broker column); the rest are values.
TARGET_TEXT = {"<=x": "<= {}x floor", ">=x": ">= {}x floor", "<=w": "<= {}x {base}", ">=w": ">= {}x {base}",
               "<=": "<= {}", "<": "< {}", ">=": ">= {}", "==": "= {}"}
TARGET_TEST = {"<=x": lambda v, t: v <= t, ">=x": lambda v, t: v >= t, "<=w": lambda v, t: v <= t,
               ">=w": lambda v, t: v >= t, "<=": lambda v, t: v <= t, "<": lambda v, t: v < t,
               ">=": lambda v, t: v >= t, "==": lambda v, t: v == t}


def broker_kind(workers):
    """What broker.py with that many workers is called in logs, tables and JSON."""
    return "broker" if workers == 1 else f"{workers} workers"


def ratio(broker, floor):
    if broker is None or floor is None or isinstance(broker, str) or not floor:
        return None
    return broker / floor


def verdict_over(op, limit, judged):
    """ok, MISS or ? for one target over [(broker column, value)]; a MISS names its columns when
    there are several. A column without a value is passed over, unless none has one."""
    known = [(kind, value) for kind, value in judged if value is not None and not isinstance(value, str)]
    if not known:
        return "?"
    missed = [kind for kind, value in known if not TARGET_TEST[op](value, limit)]
    if not missed:
        return "ok"
    return "MISS" + (f" ({', '.join(missed)})" if len(judged) > 1 else "")


def number(value):
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 100:
        return f"{value:,.0f}"
    for limit, digits in ((100, 0), (10, 1), (1, 2)):
        if abs(value) >= limit:
            return f"{value:,.{digits}f}"
    return f"{value:.3f}" if value else "0"


def median_of(runs, key):
    values = [run.get(key) for run in runs if run.get(key) is not None]
    if not values:
        return None
    if isinstance(values[0], str):
        return values[-1]
    value = statistics.median(values)
    return int(value) if all(isinstance(v, int) for v in values) and float(value).is_integer() else value


class Table:
    """One scenario's figures: rows of (label, run key, target), medians of the runs per server.
    Servers come in the order of runs: brokers (one per --workers count, the first compared with
    the floor), then the floor; each broker with workers also gets a column of its ratio to 1 worker.
    base = (kind, in the header, in targets) names another column for those ratios, as the nodes
    scenario compares PostgreSQL with SQLite."""

    def __init__(self, title, runs, rows, notes=(), base=None):
        self.title, self.runs, self.rows, self.notes = title, runs, rows, list(notes)
        self.kinds = [kind for kind in runs if runs[kind]]
        self.brokers = [kind for kind in self.kinds if kind != "floor"]
        self.base, self.base_header, self.base_text = base or (broker_kind(1), "1", "1 worker")
        self.scaled = [kind for kind in self.brokers if kind != self.base] if self.base in self.brokers else []
        self.floor_ratio = bool(self.brokers) and "floor" in self.kinds

    def figures(self):
        """Per row: label, key, {server: median}, first broker / floor, {broker: ratio to 1 worker},
        and a (target text, verdict) for each target this table can judge."""
        for label, key, target in self.rows:
            values = {kind: median_of(self.runs[kind], key) for kind in self.kinds}
            first = values[self.brokers[0]] if self.brokers else None
            to_single = {kind: ratio(values[kind], values[self.base]) for kind in self.scaled}
            targets = [] if target is None else target if isinstance(target, list) else [target]
            judged = [self.judge(op, limit, values, to_single) for op, limit in targets]
            yield (label, key, values, ratio(first, values.get("floor")), to_single,
                   [pair for pair in judged if pair])

    def judge(self, op, limit, values, to_single):
        """(target text, verdict) over every broker column the target concerns; None when there is
        none (a target against 1 worker, in a table without both 1 worker and more)."""
        if op.endswith("w"):
            judged = list(to_single.items())
        elif op.endswith("x"):
            judged = [(kind, ratio(values[kind], values.get("floor"))) for kind in self.brokers]
        else:
            judged = [(kind, values[kind]) for kind in self.brokers]
        if not judged:
            return None
        return TARGET_TEXT[op].format(limit, base=self.base_text), verdict_over(op, limit, judged)

    def lines(self):
        repeats = max(len(self.runs[kind]) for kind in self.kinds)
        scaled = {kind: f"{kind} / {self.base_header}" for kind in self.scaled}
        widths = {kind: max(15, len(header) + 2) for kind, header in scaled.items()}
        out = [f"== {self.title}" + (f"  (median of {repeats} runs each)" if repeats > 1 else ""),
               f"  {'':38}" + "".join(f"{kind:>12}" for kind in self.kinds)
               + (f"{'broker/floor':>14}" if self.floor_ratio else "")
               + "".join(f"{header:>{widths[kind]}}" for kind, header in scaled.items()) + "  target"]
        for label, _key, values, quotient, to_single, judged in self.figures():
            line = f"  {label:38}" + "".join(f"{number(values[kind]):>12}" for kind in self.kinds)
            line += f"{number(quotient):>14}" if self.floor_ratio else ""
            line += "".join(f"{number(to_single[kind]):>{widths[kind]}}" for kind in self.scaled)
            if judged:
                (text, verdict), *more = judged
                line += f"  {text:16} {verdict}" + "".join(f"; {text} {verdict}" for text, verdict in more)
            out.append(line)
        return out + [f"  note: {note}" for note in self.notes]

    def to_json(self):
        rows = [{"metric": label, "key": key, **values, "ratio": quotient,
                 **({f"ratio_to_{'1_worker' if self.base == broker_kind(1) else self.base}": to_single}
                    if to_single else {}),
                 "target": "; ".join(text for text, _ in judged) or None,
                 "verdict": "; ".join(verdict for _, verdict in judged) or None}
                for label, key, values, quotient, to_single, judged in self.figures()]
        return {"title": self.title, "rows": rows, "notes": self.notes, "runs": self.runs}


class SeriesTable:
    """Figures taken one after another (a column per figure, a row per moment); prints and
    saves like a Table, without servers to compare."""

    def __init__(self, title, groups, columns, rows, notes=()):
        self.title, self.groups, self.columns, self.rows, self.notes = title, groups, columns, rows, list(notes)

    def lines(self):
        """The title, the groups' names over their columns, the column names, a line per row."""
        first = max(len(str(row[0])) for row in self.rows + [self.columns])
        groups = "".join(f"{name:^{14 * span}}" for name, span in self.groups)
        out = [f"== {self.title}", f"  {'':{first}}{groups}",
               f"  {self.columns[0]:{first}}" + "".join(f"{name:>14}" for name in self.columns[1:])]
        for row in self.rows:
            out.append(f"  {row[0]:{first}}" + "".join(f"{number(value):>14}" for value in row[1:]))
        return out + [f"  note: {note}" for note in self.notes]

    def to_json(self):
        return {"title": self.title, "groups": self.groups, "columns": self.columns, "rows": self.rows,
                "notes": self.notes}


# --- the benchmark ------------------------------------------------------------------------------------

class Bench:
    """The settings, the servers' command lines, a scratch folder and, with --db postgres, the
    PostgresDatabases, shared by every scenario. Servers go by kind: "floor", and a broker_kind()
    for each --workers count."""

    def __init__(self, args, workdir, postgres=None):
        self.args, self.workdir, self.postgres = args, workdir, postgres
        self.store_name = "PostgreSQL" if postgres else "SQLite"
        self.workers = {broker_kind(n): n for n in args.workers} if "broker" in args.servers else {}
        brokers, floor = list(self.workers), [kind for kind in ("floor",) if kind in args.servers]
        self.broker = brokers[0] if brokers else None     # the one broker most scenarios run
        self.kinds = brokers[:1] + floor
        self.side_by_side = brokers + floor               # for WORKER_SCENARIOS: every --workers count
        self.servers_started = 0

    def command(self, kind, db, extra=()):
        if kind in self.workers:
            workers = self.workers[kind]
            # No flag for one worker: broker.py exactly as it runs without --workers.
            flag = ["--workers", str(workers)] if workers > 1 else []
            return [self.args.python, self.args.broker, "--port", "0", "--db", db, "--quiet",
                    *self.args.broker_arg, *flag, *extra]
        return [self.args.python, os.path.abspath(__file__), "--serve-floor", "--port", "0",
                "--db", db, "--quiet"]

    def server(self, kind, extra=(), db=None, store=None):
        """A server of that kind, started and ready, on db (a node joining another's database)
        or on a fresh database: a new PostgreSQL one for a broker with --db postgres (unless store
        is "sqlite"), else a file in the scratch folder, which the floor ignores. Extra arguments
        (broker.py only) come after --broker-arg's, so they win."""
        self.servers_started += 1
        name = f"{kind}-{self.servers_started}"
        if db is None:
            on_postgres = self.postgres is not None and kind in self.workers and store != "sqlite"
            db = self.postgres.new() if on_postgres else os.path.join(self.workdir, f"{name}.db")
        server = ServerProcess(kind, self.command(kind, db, extra), self.workdir, self.workers.get(kind, 1), name,
                               db, self.postgres if is_postgres_url(db) else None)
        return server.start()

    def has_workers(self, kinds):
        """Whether any of these kinds is a broker with more than one worker."""
        return any(self.workers.get(kind, 1) > 1 for kind in kinds)

    def interleaved(self, label, run_once, kinds=None, repeat=None, start=None):
        """run_once(server) on fresh servers, each kind in turn (brokers, then the floor), --repeat
        times each; start(kind) starts one (self.server unless given, e.g. to start Nodes)."""
        runs = {kind: [] for kind in kinds or self.kinds}
        repeat = repeat or self.args.repeat
        for attempt in range(repeat):
            for kind in runs:
                log(f"  {label}: {kind} run {attempt + 1}/{repeat}")
                with (start or self.server)(kind) as server:
                    result = run_once(server)
                result["stop_seconds"], result["exit_code"] = server.stop_seconds, server.exit_code
                runs[kind].append(result)
        return runs


# Time the server's threads were ready to run but had no CPU: for the one-thread floor that means a busy
# machine; the broker's threads also queue behind one another (8 publishers: 8 handler threads).
NOISE_ROW = ("server threads waiting for a CPU ms", "waited_ms", None)


def postgres_rows(bench, *rows):
    """Rows of the PostgreSQL server's own figures (its CPU is not the broker's): only with --db postgres."""
    return list(rows) if bench.postgres else []


def delivery_figures(live, sync, expected_pairs):
    """The rows every live-delivery scenario shares, from a pool's sync and collect figures."""
    figures = latency_summary(live.pop("latencies"))
    figures.update({key: live[key] for key in ("delivered", "lost", "duplicated", "disordered", "closed")})
    figures.update(expected=expected_pairs, synced=sync["synced"], failed=sync["failed"],
                   client_cpu_pct=max(sync["client_cpu_pct"], live["client_cpu_pct"]))
    return figures


def fanout_run(bench, server, count):
    args = bench.args
    with SubscriberPool(bench, server.port, count) as pool:
        sync = pool.wait_synced()
        meter = Meter(server)
        published = publish(bench, server, args.records, args.records / args.rate + 30, "fanout",
                            rate=args.rate)
        live = pool.collect(published["ids"], grace=10)
        cpu, waited = meter.read()
        database_cpu, _ = meter.read_database()
    split = worker_split(live, published, server.workers) if server.workers > 1 else {}
    figures = delivery_figures(live, sync, len(published["ids"]) * sync["synced"])
    figures.update(acked=len(published["ids"]), slip_s=published["slip"], waited_ms=waited * 1000,
                   cpu_us_per_delivery=per(cpu, figures["delivered"], 1e6),
                   postgres_us_per_record=per(database_cpu, len(published["ids"]), 1e6), **split)
    return figures


def worker_split(live, published, workers):
    """For a broker with workers: how many subscribers each worker serves, and the delivery p99 of
    those on the publisher's worker (its inserts' Broker-Worker) beside those on the others."""
    counts, latencies = live["subscribers_by_worker"], live["latencies_by_worker"]
    figures = {"subscribers_per_worker": "/".join(str(counts.get(k, 0)) for k in range(1, workers + 1)),
               "unlabelled": counts.get(None, 0) + published["workers"].get(None, 0)}
    answered = [worker for worker in published["workers"] if worker is not None]
    if len(answered) != 1:             # one keep-alive connection should be one worker throughout
        return figures
    own = answered[0]
    others = [worker for worker in counts if worker not in (own, None)]
    same = latency_summary(latencies.get(own, []))["p99_ms"]
    cross = latency_summary([ns for worker in others for ns in latencies[worker]])["p99_ms"]
    figures.update(publisher_worker=own, same_subscribers=counts.get(own, 0),
                   cross_subscribers=sum(counts[worker] for worker in others),
                   same_p99_ms=same, cross_p99_ms=cross, cross_same_p99=ratio(cross, same))
    return figures


def worker_split_rows(count, rate):
    """worker_split()'s rows, with issue 10's target where it was set."""
    target = ("<=", CROSS_WORKER_P99) if (count, rate) == CROSS_WORKER_AT else None
    return [("subscribers on the publisher's worker", "same_subscribers", None),
            ("subscribers on the other worker(s)", "cross_subscribers", None),
            ("  per worker 1/2/.. (last run)", "subscribers_per_worker", None),
            ("responses without Broker-Worker", "unlabelled", ("==", 0)),
            ("latency p99 ms, publisher's worker", "same_p99_ms", None),
            ("latency p99 ms, other worker(s)", "cross_p99_ms", None),
            ("  other worker(s) / publisher's", "cross_same_p99", target)]


def scenario_fanout(bench):
    args = bench.args
    tables = []
    for count in args.subscribers:
        runs = bench.interleaved(f"fanout {count}", lambda server: fanout_run(bench, server, count),
                                 kinds=bench.side_by_side)
        rows = [
            ("subscribers synced", "synced", None),
            ("records acknowledged", "acked", None),
            ("latency p50 ms", "p50_ms", None),
            ("latency p99 ms", "p99_ms", [("<=x", 1.5), ("<=w", 1)]),
            ("latency max ms", "max_ms", None),
            ("lost (subscriber, record) pairs", "lost", ("==", 0)),
            ("duplicated", "duplicated", ("==", 0)),
            ("out of order", "disordered", ("==", 0)),
            ("streams closed by the server", "closed", ("==", 0)),
            ("server CPU us per delivery", "cpu_us_per_delivery", [("<=x", 1.3), ("<=w", 1)]),
            *postgres_rows(bench, ("PostgreSQL CPU us per record", "postgres_us_per_record", None)),
            ("publisher schedule slip s", "slip_s", ("<", 0.1)),
            ("client CPU % (busiest process)", "client_cpu_pct", None),
            NOISE_ROW,
        ]
        notes = []
        if bench.has_workers(runs):
            rows += worker_split_rows(count, args.rate)
            notes.append("a subscriber is on the publisher's worker when its /events response has the "
                         "Broker-Worker of the publisher's inserts (one keep-alive connection); the "
                         "kernel picks the worker of each connection")
        tables.append(Table(f"fanout: {count:,} idle subscribers, {args.records} records at {args.rate:g}/s",
                            runs, rows, notes))
    return tables


def crowd_run(bench, server):
    args = bench.args
    with SubscriberPool(bench, server.port, args.crowd) as pool:
        sync = pool.wait_synced()
        rss = server.rss_kib()
        meter = Meter(server)
        published = publish(bench, server, args.crowd_records, args.crowd_records / CROWD_RATE + 30,
                            "crowd", rate=CROWD_RATE)
        live = pool.collect(published["ids"], grace=30)
        cpu, waited = meter.read()
        database_cpu, _ = meter.read_database()
    figures = delivery_figures(live, sync, len(published["ids"]) * sync["synced"])
    figures.update(connect_s=sync["span"], rss_mib=rss / 1024, slip_s=published["slip"],
                   waited_ms=waited * 1000, cpu_us_per_delivery=per(cpu, figures["delivered"], 1e6),
                   postgres_us_per_record=per(database_cpu, len(published["ids"]), 1e6),
                   missing=figures["expected"] - figures["delivered"] + figures["duplicated"])
    return figures


def scenario_crowd(bench):
    args = bench.args
    runs = bench.interleaved(f"crowd {args.crowd}", lambda server: crowd_run(bench, server))
    return [Table(f"crowd: {args.crowd:,} subscribers at once, {args.crowd_records} records at "
                  f"{CROWD_RATE:g}/s", runs, [
                      ("subscribers synced", "synced", None),
                      ("subscribers that failed to sync", "failed", ("==", 0)),
                      ("seconds until all synced", "connect_s", None),
                      ("server RSS with all connected MiB", "rss_mib", None),
                      ("deliveries expected", "expected", None),
                      ("deliveries missing", "missing", ("==", 0)),
                      ("latency p50 ms", "p50_ms", None),
                      ("latency p99 ms", "p99_ms", ("<=x", 2.0)),
                      ("latency max ms", "max_ms", None),
                      ("server CPU us per delivery", "cpu_us_per_delivery", None),
                      *postgres_rows(bench, ("PostgreSQL CPU us per record", "postgres_us_per_record", None)),
                      ("publisher schedule slip s", "slip_s", None),
                      ("client CPU % (busiest process)", "client_cpu_pct", None),
                      NOISE_ROW,
                  ])]


def socket_slack_bytes():
    """What may sit between the broker's cursor for a slow reader and what the reader has received:
    the broker's send buffer (at most tcp_wmem's maximum), the reader's receive buffer (Linux
    doubles the SO_RCVBUF asked for) and a page."""
    with open("/proc/sys/net/ipv4/tcp_wmem") as file:
        send_max = int(file.read().split()[2])
    return send_max + 2 * SLOW_READ_BYTES + PAGE_BYTES


def slow_pause_seconds(args):
    """How long the slow readers read nothing: until they are SLOW_PAUSE_MARGIN times as far
    behind as the ring and the socket buffers hold, so that they catch up from the database."""
    record_bytes = args.slow_record_kib * 1024 + 64              # the data and the SSE lines around it
    return SLOW_PAUSE_MARGIN * (RING_BYTES + socket_slack_bytes()) / (record_bytes * args.slow_rate)


def fast_phase(bench, server, seconds, label):
    """One fast subscriber while records of slow_record_kib are published for seconds: its
    delivery figures, keys prefixed with label, and the publisher's answer."""
    args = bench.args
    with SubscriberPool(bench, server.port, 1) as pool:
        sync = pool.wait_synced()
        meter = Meter(server)
        published = publish(bench, server, round(seconds * args.slow_rate), seconds + 30, "slow",
                             rate=args.slow_rate, pad=args.slow_record_kib * 1024)
        live = pool.collect(published["ids"], grace=10)
        _cpu, waited = meter.read()
    figures = delivery_figures(live, sync, len(published["ids"]))
    figures.update(acked=len(published["ids"]), slip_s=published["slip"], waited_ms=waited * 1000,
                   insert_p99_ms=latency_summary(published["latencies"])["p99_ms"],
                   rss_mib=server.rss_kib() / 1024)
    return {f"{label}_{key}": value for key, value in figures.items()}, published


def off_ring_seconds(readers, published, ended_ns):
    """Seconds before ended_ns during which every slow reader was, by its own reckoning, further
    behind than the ring and the sockets hold: the age of its newest record times the publish rate."""
    frame_bytes = per(sum(r["bytes"] for r in readers), sum(r["frames"] for r in readers))
    if not frame_bytes or not published["seconds"]:
        return 0.0
    byte_rate = frame_bytes * len(published["ids"]) / published["seconds"]
    off_ring = RING_BYTES + socket_slack_bytes()
    since = []
    for reader in readers:
        off = [at for at, age in reader["ages"] if age / 1e9 * byte_rate >= off_ring]
        if not off:
            return 0.0
        since.append(off[0])
    return max(0.0, (ended_ns - max(since)) / 1e9)


def slow_run(bench, server):
    args = bench.args
    figures, _ = fast_phase(bench, server, args.slow_alone_seconds, "alone")
    server.reset_peak()
    readers = ClientProcess(slow_reader_worker, port=server.port, count=args.slow_readers,
                            read_bytes=SLOW_READ_BYTES, interval=SLOW_READ_INTERVAL,
                            pause=slow_pause_seconds(args))
    try:
        synced = readers.receive(30)
        with_slow, published = fast_phase(bench, server, args.slow_seconds, "with")
        ended_ns = time.time_ns()
        figures["rss_peak_mib"] = server.peak_kib() / 1024
        readers.send("report")
        report = readers.receive(30)
    finally:
        readers.finish()
    figures.update(with_slow)
    slow = report["readers"]
    newest = max(published["ids"], default=0)
    lags = [(newest - r["last_id"]) * per(r["bytes"], r["frames"]) / 2 ** 20 for r in slow if r["frames"]]
    figures.update(
        p99_ratio=ratio(figures["with_p99_ms"], figures["alone_p99_ms"]),
        lost=figures["alone_lost"] + figures["with_lost"],
        duplicated=figures["alone_duplicated"] + figures["with_duplicated"],
        disordered=figures["alone_disordered"] + figures["with_disordered"],
        closed=figures["alone_closed"] + figures["with_closed"],
        rss_growth_mib=figures["rss_peak_mib"] - figures["alone_rss_mib"],
        slow_synced=synced,
        slow_streaming=sum(1 for r in slow if r["synced"] and not r["closed"]),
        slow_kib_per_s=per(statistics.median(r["bytes"] for r in slow) / 1024, report["read_seconds"]),
        slow_lag_mib=min(lags) if len(lags) == len(slow) else 0.0,
        slow_off_ring_s=off_ring_seconds(slow, published, ended_ns),
        slow_misordered=sum(r["skipped"] + r["repeated"] for r in slow))
    return figures


def scenario_slow(bench):
    args = bench.args
    if bench.broker is None:
        return []
    off_ring = round((RING_BYTES + socket_slack_bytes()) / 2 ** 20, 1)
    pause = slow_pause_seconds(args)
    readers = args.slow_readers
    runs = bench.interleaved("slow readers", lambda server: slow_run(bench, server), kinds=[bench.broker])
    return [Table(f"slow: 1 fast subscriber, {args.slow_record_kib} KiB records at {args.slow_rate:g}/s, "
                  f"{args.slow_alone_seconds:g} s alone then {args.slow_seconds:g} s beside {readers} slow "
                  f"readers (broker only)", runs, [
                      ("alone: records acknowledged", "alone_acked", None),
                      ("  fast subscriber latency p50 ms", "alone_p50_ms", None),
                      ("  fast subscriber latency p99 ms", "alone_p99_ms", None),
                      ("  fast subscriber latency max ms", "alone_max_ms", None),
                      ("  insert latency p99 ms", "alone_insert_p99_ms", None),
                      ("  server threads waiting for a CPU ms", "alone_waited_ms", None),
                      (f"with {readers} slow readers: records acked", "with_acked", None),
                      ("  fast subscriber latency p50 ms", "with_p50_ms", None),
                      ("  fast subscriber latency p99 ms", "with_p99_ms", None),
                      ("  fast subscriber latency max ms", "with_max_ms", None),
                      ("  insert latency p99 ms", "with_insert_p99_ms", None),
                      ("  publisher schedule slip s", "with_slip_s", None),
                      ("  server threads waiting for a CPU ms", "with_waited_ms", None),
                      ("fast p99 with slow readers / alone", "p99_ratio", ("<=", 1.5)),
                      ("fast: lost records (both phases)", "lost", ("==", 0)),
                      ("fast: duplicated", "duplicated", ("==", 0)),
                      ("fast: out of order", "disordered", ("==", 0)),
                      ("fast: streams closed by the server", "closed", ("==", 0)),
                      ("server RSS before the slow readers MiB", "alone_rss_mib", None),
                      ("server peak RSS with them MiB", "rss_peak_mib", None),
                      ("  growth MiB", "rss_growth_mib", ("<=", 50)),
                      ("server RSS at the end, with them MiB", "with_rss_mib", None),
                      ("slow readers synced at the start", "slow_synced", ("==", readers)),
                      ("slow readers still streaming at the end", "slow_streaming", ("==", readers)),
                      ("slow reader KiB/s once reading (median)", "slow_kib_per_s", None),
                      ("least slow-reader lag at the end MiB", "slow_lag_mib", (">=", off_ring)),
                      ("s with every slow reader off the ring", "slow_off_ring_s", None),
                      ("slow: records skipped/repeated/disordered", "slow_misordered", ("==", 0)),
                  ], notes=[f"the slow readers read their sync, then nothing for {pause:.1f} s, then "
                            f"{SLOW_READ_BYTES >> 10} KiB every {SLOW_READ_INTERVAL:g} s",
                            f"a reader is off the ring (so catches up from {bench.store_name}) once it is more than "
                            f"{off_ring:g} MiB behind by its own count: the {RING_BYTES >> 20} MiB ring plus "
                            f"what socket buffers and one page may hold",
                            "the floor would queue each slow reader's backlog in its own memory: nothing to "
                            "compare with"])]


def throughput_run(bench, server, count=100, publishers=4):
    args = bench.args
    with SubscriberPool(bench, server.port, count) as pool:
        sync = pool.wait_synced()
        meter, started_ns = Meter(server), time.time_ns()
        published = publish(bench, server, 10 ** 9, args.throughput_seconds, "throughput",
                            connections=publishers)
        live = pool.collect(published["ids"], grace=20)
        cpu, waited = meter.read()
        database_cpu, _ = meter.read_database()
    acked = len(published["ids"])
    figures = delivery_figures(live, sync, acked * sync["synced"])
    figures.update(acked=acked, inserts_per_s=per(acked, published["seconds"]),
                   refused=sum(published["statuses"].values()),
                   frames_per_s=per(figures["delivered"], (live["last_frame_ns"] - started_ns) / 1e9),
                   complete_pct=per(figures["delivered"] - figures["duplicated"], figures["expected"], 100),
                   cpu_us_per_insert=per(cpu, acked, 1e6), waited_ms=waited * 1000,
                   postgres_us_per_insert=per(database_cpu, acked, 1e6))
    return figures


def scenario_throughput(bench):
    args = bench.args
    runs = bench.interleaved("throughput", lambda server: throughput_run(bench, server),
                             kinds=bench.side_by_side)
    return [Table(f"throughput: 100 subscribers, 4 closed-loop keep-alive publishers for "
                  f"{args.throughput_seconds:g} s", runs, [
                      ("inserts acknowledged per s", "inserts_per_s", (">=x", 2.0)),
                      ("inserts refused (non-200)", "refused", ("==", 0)),
                      ("frames delivered per s", "frames_per_s", None),
                      ("completeness %", "complete_pct", ("==", 100)),
                      ("lost", "lost", ("==", 0)),
                      ("duplicated", "duplicated", ("==", 0)),
                      ("out of order", "disordered", ("==", 0)),
                      ("latency p50 ms", "p50_ms", None),
                      ("latency p99 ms", "p99_ms", None),
                      ("server CPU us per insert (with fan-out)", "cpu_us_per_insert", None),
                      *postgres_rows(bench, ("PostgreSQL CPU us per insert", "postgres_us_per_insert", None)),
                      ("client CPU % (busiest process)", "client_cpu_pct", None),
                      NOISE_ROW,
                  ])]


def memory_run(bench, server):
    time.sleep(0.3)                  # let the server finish starting before the idle reading
    figures = {"idle_kib": server.rss_kib()}
    pools = []
    try:
        connected = 0
        for count in bench.args.memory_subscribers:
            pool = SubscriberPool(bench, server.port, count - connected)
            pools.append(pool)
            sync = pool.wait_synced()
            connected = count
            time.sleep(0.3)
            rss = server.rss_kib()
            figures[f"rss_{count}_mib"] = rss / 1024
            figures[f"kib_per_sub_{count}"] = per(rss - figures["idle_kib"], count)
            figures[f"failed_{count}"] = sync["failed"]
        figures["peak_mib"] = server.peak_kib() / 1024
    finally:
        for pool in pools:
            pool.close()
    figures["idle_mib"] = figures.pop("idle_kib") / 1024
    return figures


def scenario_memory(bench):
    counts = bench.args.memory_subscribers
    runs = bench.interleaved("memory", lambda server: memory_run(bench, server))
    rows = [("RSS idle MiB", "idle_mib", None)]
    for count in counts:
        rows += [(f"RSS with {count:,} subscribers MiB", f"rss_{count}_mib", None),
                 (f"  KiB per subscriber at {count:,}", f"kib_per_sub_{count}", ("<=", 16)),
                 ("  subscribers that failed to sync", f"failed_{count}", ("==", 0))]
    rows.append(("peak RSS (VmHWM) MiB", "peak_mib", None))
    notes = ["the PostgreSQL server's memory is not the broker's, and not counted"] if bench.postgres else []
    return [Table(f"memory: server RSS idle and with {', '.join(f'{c:,}' for c in counts)} subscribers",
                  runs, rows, notes)]


def connect_run(bench, server):
    count = bench.args.connect_subscribers
    stored = publish(bench, server, CONNECT_EVENTS, 30, "connect", connections=4, distinct=CONNECT_EVENTS)
    meter = Meter(server)
    with SubscriberPool(bench, server.port, count) as pool:
        sync = pool.wait_synced()
    cpu, _waited = meter.read()
    database_cpu, _ = meter.read_database()
    seconds = sync["sync_seconds"]
    return {"stored": len(stored["ids"]), "synced": sync["synced"], "failed": sync["failed"],
            "total_s": sync["span"], "p50_ms": (percentile(seconds, 0.5) or 0) * 1000,
            "p99_ms": (percentile(seconds, 0.99) or 0) * 1000, "max_ms": (seconds[-1] if seconds else 0) * 1000,
            "slow": sum(1 for s in seconds if s >= 1.0), "frames_min": sync["sync_frames_min"],
            "cpu_ms_per_sync": per(cpu, sync["synced"], 1e3), "client_cpu_pct": sync["client_cpu_pct"],
            "postgres_ms_per_sync": per(database_cpu, sync["synced"], 1e3)}


def scenario_connect(bench):
    args = bench.args
    runs = bench.interleaved("connect", lambda server: connect_run(bench, server), kinds=bench.side_by_side)
    return [Table(f"connect: {CONNECT_EVENTS} events stored, {args.connect_subscribers:,} subscribers sync "
                  f"({args.inflight} in flight)", runs, [
                      ("subscribers synced", "synced", None),
                      ("failed", "failed", ("==", 0)),
                      ("fewest sync frames received", "frames_min", ("==", CONNECT_EVENTS)),
                      ("seconds until all synced", "total_s", ("<=", 0.3)),
                      ("per-subscriber sync p50 ms", "p50_ms", None),
                      ("per-subscriber sync p99 ms", "p99_ms", None),
                      ("per-subscriber sync max ms", "max_ms", None),
                      ("subscribers that took >= 1 s", "slow", ("==", 0)),
                      ("server CPU ms per sync", "cpu_ms_per_sync", None),
                      *postgres_rows(bench, ("PostgreSQL CPU ms per sync", "postgres_ms_per_sync", None)),
                      ("client CPU % (busiest process)", "client_cpu_pct", None),
                  ])]


def insert_run(bench, server, publishers):
    meter = Meter(server)
    published = publish(bench, server, 10 ** 9, bench.args.insert_seconds, "insert", connections=publishers)
    cpu, waited = meter.read()
    database_cpu, _ = meter.read_database()
    acked = len(published["ids"])
    figures = latency_summary(published["latencies"])
    figures.update(acked=acked, inserts_per_s=per(acked, published["seconds"]),
                   refused=sum(published["statuses"].values()), cpu_us_per_insert=per(cpu, acked, 1e6),
                   client_cpu_pct=per(published["cpu"], published["seconds"], 100), waited_ms=waited * 1000,
                   postgres_us_per_insert=per(database_cpu, acked, 1e6))
    return figures


def scenario_insert(bench):
    tables = []
    for publishers in (1, 8):
        runs = bench.interleaved(f"insert x{publishers}", lambda server: insert_run(bench, server, publishers),
                                 kinds=bench.side_by_side)
        notes = ["the floor's /insert writes no database: the ratio is the cost of durability and HTTP parsing"]
        if bench.has_workers(runs):
            notes.append("broker.py's settings as given (--sync full unless --broker-arg says otherwise); "
                         "with workers, each insert goes from a worker to the parent, which commits")
        tables.append(Table(f"insert: no subscribers, {publishers} keep-alive publisher(s), "
                            f"{bench.args.insert_seconds:g} s", runs, [
                                ("inserts acknowledged per s", "inserts_per_s",
                                 (">=w", 1.4) if publishers == 8 else None),
                                ("inserts refused (non-200)", "refused", ("==", 0)),
                                ("latency p50 ms", "p50_ms", None),
                                ("latency p99 ms", "p99_ms", None),
                                ("server CPU us per insert", "cpu_us_per_insert",
                                 ("<=", 60) if publishers == 8 else None),
                                *postgres_rows(bench, ("PostgreSQL CPU us per insert", "postgres_us_per_insert",
                                                       None)),
                                ("client CPU %", "client_cpu_pct", None),
                                NOISE_ROW,
                            ], notes))
    return tables


def insert_phase(bench, server, event, batch):
    """Closed-loop inserts over BATCH_PUBLISHERS connections for --batch-seconds, one record per
    request (batch 0) or arrays of batch: records acknowledged per s and server CPU per record."""
    meter = Meter(server)
    published = publish(bench, server, 10 ** 9, bench.args.batch_seconds, event,
                        connections=BATCH_PUBLISHERS, batch=batch)
    cpu, waited = meter.read()
    database_cpu, _ = meter.read_database()
    records, requests = len(published["ids"]), len(published["latencies"])
    figures = latency_summary(published["latencies"])
    figures.update(records=records, records_per_s=per(records, published["seconds"]),
                   requests_per_s=per(requests, published["seconds"]),
                   refused=sum(published["statuses"].values()), cpu_us_per_record=per(cpu, records, 1e6),
                   client_cpu_pct=per(published["cpu"], published["seconds"], 100), waited_ms=waited * 1000,
                   postgres_us_per_record=per(database_cpu, records, 1e6))
    return figures


def batch_run(bench, server):
    figures = {}
    for label, batch in (("single", 0), ("batch", BATCH_RECORDS)):
        phase = insert_phase(bench, server, label, batch)
        figures.update({f"{label}_{key}": value for key, value in phase.items()})
    figures.update(speedup=ratio(figures["batch_records_per_s"], figures["single_records_per_s"]),
                   cpu_saving=ratio(figures["single_cpu_us_per_record"], figures["batch_cpu_us_per_record"]))
    return figures


def scenario_batch(bench):
    args = bench.args
    if bench.broker is None:
        return []
    runs = bench.interleaved("batch", lambda server: batch_run(bench, server), kinds=[bench.broker])
    rows = []
    for label, name in (("single", "single"), ("batch", f"batch {BATCH_RECORDS}")):
        per_request = " per request" if label == "batch" else ""
        rows += [(f"{name}: records acknowledged per s", f"{label}_records_per_s", None),
                 ("  requests per s", f"{label}_requests_per_s", None),
                 ("  requests refused (non-200)", f"{label}_refused", ("==", 0)),
                 (f"  latency p50 ms{per_request}", f"{label}_p50_ms", None),
                 (f"  latency p99 ms{per_request}", f"{label}_p99_ms", None),
                 ("  server CPU us per record", f"{label}_cpu_us_per_record", None),
                 *postgres_rows(bench, ("  PostgreSQL CPU us per record", f"{label}_postgres_us_per_record", None)),
                 ("  client CPU %", f"{label}_client_cpu_pct", None),
                 ("  server threads waiting for a CPU ms", f"{label}_waited_ms", None)]
    rows += [("records per s, batches / single", "speedup", None),
             ("server CPU per record, single / batches", "cpu_saving", None)]
    return [Table(f"batch: no subscribers, {BATCH_PUBLISHERS} closed-loop keep-alive publishers, "
                  f"{args.batch_seconds:g} s of single inserts then {args.batch_seconds:g} s of arrays of "
                  f"{BATCH_RECORDS} (broker only)", runs, rows,
                  notes=["the same broker, one after the other; broker.py's settings as given "
                         "(--sync full unless --broker-arg says otherwise)",
                         "the floor's /insert takes one record and stores nothing: what matters here is "
                         "batches / single within broker.py"])]


NODE_COUNTS = {"1 node": 1, "2 nodes": 2}          # nodes fan-out: brokers on one PostgreSQL database
INSERT_STORES = {"sqlite": ("sqlite", 1), "pg 1 node": ("postgres", 1), "pg 2 nodes": ("postgres", 2)}


def publish_across(ports, connections, seconds, event):
    """Closed-loop inserts for seconds over `connections` keep-alive connections, split evenly
    over one client process per entry of ports (a port may come twice); their answers merged."""
    clients = [ClientProcess(publisher_worker, port=port, connections=share, count=10 ** 9, seconds=seconds,
                             event=event) for port, share in zip(ports, split_evenly(connections, len(ports)))]
    try:
        answers = [client.receive(seconds + 60) for client in clients]
    finally:
        for client in clients:
            client.finish()
    merged = {"ids": array.array("q"), "latencies": array.array("q"), "statuses": {},
              "seconds": max(answer["seconds"] for answer in answers),
              "cpu": sum(answer["cpu"] for answer in answers)}
    for answer in answers:
        merged["ids"].extend(answer["ids"])
        merged["latencies"].extend(answer["latencies"])
        for status, count in answer["statuses"].items():
            merged["statuses"][status] = merged["statuses"].get(status, 0) + count
    return merged


def commit_totals(servers):
    """[commits, records committed, seconds spent committing] so far, over the servers' GET /metrics."""
    totals = [0.0, 0.0, 0.0]
    for server in servers:
        text = http_get(server.port, "/metrics")[1].decode()
        for index, name in enumerate(("broker_commit_rows_count", "broker_commit_rows_sum",
                                      "broker_commit_duration_seconds_sum")):
            totals[index] += metric(text, name) or 0.0
    return totals


def limit_figures(meter, client_cpu):
    """What held a run back: the CPU of each process group (the brokers, PostgreSQL, the clients) as
    % of one core, their waits for a CPU, and the machine's busy, iowait and stolen time."""
    cpu, waited = meter.read()
    database_cpu, database_waited = meter.read_database()
    seconds, busy, iowait, steal = meter.read_machine()
    return {"broker_cpu_s": cpu, "postgres_cpu_s": database_cpu,
            "broker_core_pct": per(cpu, seconds, 100), "postgres_core_pct": per(database_cpu, seconds, 100),
            "client_core_pct": per(client_cpu, seconds, 100), "busy_pct": busy, "iowait_pct": iowait,
            "steal_pct": steal, "waited_ms": waited * 1000,
            "postgres_waited_ms": None if database_waited is None else database_waited * 1000}


LIMIT_ROWS = [
    ("CPU % of one core: broker node(s)", "broker_core_pct", None),
    ("  PostgreSQL", "postgres_core_pct", None),
    ("  client processes", "client_core_pct", None),
    (f"machine: CPUs busy % (of {os.cpu_count()})", "busy_pct", None),
    ("  iowait %", "iowait_pct", None),
    ("  stolen by the hypervisor %", "steal_pct", None),
    ("broker threads waiting for a CPU ms", "waited_ms", None),
    ("PostgreSQL waiting for a CPU ms", "postgres_waited_ms", None),
]
LIMIT_NOTES = ["CPU % of one core: CPU seconds over the wall seconds of the load, so both cores busy is 200; "
               "PostgreSQL is the postmaster and its children (a backend per connection, the WAL writer, "
               "...) from /proc; the machine's figures are /proc/stat's, every process on it included"]


def nodes_fanout_run(bench, nodes):
    """--nodes-subscribers over the nodes' ports in turn (client processes, one per node or more),
    --records at --rate from a publisher on node 1: the latency on node 1 and on the others."""
    args = bench.args
    ports = nodes.ports
    with SubscriberPool(bench, ports, args.nodes_subscribers) as pool:
        sync = pool.wait_synced()
        meter = Meter(nodes)
        published = publish(bench, nodes.servers[0], args.records, args.records / args.rate + 30, "nodes",
                            rate=args.rate)
        live = pool.collect(published["ids"], grace=10)
        limits = limit_figures(meter, published["cpu"] + live["client_cpu_s"])
    acked, by_port = len(published["ids"]), live["latencies_by_port"]
    same = latency_summary(by_port.get(ports[0], []))
    other = latency_summary([ns for port in ports[1:] for ns in by_port.get(port, [])])
    figures = delivery_figures(live, sync, acked * sync["synced"])
    figures.update(acked=acked, slip_s=published["slip"],
                   per_node="/".join(str(live["subscribers_by_port"].get(port, 0)) for port in ports),
                   same_p50_ms=same["p50_ms"], same_p99_ms=same["p99_ms"],
                   cross_p50_ms=other["p50_ms"], cross_p99_ms=other["p99_ms"],
                   cross_same_p99=ratio(other["p99_ms"], same["p99_ms"]),
                   cpu_us_per_delivery=per(limits["broker_cpu_s"], figures["delivered"], 1e6),
                   postgres_us_per_record=per(limits["postgres_cpu_s"], acked, 1e6), **limits)
    return figures


def nodes_insert_run(bench, nodes):
    """NODES_PUBLISHERS closed-loop publishers for --nodes-seconds from two client processes: one
    per node with two nodes, both on the one broker otherwise."""
    ports = (nodes.ports * 2)[:2]
    before = commit_totals(nodes.servers)
    meter = Meter(nodes)
    published = publish_across(ports, NODES_PUBLISHERS, bench.args.nodes_seconds, "nodes")
    limits = limit_figures(meter, published["cpu"])
    commits, rows, seconds = (after - then for after, then in zip(commit_totals(nodes.servers), before))
    acked = len(published["ids"])
    figures = latency_summary(published["latencies"])
    figures.update(acked=acked, inserts_per_s=per(acked, published["seconds"]),
                   refused=sum(published["statuses"].values()),
                   cpu_us_per_insert=per(limits["broker_cpu_s"], acked, 1e6),
                   postgres_us_per_insert=per(limits["postgres_cpu_s"], acked, 1e6),
                   total_us_per_insert=per(limits["broker_cpu_s"] + (limits["postgres_cpu_s"] or 0), acked, 1e6),
                   commits_per_s=per(commits, published["seconds"]), rows_per_commit=per(rows, commits),
                   commit_ms=per(seconds, commits, 1e3), **limits)
    return figures


def scenario_nodes(bench):
    args = bench.args
    if bench.broker is None:
        return []
    count = args.nodes_subscribers
    fanout = bench.interleaved(f"nodes fanout {count}", lambda nodes: nodes_fanout_run(bench, nodes),
                               kinds=list(NODE_COUNTS), start=lambda kind: Nodes(bench, NODE_COUNTS[kind]))
    target = ("<=", CROSS_NODE_P99) if (count, args.rate) == CROSS_WORKER_AT else None
    fanout_table = Table(
        f"nodes: {count:,} idle subscribers, {args.records} records at {args.rate:g}/s from a publisher on "
        f"node 1; one broker beside two on one PostgreSQL database", fanout, [
            ("subscribers synced", "synced", None),
            ("  per node 1/2 (last run)", "per_node", None),
            ("records acknowledged", "acked", None),
            ("latency p50 ms", "p50_ms", None),
            ("latency p99 ms", "p99_ms", None),
            ("latency max ms", "max_ms", None),
            ("lost (subscriber, record) pairs", "lost", ("==", 0)),
            ("duplicated", "duplicated", ("==", 0)),
            ("out of order", "disordered", ("==", 0)),
            ("streams closed by the server", "closed", ("==", 0)),
            ("latency p50 ms, publisher's node", "same_p50_ms", None),
            ("latency p99 ms, publisher's node", "same_p99_ms", None),
            ("latency p50 ms, other node", "cross_p50_ms", None),
            ("latency p99 ms, other node", "cross_p99_ms", None),
            ("  other node / publisher's, p99", "cross_same_p99", target),
            ("broker CPU us per delivery, all nodes", "cpu_us_per_delivery", None),
            ("PostgreSQL CPU us per record", "postgres_us_per_record", None),
            ("publisher schedule slip s", "slip_s", ("<", 0.1)),
            *LIMIT_ROWS,
        ], notes=["2 nodes: two broker.py processes on one database, the subscribers over two client processes, "
                  "one per node; node 2 hears of node 1's commits by NOTIFY, then reads the new rows",
                  "1 node: the same two client processes, both on it",
                  "PostgreSQL CPU at 20 records/s is mostly its own background processes', counted in 10 ms ticks",
                  *LIMIT_NOTES],
        base=("1 node", "1 node", "1 node"))
    stores = bench.interleaved(
        "nodes insert", lambda nodes: nodes_insert_run(bench, nodes), kinds=list(INSERT_STORES),
        start=lambda kind: Nodes(bench, INSERT_STORES[kind][1], ["--sync", "full"], store=INSERT_STORES[kind][0]))
    insert_table = Table(
        f"nodes: inserts from {NODES_PUBLISHERS} closed-loop keep-alive publishers for {args.nodes_seconds:g} s, "
        f"no subscribers, --sync full: SQLite in one process beside PostgreSQL, one node and two", stores, [
            ("inserts acknowledged per s", "inserts_per_s", (">=w", 1.0)),
            ("inserts refused (non-200)", "refused", ("==", 0)),
            ("latency p50 ms", "p50_ms", None),
            ("latency p99 ms", "p99_ms", None),
            ("broker CPU us per insert, all nodes", "cpu_us_per_insert", None),
            ("PostgreSQL CPU us per insert", "postgres_us_per_insert", None),
            ("  broker + PostgreSQL", "total_us_per_insert", None),
            ("commits per s, all nodes", "commits_per_s", None),
            ("  records per commit", "rows_per_commit", None),
            ("  ms per commit (write and commit)", "commit_ms", None),
            *LIMIT_ROWS,
        ], notes=[f"sqlite: broker.py --db <temp file> --sync full; pg: --db postgresql://... --sync full "
                  f"(synchronous_commit on) on {bench.postgres.describe()}, a new database per run",
                  f"{NODES_PUBLISHERS} publishers: two client processes of {NODES_PUBLISHERS // 2} connections, "
                  f"one per node with two nodes, both on the one broker otherwise",
                  "commits: GET /metrics (broker_commit_rows, broker_commit_duration_seconds) summed over the "
                  "nodes; a commit is one group of inserts, and on PostgreSQL its time includes waiting for "
                  "the counter row, which every insert updates and holds until it commits", *LIMIT_NOTES],
        base=("sqlite", "sqlite", "SQLite"))
    return [fanout_table, insert_table]


def load_history(bench, server, figures):
    """Insert the history over HTTP (the schema is broker.py's own); stop at the time budget."""
    args = bench.args
    started = time.monotonic()
    versions = publish(bench, server, args.history_versions, args.history_load_seconds, "history",
                       connections=16, quickack=True)
    left = max(1.0, args.history_load_seconds - (time.monotonic() - started))
    events = publish(bench, server, args.history_events, left, "hist", connections=16,
                     distinct=args.history_events, quickack=True)
    seconds = time.monotonic() - started
    loaded = len(versions["ids"]) + len(events["ids"])
    figures.update(versions=len(versions["ids"]), events=len(events["ids"]) + 1,
                   load_s=seconds, load_per_s=per(loaded, seconds))
    return loaded


def history_run(bench, server):
    figures = {}
    meter = Meter(server)
    loaded = load_history(bench, server, figures)
    figures["load_cpu_us_per_insert"] = per(meter.read()[0], loaded, 1e6)
    figures["load_postgres_us_per_insert"] = per(meter.read_database()[0], loaded, 1e6)
    figures["rss_loaded_mib"] = server.rss_kib() / 1024
    audit = measure(server, lambda: run_in_client(fetch_worker, 600, port=server.port,
                                                  path="/audit/history", socket_timeout=600))
    figures.update(audit_status=audit["status"], audit_first_ms=audit["first_byte"] * 1000,
                   audit_total_s=audit["total"], audit_entries=audit["entries"],
                   audit_mib=audit["bytes"] / 2 ** 20, audit_rss_growth_mib=audit["growth_mib"])
    sync = measure(server, lambda: sync_once(bench, server))
    figures.update(sync_s=sync["span"], sync_frames=sync["sync_frames_max"], sync_failed=sync["failed"],
                   sync_rss_growth_mib=sync["growth_mib"])
    return figures


def measure(server, action):
    """action()'s answer plus the server's peak RSS growth while it ran, in MiB."""
    before = server.rss_kib()
    server.reset_peak()
    result = action()
    result["growth_mib"] = (server.peak_kib() - before) / 1024
    return result


def sync_once(bench, server):
    with SubscriberPool(bench, server.port, 1, sync_timeout=300) as pool:
        return pool.wait_synced()


def scenario_history(bench):
    args = bench.args
    if bench.broker is None:
        return []
    # Once only: loading the history takes minutes, and there is no floor to interleave with.
    runs = bench.interleaved("history", lambda server: history_run(bench, server), kinds=[bench.broker],
                             repeat=1)
    return [Table(f"history: {args.history_versions:,} versions of one event, {args.history_events:,} "
                  f"distinct events (broker only)", runs, [
                      ("versions loaded", "versions", None),
                      ("distinct events stored", "events", None),
                      ("load inserts per s (16 publishers)", "load_per_s", None),
                      ("load server CPU us per insert", "load_cpu_us_per_insert", None),
                      *postgres_rows(bench, ("load PostgreSQL CPU us per insert", "load_postgres_us_per_insert",
                                             None)),
                      ("server RSS after loading MiB", "rss_loaded_mib", None),
                      ("/audit status", "audit_status", ("==", 200)),
                      ("/audit entries received", "audit_entries", None),
                      ("/audit MiB", "audit_mib", None),
                      ("/audit time to first byte ms", "audit_first_ms", ("<=", 50)),
                      ("/audit total s", "audit_total_s", None),
                      ("/audit peak RSS growth MiB", "audit_rss_growth_mib", ("<=", 20)),
                      ("/events full sync s", "sync_s", ("<=", 2)),
                      ("/events sync frames received", "sync_frames", None),
                      ("/events sync peak RSS growth MiB", "sync_rss_growth_mib", ("<=", 50)),
                  ], notes=["the floor keeps no history, so there is nothing to compare with",
                            "loading stops after --history-load-seconds; the rows above say what was loaded"])]


def database_mib(server):
    """(file MiB, WAL MiB) of a server's database. SQLite: the file and its -wal on disk, 0 for what
    is not there. PostgreSQL: broker.py's tables with their indexes and TOAST, and None for the WAL,
    which is the whole cluster's (recycled at checkpoints), not one database's."""
    if server.database is not None:
        return server.database.tables_mib(server.db), None
    return tuple(os.path.getsize(server.db + suffix) / 2 ** 20 if os.path.exists(server.db + suffix) else 0.0
                 for suffix in ("", "-wal"))


def retention_sample(server, started, label):
    """The database's size and, from GET /metrics, how many versions it holds now."""
    file_mib, wal_mib = database_mib(server)
    status, body = http_get(server.port, "/metrics")
    text = body.decode() if status == 200 else ""
    inserted, pruned = (int(metric(text, name) or 0) for name in ("broker_inserts_total",
                                                                  "broker_records_pruned_total"))
    return {"label": label, "s": time.monotonic() - started, "file_mib": file_mib, "wal_mib": wal_mib,
            "total_mib": file_mib + (wal_mib or 0), "inserted": inserted, "pruned": pruned,
            "kept": inserted - pruned}


def wait_for_pruner(server, expected_kept, patience=5.0, limit=180.0):
    """Poll GET /metrics until the broker holds expected_kept versions, or pruning makes no
    progress for patience s, or limit s have passed; the seconds it took."""
    started = last_change = time.monotonic()
    kept = None
    while time.monotonic() - started < limit and time.monotonic() - last_change < patience:
        text = http_get(server.port, "/metrics")[1].decode()
        now_kept = metric(text, "broker_inserts_total") - metric(text, "broker_records_pruned_total")
        if now_kept <= expected_kept:
            break
        if now_kept != kept:
            kept, last_change = now_kept, time.monotonic()
        time.sleep(0.2)
    return time.monotonic() - started


def retention_connections(args):
    # A paced load sends from the first idle connection: more would sit idle until the broker's
    # --request-timeout closes them.
    return 1 if args.retention_rate else RETENTION_PUBLISHERS


def retention_run(bench, server, keep):
    """Load --retention-inserts records on RETENTION_EVENTS events in arrays of RETENTION_BATCH,
    sampling the database at every tenth; with keep, wait for the pruner and count /audit/e0.
    The server is stopped here, so the last sample is the file once the WAL is checkpointed (on
    PostgreSQL: the tables with no broker connected)."""
    args = bench.args
    step = max(RETENTION_BATCH, args.retention_inserts // RETENTION_SAMPLES)
    seconds = RETENTION_LOAD_SECONDS + (args.retention_inserts / args.retention_rate if args.retention_rate
                                        else 0)
    started = time.monotonic()
    samples = [retention_sample(server, started, "0 (start)")]
    meter = Meter(server)
    client = ClientProcess(publisher_worker, port=server.port, connections=retention_connections(args),
                           count=args.retention_inserts, seconds=seconds, event="e", rate=args.retention_rate,
                           distinct=RETENTION_EVENTS, quickack=True, batch=RETENTION_BATCH, progress=step)
    try:
        while True:
            message = client.receive(seconds + 60)
            if not isinstance(message, tuple):
                break
            samples.append(retention_sample(server, started, f"{message[1]:,}"))
    finally:
        client.finish()
    cpu, _waited = meter.read()
    database_cpu, _ = meter.read_database()
    acked = len(message["ids"])
    figures = {"acked": acked, "refused": sum(message["statuses"].values()), "load_s": message["seconds"],
               "per_s": per(acked, message["seconds"]), "cpu_us_per_insert": per(cpu, acked, 1e6),
               "postgres_us_per_insert": per(database_cpu, acked, 1e6), "end_mib": samples[-1]["total_mib"]}
    if keep:
        caught_up = wait_for_pruner(server, RETENTION_EVENTS * keep)
        samples.append(retention_sample(server, started, f"pruner done (+{caught_up:.1f} s)"))
        status, body = http_get(server.port, "/audit/e0")
        figures.update(caught_up_s=caught_up, pruned=samples[-1]["pruned"], kept=samples[-1]["kept"],
                       audit_e0=len(json.loads(body)) if status == 200 else None)
    figures["peak_mib"] = max(sample["total_mib"] for sample in samples)
    server.stop()
    file_mib, wal_mib = database_mib(server)
    samples.append({"label": "after stop", "s": time.monotonic() - started, "file_mib": file_mib,
                    "wal_mib": wal_mib, "total_mib": file_mib + (wal_mib or 0)})
    figures.update(stopped_mib=file_mib + (wal_mib or 0), samples=samples)
    return figures


def scenario_retention(bench):
    args = bench.args
    if bench.broker is None:
        return []
    # Once each, one after the other: the load takes a while, and the floor keeps no history.
    runs = {}
    for label, extra in (("keep", ["--keep-versions", str(RETENTION_KEEP)]), ("all", [])):
        log(f"  retention: broker {' '.join(extra) or 'without retention'}")
        with bench.server(bench.broker, ["--sync", "normal", *extra]) as server:
            runs[label] = retention_run(bench, server, RETENTION_KEEP if extra else None)
    keep, everything = runs["keep"], runs["all"]
    columns = ["inserts", "s", "file MiB", "wal MiB", "file+wal MiB", "versions kept", "pruned",
               "s", "file+wal MiB"]
    theirs = {sample["label"]: sample for sample in everything["samples"]}     # same labels, no pruner
    rows = [[mine["label"], mine["s"], mine["file_mib"], mine["wal_mib"], mine["total_mib"], mine.get("kept"),
             mine.get("pruned"), *((theirs[mine["label"]]["s"], theirs[mine["label"]]["total_mib"])
                                   if mine["label"] in theirs else (None, None))]
            for mine in keep["samples"]]
    expected_pruned = max(0, keep["acked"] - RETENTION_EVENTS * RETENTION_KEEP)
    figures = {
        "keep_acked": keep["acked"], "keep_refused": keep["refused"], "keep_per_s": keep["per_s"],
        "keep_cpu_us": keep["cpu_us_per_insert"], "keep_postgres_us": keep["postgres_us_per_insert"],
        "caught_up_s": keep["caught_up_s"],
        "audit_e0": keep["audit_e0"], "pruned": keep["pruned"], "kept": keep["kept"],
        "keep_end_mib": keep["end_mib"], "keep_peak_mib": keep["peak_mib"],
        "keep_stopped_mib": keep["stopped_mib"],
        "all_acked": everything["acked"], "all_refused": everything["refused"],
        "all_per_s": everything["per_s"],
        "all_cpu_us": everything["cpu_us_per_insert"], "all_postgres_us": everything["postgres_us_per_insert"],
        "all_end_mib": everything["end_mib"],
        "all_stopped_mib": everything["stopped_mib"],
        "end_ratio": ratio(keep["end_mib"], everything["end_mib"]),
        "stopped_ratio": ratio(keep["stopped_mib"], everything["stopped_mib"])}
    pace = f"at {args.retention_rate:,g}/s" if args.retention_rate else "as fast as acknowledged"
    connections = retention_connections(args)
    title = (f"retention: {args.retention_inserts:,} inserts on {RETENTION_EVENTS} events, {pace}, in arrays "
             f"of {RETENTION_BATCH:,} over {connections} keep-alive connection{'s' * (connections > 1)}, "
             f"--sync normal (broker only)")
    notes = ["versions kept = broker_inserts_total - broker_records_pruned_total (GET /metrics); sizes are "
             "the files on disk when that many inserts were acknowledged"]
    if bench.postgres:
        notes += ["on PostgreSQL, 'file' is broker.py's tables with their indexes and TOAST "
                  "(pg_total_relation_size) and the WAL is not measured: it is the whole cluster's, recycled "
                  "at checkpoints; --sync normal is synchronous_commit off",
                  "after stop: the same tables with no broker connected; deleted rows leave space that "
                  "(auto)vacuum marks for reuse, and the files do not shrink"]
    else:
        notes.append("after stop: the broker has closed the database, so the WAL is checkpointed into the "
                     "file and removed")
    series = SeriesTable(title, [(f"--keep-versions {RETENTION_KEEP}", 6), ("no retention", 2)], columns, rows,
                         notes=notes)
    summary = Table(f"retention: --keep-versions {RETENTION_KEEP} beside no retention",
                    {bench.broker: [figures]}, [
        (f"keep {RETENTION_KEEP}: inserts acknowledged", "keep_acked", ("==", args.retention_inserts)),
        ("  inserts refused (non-200)", "keep_refused", ("==", 0)),
        ("  inserts per s", "keep_per_s", None),
        ("  server CPU us per insert", "keep_cpu_us", None),
        *postgres_rows(bench, ("  PostgreSQL CPU us per insert", "keep_postgres_us", None)),
        ("  s the pruner took after the load", "caught_up_s", None),
        ("  versions kept (inserted - pruned)", "kept", ("==", RETENTION_EVENTS * RETENTION_KEEP)),
        ("  broker_records_pruned_total", "pruned", ("==", expected_pruned)),
        ("  /audit/e0 entries", "audit_e0", ("==", RETENTION_KEEP)),
        ("  file+wal MiB at the end of the load", "keep_end_mib", None),
        ("  largest file+wal MiB seen", "keep_peak_mib", None),
        ("  file MiB after stop", "keep_stopped_mib", None),
        ("no retention: inserts acknowledged", "all_acked", ("==", args.retention_inserts)),
        ("  inserts refused (non-200)", "all_refused", ("==", 0)),
        ("  inserts per s", "all_per_s", None),
        ("  server CPU us per insert", "all_cpu_us", None),
        *postgres_rows(bench, ("  PostgreSQL CPU us per insert", "all_postgres_us", None)),
        ("  file+wal MiB at the end of the load", "all_end_mib", None),
        ("  file MiB after stop", "all_stopped_mib", None),
        ("end-of-load file+wal, keep / none", "end_ratio", None),
        ("file after stop, keep / none", "stopped_ratio", None),
    ])
    return [series, summary]


# --- command line -------------------------------------------------------------------------------------

def comma_ints(text):
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="bench_broker.py", description=__doc__.split("\n\n")[0].split(" - ", 1)[1],
        epilog="Sizes default to the full column, or the quick one with --quick. Internal: "
               "--serve-floor --port N runs the floor server itself.")
    parser.add_argument("--quick", action="store_true", help="small sizes for `make bench` (under 2 minutes)")
    parser.add_argument("--scenarios", default=None,
                        help=f"comma-separated, in this order: {','.join(SCENARIOS)} (by default all "
                             f"but {','.join(ON_REQUEST)}, and on SQLite but {','.join(POSTGRES_ONLY)})")
    parser.add_argument("--servers", default="broker,floor", help="broker,floor; floor alone tests the harness")
    parser.add_argument("--broker", default=os.path.join(HERE, "broker.py"), help="path to broker.py")
    parser.add_argument("--workers", type=comma_ints, default=[1], metavar="LIST",
                        help=f"broker.py --workers counts, comma-separated (default 1: one process, no flag): "
                             f"{', '.join(WORKER_SCENARIOS)} run a broker per count side by side, with "
                             f"the ratio to 1 worker; other scenarios run the first count")
    parser.add_argument("--db", default="sqlite", metavar="STORE",
                        help="sqlite: a temp file per broker (the default); postgres: a new database per broker "
                             "on a private PostgreSQL cluster, fsync on; or the postgresql:// URL of a server "
                             "whose user may CREATE DATABASE. PostgreSQL needs psycopg (.venv/bin/python)")
    parser.add_argument("--broker-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for broker.py, repeatable (e.g. --broker-arg=--sync=normal)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the servers")
    parser.add_argument("--json", default=os.path.join("tmp", "bench.json"), help="write the tables here")
    parser.add_argument("--client-procs", type=int, default=2, help="processes the subscribers are split over")
    parser.add_argument("--inflight", type=int, default=200, help="subscriber connections opening at once")
    for name, quick, _full, help_text in SIZES:
        convert = comma_ints if isinstance(quick, str) else type(quick)
        parser.add_argument("--" + name.replace("_", "-"), type=convert, default=None,
                            help=f"{help_text} (quick {quick}, full {_full})")
    args = parser.parse_args(argv)
    for name, quick, full, _help in SIZES:
        if getattr(args, name) is None:
            default = quick if args.quick else full
            setattr(args, name, comma_ints(default) if isinstance(default, str) else default)
    on_postgres = args.db != "sqlite"
    if args.scenarios is None:
        args.scenarios = ",".join(name for name in SCENARIOS
                                  if name not in ON_REQUEST and (on_postgres or name not in POSTGRES_ONLY))
    args.scenarios = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    args.servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    unknown = set(args.scenarios) - set(SCENARIOS) or set(args.servers) - set(SERVERS)
    if unknown:
        parser.error(f"unknown scenario or server: {', '.join(sorted(unknown))}")
    if not args.workers or min(args.workers) < 1 or len(set(args.workers)) < len(args.workers):
        parser.error("--workers takes distinct counts of 1 or more, e.g. 1,2")
    if "broker" in args.servers and not os.path.isfile(args.broker):
        parser.error(f"no broker at {args.broker} (use --servers floor to test the harness alone)")
    if args.db not in ("sqlite", "postgres") and not is_postgres_url(args.db):
        parser.error("--db takes sqlite, postgres or a postgresql:// URL")
    if not on_postgres and set(args.scenarios) & set(POSTGRES_ONLY):
        parser.error(f"{', '.join(POSTGRES_ONLY)} needs --db postgres (or a postgresql:// URL): its brokers "
                     f"share one database")
    if on_postgres:
        from test_postgres import PostgresServer
        missing = PostgresServer.missing() if args.db == "postgres" else None
        if importlib.util.find_spec("psycopg") is None:
            missing = "psycopg is not installed here: run the bench with .venv/bin/python"
        if missing:
            parser.error(f"--db {args.db}: {missing}")
    return args


def cleanup():
    """Stop every client and server this run started; safe to call more than once."""
    for client in list(ClientProcess.live):
        client.finish(timeout=0)
    for server in list(ServerProcess.live):
        server.stop(timeout=5)


def interrupted(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_scenarios(bench):
    postgres_note = (f"broker.py on {bench.postgres.describe()}, a new database per broker; PostgreSQL CPU: "
                     f"the postmaster and its children (the backends)" if bench.postgres else None)
    tables = []
    for name in SCENARIOS:
        if name not in bench.args.scenarios:
            continue
        log(f"{name} ...")
        started = time.monotonic()
        try:
            scenario_tables = globals()[f"scenario_{name}"](bench)
        except Exception:          # one broken scenario should not hide the others' figures
            print(f"== {name}: FAILED\n{traceback.format_exc()}", flush=True)
            continue
        for table in scenario_tables:
            if bench.has_workers(getattr(table, "kinds", ())):
                table.notes.append(WORKERS_NOTE + (RATIO_NOTE if table.scaled else ""))
            if postgres_note and name not in POSTGRES_ONLY:
                table.notes.append(postgres_note)
            table.notes.append(f"scenario took {time.monotonic() - started:.0f} s")
            print("\n".join(table.lines()) + "\n", flush=True)
            tables.append(table)
    return tables


def write_json(path, args, tables, started, postgres):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
              "seconds": time.time() - started, "argv": sys.argv[1:], "quick": args.quick,
              "db": postgres.describe() if postgres else "SQLite",
              "cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": sys.version.split()[0],
              "tables": [table.to_json() for table in tables]}
    with open(path, "w") as file:
        json.dump(report, file, indent=1, default=list)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-floor"]:
        return floor_main(argv[1:])
    args = parse_args(argv)
    raise_open_file_limit()
    signal.signal(signal.SIGTERM, interrupted)
    started = time.time()
    try:
        postgres = None if args.db == "sqlite" else PostgresDatabases(None if args.db == "postgres" else args.db)
    except Exception as error:          # psycopg's, or a cluster that would not start
        print(f"bench_broker.py: cannot use --db {args.db}: {error}", file=sys.stderr)
        return 2
    workers = f" (workers {','.join(map(str, args.workers))})" if args.workers != [1] else ""
    store = f", broker.py on {postgres.describe()}" if postgres else ""
    print(f"bench_broker: {'quick' if args.quick else 'full'} run, servers {','.join(args.servers)}{workers}, "
          f"{args.repeat} run(s) each, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}{store}\n", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_broker.") as workdir:
            tables = run_scenarios(Bench(args, workdir, postgres))
            write_json(args.json, args, tables, started, postgres)
    except KeyboardInterrupt:
        log("interrupted: stopping servers and clients")
        return 130
    finally:
        cleanup()
        if postgres:
            postgres.close()
    print(f"total {time.time() - started:.0f} s, load average now "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; JSON in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
