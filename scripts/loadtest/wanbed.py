"""A WAN test bed for the load test: visitor, relay and agent each in a network namespace,
joined by links that rtwire (tools/rtwire) shapes with delay, rate and loss, and can cut.

    visitor ns                 wire ns                    relay ns                 agent ns
    10.90.1.1 ─ veth ─ [rtwire: visitor link] ─ veth ─ 10.90.1.2
                                                         10.90.2.1 ─ veth ─ [rtwire: agent link] ─ veth ─ 10.90.2.2

The relay namespace forwards between its two links, so the direct path (visitor to origin,
no tunnel) crosses both links as well: it is the network path a tunnel's round trips are
added to. The harness itself moves into the visitor namespace (sockets it opens are the
visitor's), and starts relays in the relay namespace and agents and origins in the agent
namespace. Every namespace and link is removed at exit. Needs root and iproute2.
"""

import atexit
import ctypes
import os
import subprocess

VISITOR_IP, RELAY_VISIT_IP = "10.90.1.1", "10.90.1.2"
RELAY_AGENT_IP, AGENT_IP = "10.90.2.1", "10.90.2.2"
CLONE_NEWNET = 0x40000000


def parse_link(text):
    """`delay=25ms,rate=200mbit,loss=0.1%` as rtwire flags {delay: 25ms, ...}."""
    shape = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        k, sep, v = part.partition("=")
        if not sep or k not in ("delay", "rate", "loss", "limit"):
            raise ValueError("link setting %r: use delay=, rate=, loss=, limit=" % part)
        shape[k] = v
    return shape


def delay_ms(shape):
    """A link's one-way delay in ms, from its rtwire flags (`25ms`, `0.1s`, or bare ms)."""
    d = shape.get("delay", "0")
    if d.endswith("ms"):
        return float(d[:-2])
    if d.endswith("us"):
        return float(d[:-2]) / 1000
    if d.endswith("s"):
        return float(d[:-1]) * 1000
    return float(d)


def ip(*args, ns=None):
    cmd = ["ip"] + (["-n", ns] if ns else []) + list(args)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("%s: %s" % (" ".join(cmd), r.stderr.strip()))


class Wire:
    """One rtwire process shaping one link; commands go to its standard input."""

    def __init__(self, rtwire, ns, a, b, shape, log):
        args = ["ip", "netns", "exec", ns, rtwire, "--link", "%s,%s" % (a, b)]
        for flag, value in shape.items():
            args += ["--" + flag, str(value)]
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=log, text=True, start_new_session=True)
        line = self.p.stdout.readline()
        if not line.startswith("wire up"):
            raise RuntimeError("rtwire did not start: %r" % line)
        self.described = line.strip()

    def command(self, line):
        """Sends one command (`cut`, `mend`, `loss 0.5%`, ...) and returns rtwire's answer."""
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        answer = self.p.stdout.readline().strip()
        if answer.startswith("error"):
            raise RuntimeError("rtwire %r: %s" % (line, answer))
        return answer

    def stop(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


class WanBed:
    """The namespaces, the links and their wires. `visitor_shape` and `agent_shape` are
    rtwire flags (delay, rate, loss, limit) for the visitor-relay and relay-agent links."""

    def __init__(self, rtwire, visitor_shape, agent_shape, log_dir):
        tag = "%d" % (os.getpid() % 100000)
        self.ns = {role: "rtwan-%s-%s" % (role, tag) for role in ("visitor", "relay", "agent", "wire")}
        self.wires = {}
        atexit.register(self.remove)
        for ns in self.ns.values():
            ip("netns", "add", ns)
        # (namespace end, wire end, namespace, address)
        ends = [("v%sa" % tag, "w%sa" % tag, "visitor", VISITOR_IP),
                ("r%sa" % tag, "w%sb" % tag, "relay", RELAY_VISIT_IP),
                ("r%sb" % tag, "w%sc" % tag, "relay", RELAY_AGENT_IP),
                ("a%sa" % tag, "w%sd" % tag, "agent", AGENT_IP)]
        for inner, outer, role, addr in ends:
            ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            # Frames into a wire must be MTU-sized with whole checksums.
            subprocess.run([rtwire, "plain-frames", inner, outer], check=True)
            ip("link", "set", inner, "netns", self.ns[role])
            ip("link", "set", outer, "netns", self.ns["wire"])
            ip("addr", "add", addr + "/24", "dev", inner, ns=self.ns[role])
            ip("link", "set", inner, "up", ns=self.ns[role])
            ip("link", "set", outer, "up", ns=self.ns["wire"])
        for role in ("visitor", "relay", "agent"):
            ip("link", "set", "lo", "up", ns=self.ns[role])
        ip("route", "add", "10.90.2.0/24", "via", RELAY_VISIT_IP, ns=self.ns["visitor"])
        ip("route", "add", "10.90.1.0/24", "via", RELAY_AGENT_IP, ns=self.ns["agent"])
        subprocess.run(["ip", "netns", "exec", self.ns["relay"], "sysctl", "-q", "-w",
                        "net.ipv4.ip_forward=1"], check=True)
        with open(os.path.join(log_dir, "rtwire.log"), "w") as log:
            self.wires["visitor"] = Wire(rtwire, self.ns["wire"], ends[0][1], ends[1][1],
                                         visitor_shape, log)
            self.wires["agent"] = Wire(rtwire, self.ns["wire"], ends[2][1], ends[3][1],
                                       agent_shape, log)

    def command(self, role, role_args):
        """`role_args` prefixed to run in the namespace of `role` (relay, agent, visitor)."""
        return ["ip", "netns", "exec", self.ns[role]] + list(role_args)

    def enter_visitor(self):
        """Moves this (single-threaded) process into the visitor namespace: sockets opened
        from now on, and processes started without a prefix, are the visitor's."""
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open("/run/netns/" + self.ns["visitor"], os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the visitor namespace")
        finally:
            os.close(fd)

    def describe(self):
        return {role: w.described for role, w in self.wires.items()}

    def remove(self):
        for w in self.wires.values():
            w.stop()
        self.wires = {}
        for ns in self.ns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
