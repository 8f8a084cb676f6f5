"""Log lines: the parsers themselves, logfmt fields, and json with the same keys."""

import json
import unittest

import mxtest
from mxtest import HOST, config, listener, free_port, parse_logfmt, parse_json_line


class ParserTest(unittest.TestCase):
    """The harness's own parsers, on literal lines."""

    def test_logfmt_plain(self):
        ev = parse_logfmt("ts=2026-11-26T01:02:03.456789Z lvl=info ev=open "
                          "sid=5f3a9c0100000001 listener=smtp client=127.0.0.1:40312")
        self.assertEqual(list(ev.items()), [
            ("ts", "2026-11-26T01:02:03.456789Z"), ("lvl", "info"), ("ev", "open"),
            ("sid", "5f3a9c0100000001"), ("listener", "smtp"), ("client", "127.0.0.1:40312")])
        mxtest.check_header(ev)

    def test_logfmt_quoted_and_escaped(self):
        line = ('ts=2026-11-26T01:02:03.456789Z lvl=warn ev=connect_error sid=5f3a9c0100000001 '
                'backend=127.0.0.1:25 error="connection refused" '
                'x="a \\"b\\" c=d\\\\e\\n\\r\\t\\x01" empty=""')
        ev = parse_logfmt(line)
        self.assertEqual(ev["error"], "connection refused")
        self.assertEqual(ev["x"], 'a "b" c=d\\e\n\r\t\x01')
        self.assertEqual(ev["empty"], "")
        self.assertEqual(list(ev)[-1], "empty")

    def test_logfmt_rejects_malformed(self):
        for bad in ['ts=1 lvl=info ev=x error=connection refused',   # unquoted space
                    'ts=1 lvl=info ev=x error="open',                  # unterminated
                    'ts=1 lvl=info ev=x a="b"c',                        # junk after quote
                    'ts=1 lvl=info ev=x a=b=c',                         # '=' must be quoted
                    'ts=1 lvl=info ev=x a=1 a=2',                       # duplicate key
                    'ts=1 lvl=info  ev=x',                              # double space
                    'ts=1 lvl=info ev=x a="\\q"']:                      # unknown escape
            with self.assertRaises(mxtest.LogParseError, msg=bad):
                parse_logfmt(bad)

    def test_check_header(self):
        with self.assertRaises(AssertionError):
            mxtest.check_header(parse_logfmt("lvl=info ts=2026-11-26T01:02:03.456789Z ev=x"))
        with self.assertRaises(AssertionError):
            mxtest.check_header(parse_logfmt("ts=2026-11-26T01:02:03Z lvl=info ev=x"))
        with self.assertRaises(AssertionError):
            mxtest.check_header(parse_logfmt(
                "ts=2026-11-26T01:02:03.456789Z lvl=info ev=x a=1 sid=5f3a9c0100000001"))

    def test_json(self):
        ev = parse_json_line('{"ts":"2026-11-26T01:02:03.456789Z","lvl":"info","ev":"close",'
                             '"sid":"5f3a9c0100000001","listener":"smtp","end":"client_eof",'
                             '"bytes_up":12,"bytes_down":30,"ms":1.5,"error":"a \\"q\\"\\u0001"}')
        mxtest.check_header(ev)
        self.assertEqual(list(ev)[:4], ["ts", "lvl", "ev", "sid"])
        self.assertEqual((ev["bytes_up"], ev["ms"]), (12, 1.5))
        self.assertEqual(ev["error"], 'a "q"\x01')
        for bad in ['{"ts":', '[1,2]', 'ts=1 lvl=info ev=x']:
            with self.assertRaises(mxtest.LogParseError):
                parse_json_line(bad)


SCENARIO_EVENTS = ["start", "listen", "open", "connect", "close", "open", "connect_error",
                   "close", "drain", "stop"]


