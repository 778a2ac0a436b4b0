"""Tests of the PostgreSQL store (--db postgresql://...): a real PostgreSQL server that these
tests start themselves, several broker nodes on it, and the endpoint tests of test_broker.py
once more against PostgreSQL.

    python3 -m unittest -v test_postgres

PostgresServer initdbs a cluster into a temporary folder and starts it with pg_ctl on a free
port of 127.0.0.1, as an unprivileged user when this process is root (PostgreSQL refuses to run
as root); deploy/ and bench_broker.py use it too. It needs PostgreSQL's server programs and
psycopg 3: deploy/install-postgres.sh installs both. Without them these tests skip, and under
CI=true they fail instead.
"""
import contextlib
import glob
import itertools
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse

import broker
import test_broker
from test_broker import TIMEOUT, EventStream, call, unique_event, wait_until

HERE = os.path.dirname(os.path.abspath(__file__))
_databases = itertools.count(1)


def server_programs():
    """The folder holding initdb and pg_ctl: on PATH, else Debian's newest version."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return os.path.dirname(os.path.realpath(found))
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda path: int(path.split("/")[-2]))
    return folders[-1] if folders and os.path.exists(os.path.join(folders[-1], "pg_ctl")) else None


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """One cluster of its own, removed by close(). settings are extra `-c name=value`s."""

    def __init__(self, fsync=False, settings=()):
        self.bin = server_programs()
        if self.bin is None:
            raise RuntimeError("PostgreSQL's server programs (initdb, pg_ctl) are not installed")
        self.folder = tempfile.mkdtemp(prefix="broker-pg-")
        os.chmod(self.folder, 0o755)
        self.data = os.path.join(self.folder, "data")
        self.log = os.path.join(self.folder, "postgres.log")
        self.port = free_port()
        self.user = None
        if os.geteuid() == 0:
            self.user = pwd.getpwnam("postgres" if _has_user("postgres") else "nobody")
            os.chown(self.folder, self.user.pw_uid, self.user.pw_gid)
        options = ["-c listen_addresses=127.0.0.1", f"-c unix_socket_directories={self.folder}",
                   "-c max_connections=300", f"-c fsync={'on' if fsync else 'off'}", *[f"-c {s}" for s in settings]]
        self.options = " ".join([f"-p {self.port}", *options])
        try:
            self._run("initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                      "--locale=C", *([] if fsync else ["--no-sync"]))
            self.start()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def missing():
        """Why PostgreSQL tests cannot run here, or None."""
        if server_programs() is None:
            return "PostgreSQL's server programs are not installed (sh deploy/install-postgres.sh)"
        try:
            import psycopg  # noqa: F401
        except ImportError:
            return 'psycopg is not installed (sh deploy/install-postgres.sh, or pip install "psycopg[binary]")'
        return None

    def url(self, database="postgres"):
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self):
        """The URL of a new, empty database on this server."""
        import psycopg
        name = f"test_{next(_databases)}"
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def start(self):
        self._run("pg_ctl", "-D", self.data, "-l", self.log, "-o", self.options, "-w", "-t", "60", "start")

    def stop(self, mode="fast"):
        """fast: sessions are ended and the server shuts down cleanly; immediate: as a crash."""
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop")

    def processes(self):
        """The server's process ids: the postmaster's, then its children's."""
        with open(os.path.join(self.data, "postmaster.pid")) as file:
            postmaster = int(file.readline())
        with open(f"/proc/{postmaster}/task/{postmaster}/children") as file:
            return [postmaster, *map(int, file.read().split())]

    def running(self):
        return subprocess.run(self._command("pg_ctl", "-D", self.data, "status"), **self._as_user(),
                              capture_output=True).returncode == 0

    def close(self):
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            subprocess.run(self._command("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop"),
                           **self._as_user(), capture_output=True)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _command(self, program, *args):
        return [os.path.join(self.bin, program), *args]

    def _as_user(self):
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": [],
                "env": {**os.environ, "HOME": self.folder, "USER": self.user.pw_name}}

    def _run(self, program, *args):
        result = subprocess.run(self._command(program, *args), **self._as_user(), capture_output=True,
                                text=True, cwd=self.folder)
        if result.returncode != 0:
            log = open(self.log).read()[-2000:] if os.path.exists(self.log) else ""
            raise RuntimeError(f"{program} failed ({result.returncode}): {result.stderr.strip()}\n{log}")


def _has_user(name):
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


SERVER = None          # the PostgresServer of this module's tests, started by setUpModule


