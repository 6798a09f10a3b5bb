"""`msknode bench load` on PostgreSQL + Redis: starts both on loopback, runs the benchmark with their URLs, stops them.

PostgreSQL 15 (Debian ``/usr/lib/postgresql/15``, initdb as the ``postgres`` user, fsync ON, unlike the
test fixture) and redis-server (no persistence: the broker only carries wake-ups) on free ports; every
argument after the work directory goes to ``msknode bench load``:

    .venv/bin/python scripts/bench_load_servers.py /tmp/load-pg --studies 12 --rate 4 --workers 2 --json
"""

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.demo.loopback import child_env, free_port
from tests.support import servers


class DurablePostgres(servers.PostgresServer):
    """The test cluster, with fsync on (durable commits, as a site runs it)."""

    def start(self):
        import shutil

        shutil.chown(self.dir, user="postgres", group="postgres")
        self._as_postgres(
            str(self.BIN / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        )
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.dir} -c max_connections=200"
        )
        self._as_postgres(
            str(self.BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            opts,
            "-l",
            str(self.dir / "pg.log"),
            "-w",
            "-t",
            "60",
            "start",
        )
        return self


if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
    sys.exit(f"usage: {sys.argv[0]} WORKDIR [msknode bench load options]")
work = Path(sys.argv[1])
work.mkdir(parents=True, exist_ok=True)
pg = DurablePostgres(free_port()).start()
redis = servers.RedisServer(work / "redis", free_port()).start()
try:
    url = pg.create_database("msknode_load")
    cmd = [
        str(Path(sys.executable).parent / "msknode"),
        "bench",
        "load",
        "--database-url",
        url,
        "--broker-url",
        redis.url,
        *sys.argv[2:],
    ]
    print(" ".join(cmd), file=sys.stderr, flush=True)
    rc = subprocess.run(cmd, env=child_env(), cwd=work).returncode
finally:
    redis.stop()
    pg.stop()
sys.exit(rc)
