"""What every stress phase shares: a `gpt2serve serve` subprocess on loopback, /proc readings of it,
OpenAI error-shape checks, an SSE reader and a direct (read-only) view of the accounts database.

Nothing here imports gpt2serve: the server is a process reached over HTTP (the `keys` operator
command mints and revokes keys, as an operator would), and the ledger is read with plain SQL.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of xs; None for no data."""
    if not xs:
        return None
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def median(xs: list[float]) -> float | None:
    return percentile(xs, 50)


@dataclass
class ProcStats:
    rss_kb: int
    threads: int
    fds: int


class Server:
    """`python -m gpt2serve.cli serve` on 127.0.0.1:<free port>, its stdout+stderr in `log_path`.

    The server runs at its default log level (what the abuse phase scans for leaked secrets)
    unless `log_level` is given. `env` adds GPT2SERVE_* settings that have no CLI flag."""

    def __init__(self, workdir: Path, *, model: str = "random:gpt2-tiny", database_url: str | None = None,
                 auth: bool = True, env: dict[str, str] | None = None, args: list[str] | None = None,
                 log_level: str | None = None, name: str = "server"):
        self.workdir = Path(workdir).resolve()  # the server runs there: relative paths would move
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.database_url = database_url or f"sqlite:///{self.workdir / (name + '.db')}"
        self.auth = auth
        self.env = env or {}
        self.args = args or []
        self.log_level = log_level
        self.log_path = self.workdir / f"{name}.log"
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._log = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "gpt2serve.cli", "serve", "--model", self.model, "--host", LOOPBACK,
               "--port", str(self.port), "--database-url", self.database_url, "--dtype", "float32",
               "--device", "cpu", "--auth" if self.auth else "--no-auth", *self.args]
        if self.log_level:
            cmd += ["--log-level", self.log_level]
        return cmd

    def start(self, timeout: float = 180.0) -> "Server":
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                     env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                r = httpx.get(self.url + "/health", timeout=5)
                if r.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise TimeoutError(f"server not healthy after {timeout}s:\n{self.log_text()[-3000:]}")

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful), SIGKILL after `timeout`; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._close_log()
        return self.proc.returncode

    def kill(self) -> int | None:
        """SIGKILL: no shutdown code of the server runs."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._close_log()
        return self.proc.returncode

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def proc_stats(self) -> ProcStats:
        """Resident memory, threads and open file descriptors of the server process (Linux /proc)."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return ProcStats(rss_kb=int(fields["VmRSS"].split()[0]), threads=int(fields["Threads"]),
                         fds=len(os.listdir(f"/proc/{self.pid}/fd")))

    # -- operator commands (the `gpt2serve keys` CLI on the same database) ------------------------

    def _keys(self, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        return subprocess.run([sys.executable, "-m", "gpt2serve.cli", "keys", "--database-url", self.database_url,
                               *args], capture_output=True, text=True, env=env, cwd=self.workdir, check=True,
                              timeout=120)

    def create_key(self, credit_usd: float = 1000.0, account: int | None = None) -> str:
        """A new key (on a new account with `credit_usd`, or on `account`); the plaintext."""
        args = ["create", "--credit", str(credit_usd)] if account is None else ["create", "--account", str(account)]
        return self._keys(*args).stdout.strip().splitlines()[0]

    def revoke_key(self, key: str) -> None:
        self._keys("revoke", key[:11])  # by its prefix, as `keys list` shows it

    # -- HTTP views ---------------------------------------------------------------------------------

    def health(self, timeout: float = 10.0) -> dict:
        return httpx.get(self.url + "/health", timeout=timeout).json()

    def metrics(self) -> dict[str, float]:
        """Unlabelled and labelled samples of /metrics: name{labels} -> value."""
        out: dict[str, float] = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out

    def wait_idle(self, timeout: float = 60.0) -> dict:
        """/health once nothing runs or waits (or the last reading at the deadline)."""
        deadline = time.monotonic() + timeout
        h = self.health()
        while time.monotonic() < deadline:
            h = self.health()
            if h.get("running") == 0 and h.get("waiting") == 0:
                return h
            time.sleep(0.1)
        return h


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


# ---------------------------------------------------------------------------------------- errors

ERROR_FIELDS = {"message", "type", "param", "code"}


def error_problem(r: httpx.Response, param: str | None | bool = False) -> str | None:
    """Why `r` (a 4xx) is not in OpenAI's error shape, or None if it is.

    param: False = don't check; None = must be null; a string = must be that parameter (or start
    with it: "messages[0].content" names "messages"); True = must name some parameter."""
    if "application/json" not in r.headers.get("content-type", ""):
        return f"content-type {r.headers.get('content-type')!r}"
    try:
        body = r.json()
    except ValueError:
        return "body is not JSON"
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict) or not ERROR_FIELDS <= set(err):
        return f"not {{'error': {{message, type, param, code}}}}: {str(body)[:200]}"
    if not isinstance(err["message"], str) or not err["message"] or not isinstance(err["type"], str):
        return f"empty message or type: {err}"
    if param is True and not err["param"]:
        return f"param not named: {err}"
    if isinstance(param, str) and not (isinstance(err["param"], str) and err["param"].startswith(param)):
        return f"param {err['param']!r}, expected {param!r}: {err['message'][:150]}"
    if param is None and err["param"] is not None:
        return f"param {err['param']!r}, expected null"
    return None


# ------------------------------------------------------------------------------------------- SSE


