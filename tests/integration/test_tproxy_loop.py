#!/usr/bin/env python3
"""transparent = tproxy on a wildcard listen address: a connection made
straight to mxproxy's own port (not intercepted) must be refused as a loop,
as it is with transparent = redirect (test_interception.py)."""

import mxtest
from test_interception import POD_IP, PROXY_PORT, PodTestCase


class TproxyLoopTest(PodTestCase):

    def test_tproxy_direct_connection_to_mxproxy_is_a_loop(self):
        self.start_sink()
        self.iptables_init("tproxy")
        # max_connections bounds the chain of sessions should mxproxy connect to itself.
        p = self.start_pod_proxy("tproxy", max_connections=5)
        c = self.client_in(self.cli, PROXY_PORT)
        self.assertLoop(p, c, "%s:%d" % (POD_IP, PROXY_PORT))


if __name__ == "__main__":
    mxtest.main()
