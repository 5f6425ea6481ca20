"""The WAN bed's link settings parse as rtwire flags, and bad ones are refused.
Run: python3 -m unittest discover -s scripts/loadtest -p 'test_*.py'"""

import unittest

from wanbed import delay_ms, parse_link


class Links(unittest.TestCase):
    def test_settings_become_flags(self):
        self.assertEqual(parse_link("delay=25ms,rate=200mbit, loss=0.5%"),
                         {"delay": "25ms", "rate": "200mbit", "loss": "0.5%"})
        self.assertEqual(parse_link(""), {})

    def test_unknown_or_malformed_settings_are_refused(self):
        with self.assertRaises(ValueError):
            parse_link("jitter=5ms")
        with self.assertRaises(ValueError):
            parse_link("delay")

    def test_delay_in_ms(self):
        self.assertEqual(delay_ms({"delay": "25ms"}), 25.0)
        self.assertEqual(delay_ms({"delay": "0.1s"}), 100.0)
        self.assertEqual(delay_ms({"delay": "500us"}), 0.5)
        self.assertEqual(delay_ms({"delay": "7"}), 7.0)
        self.assertEqual(delay_ms({}), 0.0)


if __name__ == "__main__":
    unittest.main()