def setUpModule():
    global SERVER
    missing = PostgresServer.missing()
    if missing:
        if os.environ.get("CI") == "true":
            raise RuntimeError(f"CI=true, and the PostgreSQL tests cannot run: {missing}")
        raise unittest.SkipTest(missing)
    SERVER = PostgresServer()
    for test_class in CONTRACT_TESTS:
        test_class.POSTGRES = SERVER


def tearDownModule():
    if SERVER is not None:
        SERVER.close()


# The endpoint tests of test_broker.py once more, each class on a new PostgreSQL database
# (test_broker.start_broker() reads POSTGRES).
CONTRACT_TESTS = []
for _tests in (test_broker.InsertTests, test_broker.EventsTests, test_broker.MatchTests, test_broker.BatchInsertTests,
               test_broker.AuditTests, test_broker.TokenTests, test_broker.JwtTests, test_broker.CorsTests,
               test_broker.RoutingTests, test_broker.FramingTests, test_broker.MetricsTests,
               test_broker.RetentionTests, test_broker.SyncSnapshotTests, test_broker.ClientTests,
               test_broker.PersistenceTests, test_broker.MemoryTests, test_broker.LimitTests):
    _name = "Postgres" + _tests.__name__
    globals()[_name] = type(_name, (_tests,), {"POSTGRES": None})
    CONTRACT_TESTS.append(globals()[_name])
for _tests in (test_broker.InsertTests, test_broker.EventsTests, test_broker.MetricsTests):     # --workers 2: two nodes in one
    _name = "PostgresWorker" + _tests.__name__
    globals()[_name] = type(_name, (_tests,), {"POSTGRES": None, "WORKERS": 2})
    CONTRACT_TESTS.append(globals()[_name])
del _tests, _name


def start_node(test, url, *args):
    """python broker.py --db url: one node, stopped at cleanup; (process, Remote)."""
    return test_broker.run_broker_process(test, "--db", url, *args)


def publish(node, event, data):
    return broker.publish_to(node.url, event, data)