class FormatTest(mxtest.ProxyTestCase):

    def scenario(self, fmt):
        """One good session, one to a dead backend, then SIGTERM. Returns the events."""
        b = self.smtp_backend("mx")
        port, port2 = free_port(), free_port()
        dead = "%s:%d" % (HOST, free_port())
        conf = config(listener("smtp", "%s:%d" % (HOST, port), b.addr),
                      listener("dead", "%s:%d" % (HOST, port2), dead), log_format=fmt)
        p = self.start_proxy(conf, log_format=fmt)
        c = self.client(port)
        self.assertEqual(c.recv_until(b"\r\n"), b"220 mx ESMTP\r\n")
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 mx bye\r\n")
        sid = p.sid_of(c)
        c.close()
        p.close_of(sid)
        d = self.client(port2)
        d.wait_closed(2)
        p.close_of(p.sid_of(d))
        self.assertEqual(p.stop(), 0)
        evs = [e for e in p.events if e["lvl"] != "debug"]
        # Other events (e.g. backend_down) may come along; these must be there, in order.
        self.assertEqual([e["ev"] for e in evs if e["ev"] in SCENARIO_EVENTS and e["ev"] != "listen"],
                         [e for e in SCENARIO_EVENTS if e != "listen"])
        self.assertEqual(len([e for e in evs if e["ev"] == "listen"]), 2)
        start = [e for e in evs if e["ev"] == "start"][0]
        self.assertEqual(str(start["version"]), "0.1.0")
        self.assertEqual(str(start["workers"]), "1")
        self.assertEqual(start["config"], p.path)
        listens = {e["listener"]: e for e in evs if e["ev"] == "listen"}
        self.assertEqual(listens["smtp"]["addr"], "%s:%d" % (HOST, port))
        self.assertEqual(listens["smtp"]["mode"], "tcp")
        self.assertEqual(listens["dead"]["addr"], "%s:%d" % (HOST, port2))
        good = [e for e in evs if e.get("sid") == sid]
        self.assertEqual([e["ev"] for e in good], ["open", "connect", "close"])
        self.assertEqual(good[1]["backend"], b.addr)
        self.assertEqual(good[2]["end"], "client_eof")
        self.assertEqual(str(good[2]["bytes_up"]), "6")
        self.assertEqual(str(good[2]["bytes_down"]), str(len(c.received)))
        self.assertEqual(good[2]["backend"], b.addr)
        drain = [e for e in evs if e["ev"] == "drain"][0]
        self.assertEqual(str(drain["sessions"]), "0")
        return p, evs

    def test_logfmt_fields(self):
        p, evs = self.scenario("logfmt")
        for e in evs:
            # every line was parsed by the strict logfmt parser in the harness
            self.assertFalse(e["_raw"].startswith("{"))
        err = [e for e in evs if e["ev"] == "connect_error"][0]
        self.assertIn(' error="connection refused"', err["_raw"])

    def test_json_same_events_and_keys(self):
        _, lf = self.scenario("logfmt")
        p, js = self.scenario("json")
        for line in p.raw:
            if line.strip():
                self.assertIsInstance(json.loads(line), dict, line)
        self.assertEqual(len(lf), len(js))
        strip = lambda e: [k for k in e if not k.startswith("_")]
        for a, b in zip(lf, js):
            self.assertEqual(strip(a), strip(b), "keys differ for ev=%s" % a["ev"])
        numbers = {"bytes_up", "bytes_down", "ms", "workers", "sessions"}
        for e in js:
            for k in numbers & set(e):
                self.assertIsInstance(e[k], (int, float), "%s in %s" % (k, e["_raw"]))
                self.assertNotIsInstance(e[k], bool)
            for k in ("bytes_up", "bytes_down", "workers", "sessions"):
                if k in e:
                    self.assertIsInstance(e[k], int, e["_raw"])
            for k in ("ts", "lvl", "ev", "sid", "listener", "client", "backend", "end"):
                if k in e:
                    self.assertIsInstance(e[k], str, e["_raw"])


if __name__ == "__main__":
    mxtest.main()
