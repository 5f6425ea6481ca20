"""Smoke test: the harness's parsers read recorded iperf3 and wrk output correctly.
Run: python3 -m unittest discover -s scripts/loadtest -p 'test_*.py'"""

import os
import unittest

from parse import (
    parse_iperf3,
    parse_iperf3_udp,
    parse_proc_stat_cpu_ticks,
    parse_proc_status_rss_kib,
    parse_rtload_json,
    parse_wrk,
)

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata")


def read(name):
    with open(os.path.join(DATA, name)) as f:
        return f.read()


class Iperf3Udp(unittest.TestCase):
    def test_received_and_loss(self):
        r = parse_iperf3_udp(read("iperf_udp.json"))
        self.assertAlmostEqual(r["mbit_s"], 3343.97, places=1)
        self.assertEqual(r["bytes"], 836199000)
        self.assertAlmostEqual(r["lost_percent"], 16.364, places=2)

    def test_tcp_output_is_refused(self):
        with self.assertRaises(ValueError):
            parse_iperf3_udp(read("iperf1.json"))


class Iperf3(unittest.TestCase):
    def test_one_stream(self):
        r = parse_iperf3(read("iperf1.json"))
        self.assertAlmostEqual(r["gbit_s"], 15.358, places=2)
        self.assertEqual(r["bytes"], 1926758400)

    def test_four_streams(self):
        r = parse_iperf3(read("iperf4.json"))
        self.assertAlmostEqual(r["gbit_s"], 13.190, places=2)

    def test_error_is_raised(self):
        with self.assertRaises(ValueError):
            parse_iperf3('{"start": {}, "error": "unable to connect"}')


class Wrk(unittest.TestCase):
    def test_keepalive(self):
        r = parse_wrk(read("wrk_keepalive.txt"))
        self.assertEqual(r["req_s"], 47610.45)
        self.assertAlmostEqual(r["p50_ms"], 0.830)
        self.assertAlmostEqual(r["p99_ms"], 6.87)
        self.assertAlmostEqual(r["mib_s"], 57.39)
        self.assertEqual(r["requests"], 52478)
        self.assertEqual(r["errors"], 0)

    def test_close_with_errors(self):
        r = parse_wrk(read("wrk_errors.txt"))
        self.assertEqual(r["req_s"], 15880.27)
        self.assertAlmostEqual(r["p50_ms"], 0.756)
        self.assertEqual(r["errors"], 3 + 2 + 7 + 4)

    def test_missing_latency_is_an_error(self):
        with self.assertRaises(ValueError):
            parse_wrk("Requests/sec: 5.0\n")


class Proc(unittest.TestCase):
    def test_stat_with_spaces_in_comm(self):
        stat = "42 (ring tunnel) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 5 0 0"
        self.assertEqual(parse_proc_stat_cpu_ticks(stat), 325)

    def test_status_rss(self):
        self.assertEqual(parse_proc_status_rss_kib("Name:\tx\nVmRSS:\t   1234 kB\n"), 1234)

    def test_rtload_json(self):
        r = parse_rtload_json('holding 10 0\n{"opened": 10, "failed": 0}\n')
        self.assertEqual(r["opened"], 10)


if __name__ == "__main__":
    unittest.main()
