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
from test_broker import EventStream, call, insert, unique_event, wait_until

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
               test_broker.RetentionTests, test_broker.SyncSnapshotTests, test_broker.ClientTests):
    _name = "Postgres" + _tests.__name__
    globals()[_name] = type(_name, (_tests,), {"POSTGRES": None})
    CONTRACT_TESTS.append(globals()[_name])
del _tests, _name
