"""Parsers for the load tools' output: iperf3 -J, wrk --latency, rtload, /proc.

Each parser takes the tool's raw output and returns a flat dict of numbers; a parser that
cannot find what it needs raises ValueError naming the missing piece, so a changed tool
version fails loudly instead of reporting zeros.
"""

import json
import re

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}
_SIZE = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def parse_iperf3(text):
    """iperf3 -J (client side): throughput received and bytes moved."""
    data = json.loads(text)
    if "error" in data:
        raise ValueError("iperf3 error: %s" % data["error"])
    try:
        recv = data["end"]["sum_received"]
    except KeyError as e:
        raise ValueError("iperf3 JSON has no end.sum_received") from e
    return {
        "gbit_s": recv["bits_per_second"] / 1e9,
        "bytes": int(recv["bytes"]),
        "seconds": float(recv["seconds"]),
        "retransmits": int(data["end"].get("sum_sent", {}).get("retransmits", 0)),
    }


def parse_iperf3_udp(text):
    """iperf3 -u -J (client side): what the server received, and the loss it counted."""
    data = json.loads(text)
    if "error" in data:
        raise ValueError("iperf3 error: %s" % data["error"])
    try:
        recv = data["end"]["sum_received"]
        lost = float(recv["lost_percent"])
    except KeyError as e:
        raise ValueError("iperf3 -u JSON has no end.sum_received.lost_percent") from e
    return {
        "mbit_s": recv["bits_per_second"] / 1e6,
        "bytes": int(recv["bytes"]),
        "lost_percent": lost,
        "jitter_ms": float(recv.get("jitter_ms", 0.0)),
    }


def _latency_ms(value):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
    if not m:
        raise ValueError("bad wrk latency %r" % value)
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_wrk(text):
    """wrk --latency: requests/s, p50/p99 latency (ms), transfer (MiB/s) and error count."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if not rps:
        raise ValueError("wrk output has no Requests/sec line")
    out = {"req_s": float(rps.group(1))}
    for pct in ("50", "99"):
        m = re.search(r"^\s+%s%%\s+(\S+)" % pct, text, re.M)
        if not m:
            raise ValueError("wrk output has no %s%% latency (run with --latency)" % pct)
        out["p%s_ms" % pct] = _latency_ms(m.group(1))
    tr = re.search(r"^Transfer/sec:\s+([\d.]+)(B|KB|MB|GB|TB)", text, re.M)
    out["mib_s"] = float(tr.group(1)) * _SIZE[tr.group(2)] / 1024**2 if tr else 0.0
    total = re.search(r"^\s+(\d+) requests in", text, re.M)
    out["requests"] = int(total.group(1)) if total else 0
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        errors += sum(int(x) for x in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        errors += int(non2xx.group(1))
    out["errors"] = errors
    return out


def parse_rtload_json(text):
    """The last JSON line rtload printed."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("rtload printed no JSON summary")


def parse_proc_stat_cpu_ticks(text):
    """utime + stime (clock ticks) from /proc/PID/stat; the command may contain spaces."""
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return int(fields[11]) + int(fields[12])


def parse_proc_status_rss_kib(text):
    """VmRSS in KiB from /proc/PID/status."""
    m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    if not m:
        raise ValueError("no VmRSS in status")
    return int(m.group(1))
