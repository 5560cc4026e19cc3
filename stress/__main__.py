"""The reliability stress suite against `gpt2serve serve` subprocesses on 127.0.0.1.

    python -m stress all --duration 600                     # the full run (~15 min on 2 CPU cores)
    python -m stress all --quick                            # every phase, small (~2 min)
    python -m stress load --clients 64 --duration 600       # one phase
    python -m stress crash --postgres-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres

Writes <out>/report.json and <out>/report.md (figures and failures of each phase) and the server
logs next to them; exits 1 if any phase failed. Each phase gets its own server (and database), so
one phase's leftovers can't hide another's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from stress import abuse as abuse_mod
from stress import badinput, crash as crash_mod, disconnect as disconnect_mod, limits as limits_mod
from stress import load as load_mod
from stress.common import Server

PHASES = ["badinput", "load", "disconnect", "crash", "abuse", "limits"]
UNLIMITED = {"GPT2SERVE_RATE_LIMIT_RPM": "0", "GPT2SERVE_RATE_LIMIT_TPM": "0"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stress", description=__doc__.split("\n\n")[0])
    p.add_argument("phase", choices=PHASES + ["all"], nargs="?", default="all")
    p.add_argument("--model", default="random:gpt2-tiny")
    p.add_argument("--out", default="stress/reports/latest", help="folder for report.json, report.md, logs")
    p.add_argument("--quick", action="store_true", help="small numbers everywhere (a smoke run)")
    p.add_argument("--fuzz-cases", type=int, default=2000)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=600.0, help="load phase seconds")
    p.add_argument("--disconnects", type=int, default=1000)
    p.add_argument("--crash-requests", type=int, default=100)
    p.add_argument("--abuse-requests", type=int, default=10_000)
    p.add_argument("--timing-rounds", type=int, default=400)
    p.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                   help="admin URL of the loopback PostgreSQL for the crash phase ('' to skip it)")
    return p


def run(args: argparse.Namespace) -> dict:
    if args.quick:
        args.fuzz_cases, args.clients, args.duration = 300, 16, 20.0
        args.disconnects, args.abuse_requests, args.timing_rounds = 150, 1000, 150
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    phases = PHASES if args.phase == "all" else [args.phase]
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": args.model,
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "python": platform.python_version(), "load_avg_at_start": os.getloadavg()},
                    "argv": sys.argv[1:], "phases": {}}

    def record(name: str, fn) -> None:
        t0 = time.monotonic()
        print(f"[stress] {name} ...", flush=True)
        try:
            res = fn()
        except Exception as e:  # a phase that crashes is a failed phase, the others still run
            res = {"failures": [f"phase crashed: {type(e).__name__}: {e}"]}
        res["seconds"] = round(time.monotonic() - t0, 1)
        res["passed"] = not res.get("failures")
        report["phases"][name] = res
        print(f"[stress] {name}: {'PASS' if res['passed'] else 'FAIL'} in {res['seconds']}s", flush=True)
        for f in res.get("failures", [])[:10]:
            print(f"    {f}", flush=True)
        write(report, out)

    for phase in phases:
        if phase == "badinput":
            def fn():
                with Server(out, model=args.model, env=UNLIMITED, name="badinput") as s:
                    key = s.create_key(1000.0)
                    fz = badinput.fuzz(s, key, cases=args.fuzz_cases)
                    hs = badinput.hostile(s, key)
                    return {"fuzz": fz, "hostile": hs, "server_alive": s.alive(),
                            "failures": fz["failures"] + hs["failures"] + ([] if s.alive() else ["server died"])}
            record("badinput", fn)
        elif phase == "load":
            def fn():
                with Server(out, model=args.model, env=UNLIMITED, name="load") as s:
                    return load_mod.load(s, s.create_key(1000.0), clients=args.clients, duration=args.duration)
            record("load", fn)
        elif phase == "disconnect":
            def fn():
                with Server(out, model=args.model, env=UNLIMITED, name="disconnect") as s:
                    return disconnect_mod.storm(s, s.create_key(1000.0), clients=args.disconnects)
            record("disconnect", fn)
        elif phase == "crash":
            record("crash_sqlite", lambda: crash_mod.crash(out, None, requests=args.crash_requests, model=args.model))
            if args.postgres_url:
                def fn():
                    with crash_mod.postgres_database(args.postgres_url) as url:
                        return crash_mod.crash(out, url, requests=args.crash_requests, model=args.model,
                                               label="postgres")
                record("crash_postgres", fn)
        elif phase == "abuse":
            def fn():
                with Server(out, model=args.model, env=UNLIMITED, name="abuse") as s:
                    return abuse_mod.abuse(s, requests=args.abuse_requests, timing_rounds=args.timing_rounds)
            record("abuse", fn)
        elif phase == "limits":
            def fn():
                with Server(out, model=args.model, env=UNLIMITED, name="limits",
                            args=["--max-num-seqs", "2", "--max-queue", "4"]) as s:
                    return limits_mod.limits(s, s.create_key(1000.0), max_num_seqs=2, max_queue=4)
            record("limits", fn)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report["passed"] = all(p["passed"] for p in report["phases"].values())
    write(report, out)
    return report


def write(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(markdown(report))


def markdown(r: dict) -> str:
    ph = r["phases"]
    lines = [f"# gpt2serve stress report ({r['started']})", "",
             f"Model `{r['model']}`, {r['machine']['cpus']} CPUs, load average at start "
             f"{', '.join(f'{x:.1f}' for x in r['machine']['load_avg_at_start'])}; "
             f"`python -m stress {' '.join(r['argv'])}`.", "",
             "| phase | result | figures |", "|---|---|---|"]

    def row(name: str, figures: str) -> None:
        p = ph.get(name)
        if p is not None:
            lines.append(f"| {name} | {'PASS' if p['passed'] else '**FAIL**'} ({p['seconds']} s) | {figures} |")

    if "badinput" in ph and "fuzz" in ph["badinput"]:
        f, h = ph["badinput"]["fuzz"], ph["badinput"]["hostile"]
        row("badinput", f"schemathesis {f['cases']} cases over {f['operations']} operations, statuses "
            f"{f['statuses']}, {f['five_xx']} 5xx, {f['bad_error_shape']} 4xx not in OpenAI's shape; "
            f"{h['cases']} hostile requests, statuses {h['statuses']}")
    if "load" in ph and "requests" in ph["load"]:
        x = ph["load"]
        row("load", f"{x['clients']} streaming clients x {x['duration_s']} s: {x['requests']} requests, "
            f"{x['failed']} failed, {x['completion_tokens']} tokens ({x['tokens_per_s']}/s); TTFT p50 "
            f"{x['ttft_s']['p50']} s, p99 {x['ttft_s']['p99']} s; RSS {x['rss_kb']['after_warmup']} -> "
            f"{x['rss_kb']['end']} kB ({x['rss_growth_after_warmup']:+.2%}); threads max {x['threads']['after_warmup_max']}"
            f" -> {x['threads']['end_max']}; fds max {x['fds']['after_warmup_max']} -> {x['fds']['end_max']}; "
            f"/health {x['health_probes']} probes, {x['health_not_200']} not 200, p99 {x['health_latency_s']['p99']} s")
    if "disconnect" in ph and "clients" in ph["disconnect"]:
        x = ph["disconnect"]
        row("disconnect", f"{x['clients']} clients {x['modes']}: after, running {x['running_after']}, waiting "
            f"{x['waiting_after']}, KV blocks free {x['kv_blocks_free_before']} -> {x['kv_blocks_free_after']}; "
            f"{x['usage_records']} usage records, {x['completion_tokens_billed']} tokens billed = "
            f"{x['completion_tokens_generated']} generated; {x['open_reservations']} reservations open")
    for name in ("crash_sqlite", "crash_postgres"):
        if name in ph and "requests_in_flight" in ph[name]:
            x = ph[name]
            row(name, f"SIGKILL with {x['open_reservations_at_kill']} reservations open ({x['running_at_kill']} "
                f"running, {x['waiting_at_kill']} waiting); restart released {x['released_on_restart']}; usage "
                f"{x['usage_micros_after']} = expected {x['usage_micros_expected']} micro-USD; balance "
                f"{x['balance_micros']} = journal {x['journal_micros']}; {x['double_charged']} double charges")
    if "abuse" in ph and "accepted" in ph["abuse"]:
        x = ph["abuse"]
        t = x["timing"]
        row("abuse", f"{x['bad_key_requests']} bad-key requests, {x['accepted']} accepted ({x['statuses']}); "
            f"sign-ups {x['signup_statuses']} (limit {x['signup_limit_per_hour']}/h); key-check medians (ms) "
            f"{t['median_ms']}, ratios {t['ratios']}; {x['keys_in_log']} keys and {x['prompt_lines_in_log']} "
            f"prompt lines in {x['log_bytes']} bytes of log")
    if "limits" in ph and "refusals" in ph["limits"]:
        x = ph["limits"]
        ref = "; ".join(f"{c['case']} {c['status']} in {c['seconds'] * 1000:.0f} ms" for c in x["refusals"])
        row("limits", f"{x['requests_to_fill']} long requests for {x['max_num_seqs']} slots + queue "
            f"{x['max_queue']}: {x['overloaded_429']} got 429 (/health then: running "
            f"{x['health_when_full'].get('running')}, waiting {x['health_when_full'].get('waiting')}); {ref}; "
            f"/health under full load max {x['health_latency_s']['max'] * 1000:.0f} ms")
    failures = [(n, f) for n, p in ph.items() for f in p.get("failures", [])]
    lines += ["", f"Overall: {'PASS' if all(p['passed'] for p in ph.values()) else 'FAIL'}."]
    if failures:
        lines += ["", "## Failures", ""] + [f"- {n}: {f}" for n, f in failures[:60]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    report = run(parser().parse_args(argv))
    print(f"[stress] report: {Path(parser().parse_args(argv).out) / 'report.md'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