def run_broker(*args, env=None, timeout=30):
    """python broker.py ... expected to exit: (exit code, stderr)."""
    result = subprocess.run([sys.executable, os.path.join(HERE, "broker.py"), "--port", "0", *args],
                            capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    return result.returncode, result.stderr


def sql(url, statement, params=()):
    """Run one statement on the database at url; its rows (None for a statement without)."""
    import psycopg
    with psycopg.connect(url, autocommit=True) as db:
        cursor = db.execute(statement, params)
        return cursor.fetchall() if cursor.description else None


def tables(url):
    return sorted(name for name, in sql(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))


class Reader(threading.Thread):
    """A live /events stream read on its own thread: every record, in the order it came."""

    def __init__(self, node, last_event_id=None):
        super().__init__(daemon=True)
        headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
        self.stream = EventStream(node, headers=headers, timeout=30)
        self.records, self.block = self.stream.read_sync()     # the sync, then the id-only block
        self.heartbeats = 0
        self.error = None
        self.start()

    def run(self):
        try:
            while True:
                block = self.stream.read_block()
                if "data" in block:
                    self.records.append({"id": int(block["id"]), "event": block["event"], "data": json.loads(block["data"])})
                elif "comment" in block:
                    self.heartbeats += 1
        except (OSError, EOFError) as error:
            self.error = error

    def ids(self):
        return [record["id"] for record in self.records]

    def close(self):
        self.stream.close()


class StartTests(unittest.TestCase):
    """--db postgresql://...: one line and an exit code for each way it cannot start."""

    def test_without_psycopg_it_exits_2_saying_what_to_install(self):
        with tempfile.TemporaryDirectory() as folder:
            os.mkdir(os.path.join(folder, "psycopg"))
            with open(os.path.join(folder, "psycopg", "__init__.py"), "w") as module:
                module.write("raise ImportError('No module named psycopg')\n")   # as if not installed
            code, stderr = run_broker("--db", SERVER.url(), env={"PYTHONPATH": folder})
        self.assertEqual(code, 2)
        self.assertEqual(stderr, 'broker.py: error: the PostgreSQL store needs psycopg 3: pip install "psycopg[binary]"\n')

    def test_a_bad_url_a_refused_login_and_no_server_exit_1_in_one_line(self):
        port = free_port()
        for url, reason in [
                (f"postgresql://127.0.0.1:{port}x/db", "invalid"),
                (f"postgresql://nobody_here:s3cret@127.0.0.1:{SERVER.port}/postgres", 'role "nobody_here" does not exist'),
                (f"postgres://postgres:s3cret@127.0.0.1:{port}/postgres", "Connection refused")]:
            with self.subTest(url=url):
                started = time.monotonic()
                code, stderr = run_broker("--db", url)
                self.assertEqual(code, 1)
                self.assertLess(time.monotonic() - started, 15)
                self.assertRegex(stderr, r"^broker\.py: error: cannot connect to PostgreSQL at postgres(ql)?://[^\n]*\n$")
                self.assertIn(reason, stderr)
                self.assertNotIn("s3cret", stderr)         # the password is never printed

    def test_tables_of_our_names_that_are_not_ours_are_refused_untouched(self):
        url = SERVER.new_database()
        sql(url, "CREATE TABLE broker_records (note text)")
        sql(url, "INSERT INTO broker_records VALUES ('mine')")
        code, stderr = run_broker("--db", url)
        self.assertEqual(code, 1)
        self.assertEqual(stderr, f"broker.py: error: the database at {url} has a table broker_records that is not"
                                 " broker.py's; refusing to touch it\n")
        self.assertEqual(tables(url), ["broker_records"])
        self.assertEqual(sql(url, "SELECT * FROM broker_records"), [("mine",)])

    def test_a_database_not_encoded_utf8_is_refused(self):
        name = f"latin_{free_port()}"
        sql(SERVER.url(), f"CREATE DATABASE {name} ENCODING 'LATIN1' TEMPLATE template0")
        code, stderr = run_broker("--db", SERVER.url(name))
        self.assertEqual(code, 1)
        self.assertIn("is encoded LATIN1; broker.py needs UTF8", stderr)
        self.assertEqual(tables(SERVER.url(name)), [])

    def test_nodes_starting_at_once_on_an_empty_database_create_the_tables_once(self):
        url = SERVER.new_database()
        processes = [subprocess.Popen([sys.executable, os.path.join(HERE, "broker.py"), "--port", "0", "--quiet",
                                       "--db", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
        for process in processes:
            self.addCleanup(process.wait)
            self.addCleanup(process.terminate)
            self.addCleanup(process.stdout.close)
            self.addCleanup(process.stderr.close)
        lines = [process.stdout.readline().decode() for process in processes]
        for line, process in zip(lines, processes):
            self.assertTrue(line.startswith("broker listening on "), process.stderr.read() if not line else line)
        self.assertEqual(tables(url), ["broker_counter", "broker_latest", "broker_records"])
        nodes = [test_broker.Remote(line.split()[3]) for line in lines]
        ids = [publish(node, "start", n)["id"] for n, node in enumerate(nodes)]
        self.assertEqual(ids, [1, 2, 3, 4])
        self.assertEqual(sql(url, "SELECT last_id FROM broker_counter"), [(4,)])

    def test_the_listening_line_hides_the_password(self):
        process, node = start_node(self, SERVER.new_database().replace("postgres@", "postgres:pw@"))
        self.assertEqual(call(node, "GET", "/healthz")[1]["store"], "postgresql")


class NodesTests(unittest.TestCase):
    """Three nodes on one database: one broker, whichever node a client uses."""

    def setUp(self):
        self.url = SERVER.new_database()
        self.nodes = [start_node(self, self.url, "--heartbeat", "0.5")[1] for _ in range(3)]

    def test_every_subscriber_on_every_node_gets_every_record_once_in_id_order(self):
        early = [Reader(node) for node in self.nodes]
        acknowledged, lock = [], threading.Lock()

        def publish_on(node, number):
            for n in range(60):
                if n % 10 == 0:
                    records = broker.publish_many(node.url, [(f"n{number}", n), (f"m{number}", n)])
                else:
                    records = [publish(node, f"n{number}", n)]
                with lock:
                    acknowledged.extend(records)
        publishers = [threading.Thread(target=publish_on, args=(node, n)) for n, node in enumerate(self.nodes)]
        for thread in publishers:
            thread.start()
        time.sleep(0.05)
        late = [Reader(node) for node in self.nodes]       # joined while the inserts run
        for thread in publishers:
            thread.join()
        ids = sorted(record["id"] for record in acknowledged)
        self.assertEqual(ids, list(range(1, len(ids) + 1)))         # one counter: no gap, no reuse
        by_id = sorted(acknowledged, key=lambda record: record["id"])
        stamps = [record["timestamp"] for record in by_id]
        self.assertEqual(stamps, sorted(set(stamps)))               # strictly increasing with the ids
        for reader in early:
            wait_until(lambda: len(reader.records) >= len(ids), timeout=15)
            self.assertEqual(reader.ids(), ids)
            self.assertEqual([(r["event"], r["data"]) for r in reader.records],
                             [(r["event"], r["data"]) for r in by_id])
        for reader in late:
            # The sync: the latest of each event as of its id-only block; then every id after it.
            wait_until(lambda: reader.records and reader.records[-1]["id"] >= ids[-1], timeout=15)
            synced = [r for r in reader.records if r["id"] <= reader.block]
            latest_then = {}
            for record in by_id:
                if record["id"] <= reader.block:
                    latest_then[record["event"]] = record["id"]
            self.assertEqual([r["id"] for r in synced], sorted(latest_then.values()))
            self.assertEqual(reader.ids()[len(synced):], [i for i in ids if i > reader.block])
        for reader in early + late:
            reader.close()

    def test_a_slow_insert_holds_back_later_ones_so_no_subscriber_skips_it(self):
        # Node 1's insert takes its id, then waits (on a row lock this test holds) before it
        # commits; node 2 inserts meanwhile. With ids from a sequence node 2's record would
        # commit first with the next id, and a subscriber reading id > last would skip node
        # 1's for good. Here node 2's waits for node 1's, and both arrive in id order.
        import psycopg
        slow = unique_event(self)
        publish(self.nodes[0], slow, "first version")
        readers = [Reader(node) for node in self.nodes]
        with psycopg.connect(self.url) as blocker:
            blocker.execute("SELECT * FROM broker_latest WHERE event = %s FOR UPDATE", (slow,))
            results = {}
            first = threading.Thread(target=lambda: results.update(slow=publish(self.nodes[0], slow, "slow")))
            first.start()
            wait_until(lambda: sql(self.url, "SELECT count(*) FROM pg_locks WHERE NOT granted")[0][0] >= 1)
            second = threading.Thread(target=lambda: results.update(fast=publish(self.nodes[1], "fast", "fast")))
            second.start()
            wait_until(lambda: "fast" in results
                       or sql(self.url, "SELECT count(*) FROM pg_locks WHERE NOT granted")[0][0] >= 2)
            time.sleep(0.3)
            self.assertNotIn("slow", results)
            blocker.rollback()                            # node 1's insert goes on and commits
        first.join(TIMEOUT)
        second.join(TIMEOUT)
        self.assertEqual(results["fast"]["id"], results["slow"]["id"] + 1)
        self.assertGreater(results["fast"]["timestamp"], results["slow"]["timestamp"])
        for reader in readers:
            wait_until(lambda: len(reader.records) >= 3)
            time.sleep(0.2)                               # time to deliver anything out of order
            self.assertEqual([(r["event"], r["data"]) for r in reader.records[1:]], [(slow, "slow"), ("fast", "fast")])
            self.assertEqual(reader.ids()[1:], [results["slow"]["id"], results["fast"]["id"]])
            reader.close()

    def test_a_node_killed_with_kill_9_its_subscriber_resumes_on_another_with_exactly_what_it_missed(self):
        victim = start_node(self, self.url, "--heartbeat", "0.5")
        reader = Reader(victim[1])
        acknowledged, stop = [], threading.Event()

        def publish_until_stopped(node):
            while not stop.is_set():
                acknowledged.append(publish(node, "steady", len(acknowledged))["id"])
        publishers = [threading.Thread(target=publish_until_stopped, args=(node,)) for node in self.nodes[:2]]
        for thread in publishers:
            thread.start()
        wait_until(lambda: len(reader.records) >= 20)
        victim[0].send_signal(signal.SIGKILL)
        victim[0].wait()
        reader.join(TIMEOUT)                               # its stream ends with the node
        reader.close()
        self.assertIsInstance(reader.error, (OSError, EOFError))
        last = reader.ids()[-1]
        time.sleep(0.2)
        stop.set()
        for thread in publishers:
            thread.join()
        resumed = Reader(self.nodes[2], last_event_id=last)
        resumed.close()
        self.assertEqual(reader.ids() + resumed.ids(), sorted(acknowledged))

    def test_postgresql_stopped_and_started_inserts_fail_fast_streams_stay_and_catch_up(self):
        readers = [Reader(node) for node in self.nodes]
        publish(self.nodes[0], "before", 1)
        for reader in readers:
            wait_until(lambda: reader.ids() == [1])
        SERVER.stop()
        try:
            for node in self.nodes:
                started = time.monotonic()
                status, body, _ = call(node, "POST", "/insert", {"event": "during", "data": 1})
                self.assertEqual(status, 503, body)
                self.assertLess(time.monotonic() - started, 3)         # --request-timeout is 10 s
                self.assertIn("error", body)
                status, body, _ = call(node, "GET", "/healthz")
                self.assertEqual((status, body["status"], body["store"]), (503, "unavailable", "postgresql"))
                self.assertEqual(test_broker.metric(node, "broker_database_up"), 0)     # /metrics still answers
                status, body, headers = call(node, "GET", "/events")
                self.assertEqual((status, headers["Retry-After"]), (503, "5"))
                self.assertIn("cannot connect to PostgreSQL", body["error"])
                with EventStream(node, headers={"Accept": "text/event-stream"}) as browser:
                    self.assertEqual(browser.status, 200)       # a 503 would end an EventSource for good
                    self.assertEqual(browser.read_raw_block(), b"retry: 5000")
                    with self.assertRaises(EOFError):
                        browser.read_raw_block()
            beats = [reader.heartbeats for reader in readers]
            for reader, before in zip(readers, beats):
                wait_until(lambda: reader.heartbeats >= before + 2)          # the streams go on
                self.assertIsNone(reader.error)
        finally:
            SERVER.start()
        deadline = time.monotonic() + 15
        while True:                    # the node reconnects by itself; until then, 503s
            status, body, _ = call(self.nodes[1], "POST", "/insert", {"event": "after", "data": 2})
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.assertEqual(status, 200, body)
        after = [body["id"]] + [publish(node, "after", 3)["id"] for node in self.nodes]
        self.assertEqual(after, list(range(2, 6)))
        for reader in readers:
            wait_until(lambda: len(reader.records) >= 5, timeout=10)
            self.assertEqual(reader.ids(), [1, *after])
            self.assertIsNone(reader.error)
            reader.close()
        self.assertEqual(call(self.nodes[2], "GET", "/healthz")[1]["last_id"], 5)


class ReconnectTests(unittest.TestCase):
    """What a node does when its connections or notifications fail it."""

    def test_after_a_quiet_restart_the_first_insert_and_sync_on_each_node_succeed(self):
        url = SERVER.new_database()
        nodes = [start_node(self, url)[1] for _ in range(2)]
        for node in nodes:
            publish(node, "warm", 1)                        # each node's connections are open and idle
            with EventStream(node) as stream:
                stream.read_sync()
        SERVER.stop()
        SERVER.start()
        for n, node in enumerate(nodes):
            status, body, _ = call(node, "POST", "/insert", {"event": "after", "data": n})
            self.assertEqual(status, 200, body)
            with EventStream(node) as stream:
                self.assertEqual(stream.status, 200)
                self.assertEqual([r["event"] for r in stream.read_sync()[0]], ["warm", "after"])

    def test_a_commit_whose_notification_is_lost_still_arrives_by_the_periodic_check(self):
        url = SERVER.new_database()
        node = start_node(self, url)[1]
        reader = Reader(node)
        silent = broker.PostgresStore.INSERT.replace("pg_notify('broker_records'", "pg_notify('nobody_listens'")
        self.assertNotEqual(silent, broker.PostgresStore.INSERT)
        sql(url, silent, {"n": 1, "events": ["quiet"], "datas": ['"unannounced"']})
        wait_until(lambda: reader.records, timeout=broker.PostgresStore.FOLLOW_CHECK + 3)
        self.assertEqual(reader.records, [{"id": 1, "event": "quiet", "data": "unannounced"}])
        reader.close()

    def test_a_frozen_server_gets_inserts_a_503_well_inside_the_request_timeout(self):
        url = SERVER.new_database()
        node = start_node(self, url)[1]
        publish(node, "warm", 1)
        processes = SERVER.processes()
        for pid in processes:
            os.kill(pid, signal.SIGSTOP)         # it accepts TCP, and never answers
        try:
            started = time.monotonic()
            status, body, _ = call(node, "POST", "/insert", {"event": "frozen", "data": 1}, timeout=20)
            waited = time.monotonic() - started
        finally:
            for pid in processes:
                os.kill(pid, signal.SIGCONT)
        self.assertEqual(status, 503, body)
        self.assertLess(waited, broker.PostgresStore.ANSWER_SECONDS + 2)       # --request-timeout is 10 s
        self.assertIn("may or may not be stored", body["error"])
        deadline = time.monotonic() + 15
        while call(node, "POST", "/insert", {"event": "thawed", "data": 2})[0] != 200:
            self.assertLess(time.monotonic(), deadline)     # then it serves again, by itself
            time.sleep(0.2)
        status, body, _ = call(node, "GET", "/audit/thawed")
        self.assertEqual(list(body.values()), [2])