@dataclass
class StreamResult:
    status: int
    generation_id: str | None = None
    ttft: float | None = None  # seconds from sending to the first chunk with text
    chunks: int = 0
    tokens: int = 0  # completion tokens received (counted from logprobs.tokens when asked for)
    text: str = ""
    done: bool = False  # saw data: [DONE]
    usage: dict | None = None
    error: str | None = None
    events: list[str] = field(default_factory=list)


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict, headers: dict | None = None,
                            stop_after_chunks: int | None = None) -> StreamResult:
    """POST a streaming /v1/completions and read it; leave after `stop_after_chunks` text chunks."""
    t0 = time.monotonic()
    async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
        res = StreamResult(status=r.status_code, generation_id=r.headers.get("x-generation-id"))
        if r.status_code != 200:
            await r.aread()
            res.error = r.text[:300]
            return res
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                res.done = True
                break
            obj = json.loads(data)
            if "error" in obj:
                res.error = data[:300]
                continue
            if obj.get("usage"):
                res.usage = obj["usage"]
            for ch in obj.get("choices") or []:
                lp = ch.get("logprobs")
                if lp and lp.get("tokens"):
                    res.tokens += len(lp["tokens"])
                if ch.get("text"):
                    res.text += ch["text"]
                    res.chunks += 1
                    if res.ttft is None:
                        res.ttft = time.monotonic() - t0
            if stop_after_chunks is not None and res.chunks >= stop_after_chunks:
                break  # leaving the block closes the connection mid-stream
        return res


# ----------------------------------------------------------------------------- the ledger, in SQL


class Ledger:
    """Read-only SQL over the accounts tables (accounts, ledger_entries, reservations, generations)."""

    def __init__(self, database_url: str):
        from sqlalchemy import create_engine

        self.engine = create_engine(database_url)

    def close(self) -> None:
        self.engine.dispose()

    def q(self, sql: str, **params) -> list[Any]:
        from sqlalchemy import text

        with self.engine.connect() as conn:
            return list(conn.execute(text(sql), params).all())

    def one(self, sql: str, **params) -> Any:
        return self.q(sql, **params)[0]

    def audit(self, account_id: int | None = None) -> dict[str, int]:
        """Counters vs journal vs reservations, for one account or all of them."""
        where = "" if account_id is None else " WHERE account_id = :a"
        wa = "" if account_id is None else " WHERE id = :a"
        p = {} if account_id is None else {"a": account_id}
        credits, usage, reserved = self.one(
            f"SELECT COALESCE(SUM(credits_micros),0), COALESCE(SUM(usage_micros),0), COALESCE(SUM(reserved_micros),0) "
            f"FROM accounts{wa}", **p)
        journal = self.one(f"SELECT COALESCE(SUM(amount_micros),0) FROM ledger_entries{where}", **p)[0]
        usage_entries = self.one(
            f"SELECT COALESCE(-SUM(amount_micros),0), COUNT(*) FROM ledger_entries{where}"
            f"{' AND' if where else ' WHERE'} kind = 'usage'", **p)
        open_n, open_sum = self.one(
            f"SELECT COUNT(*), COALESCE(SUM(amount_micros),0) FROM reservations{where}"
            f"{' AND' if where else ' WHERE'} status = 'open'", **p)
        charged = self.one(f"SELECT COALESCE(SUM(charged_micros),0) FROM reservations{where}", **p)[0]
        gen_cost = self.one(f"SELECT COALESCE(SUM(cost_micros),0) FROM generations{where}", **p)[0]
        dup = self.one(
            f"SELECT COUNT(*) FROM (SELECT generation_id FROM ledger_entries{where}"
            f"{' AND' if where else ' WHERE'} kind = 'usage' GROUP BY generation_id HAVING COUNT(*) > 1) d", **p)[0]
        return {"credits_micros": int(credits), "usage_micros": int(usage), "reserved_micros": int(reserved),
                "balance_micros": int(credits) - int(usage), "journal_micros": int(journal),
                "usage_entries_micros": int(usage_entries[0]), "usage_entries": int(usage_entries[1]),
                "open_reservations": int(open_n), "open_reservations_micros": int(open_sum),
                "charged_micros": int(charged), "generations_cost_micros": int(gen_cost),
                "double_charged_generations": int(dup)}


def ledger_problems(a: dict[str, int]) -> list[str]:
    """Every way an audit can be out of balance, in words (empty: balanced to the micro-unit)."""
    out = []
    if a["balance_micros"] != a["journal_micros"]:
        out.append(f"credits - usage {a['balance_micros']} != journal {a['journal_micros']}")
    if a["usage_micros"] != a["usage_entries_micros"]:
        out.append(f"usage counter {a['usage_micros']} != usage entries {a['usage_entries_micros']}")
    if a["usage_micros"] != a["charged_micros"]:
        out.append(f"usage counter {a['usage_micros']} != charged by reservations {a['charged_micros']}")
    if a["usage_micros"] != a["generations_cost_micros"]:
        out.append(f"usage counter {a['usage_micros']} != usage records {a['generations_cost_micros']}")
    if a["reserved_micros"] != a["open_reservations_micros"]:
        out.append(f"reserved counter {a['reserved_micros']} != open reservations {a['open_reservations_micros']}")
    if a["double_charged_generations"]:
        out.append(f"{a['double_charged_generations']} generation(s) charged twice")
    return out


def key_account(server: Server, key: str) -> int:
    """The account id of a key, from the ledger (the HTTP API does not show it)."""
    led = Ledger(server.database_url)
    try:
        return int(led.one("SELECT account_id FROM api_keys WHERE prefix = :p", p=key[:11])[0])
    finally:
        led.close()
