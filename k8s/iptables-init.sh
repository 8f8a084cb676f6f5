#!/bin/sh
# iptables-init.sh: steers a pod's inbound mail connections into mxproxy.
#
# Run by the sidecar's init container (it needs CAP_NET_ADMIN, and for
# MODE=tproxy also the iptables TPROXY, socket and CONNMARK extensions), once,
# in the pod's network namespace, before the mail server and mxproxy start.
# It only touches the chains it owns (MXPROXY_*) and the jumps to them, so it
# is idempotent: a second run removes what the first one installed and
# installs it again, and `--delete` removes it all.
#
# Usage:
#   sh iptables-init.sh            install (or reinstall) the rules
#   sh iptables-init.sh --delete   remove every rule, chain, ip rule and route it installs
#
# Environment (defaults in brackets):
#   MODE                 redirect | tproxy                                   [redirect]
#   MX_PORTS             TCP ports to intercept, blank separated             [25 465 587]
#   MX_PROXY_PORT        where mxproxy listens (transparent = ...)           [15025]
#   MX_MARK              the `mark = N` of mxproxy's listener: SO_MARK on
#                        its backend connections, so they are never caught
#                        again (required for tproxy)                         [none]
#   MX_PROXY_UID         uid mxproxy runs as; its connections are exempt too
#                        (redirect only: the owner match works in OUTPUT)    [none]
#   MX_INTERCEPT_OUTPUT  1: redirect also connections made inside the pod to
#                        MX_PORTS (a process there talking to the pod's own
#                        address); 0: inbound only                           [0]
#   MX_TPROXY_MARK       tproxy: mark of diverted packets                    [0x4d58]
#   MX_TPROXY_TABLE      tproxy: routing table that delivers them locally    [100]
#   IPTABLES             the iptables command                                [iptables]
#
# MODE=redirect (mxproxy: transparent = redirect, backend = original_dst)
#
#   nat PREROUTING -> MXPROXY_REDIRECT:
#       packets marked MX_MARK          RETURN
#       tcp dport in MX_PORTS           REDIRECT --to-ports MX_PROXY_PORT
#   The kernel rewrites the destination to the pod's own address and
#   MX_PROXY_PORT; mxproxy reads the original one back (SO_ORIGINAL_DST) and
#   connects there. mxproxy's own connection to the mail server goes out of
#   the pod's OUTPUT path, never PREROUTING, so inbound-only interception
#   cannot loop even without MX_MARK.
#
#   Inbound only by default: connections the pod itself opens to port 25
#   elsewhere (the mail server relaying outbound mail) are not mxproxy's
#   business. MX_INTERCEPT_OUTPUT=1 adds nat OUTPUT -> MXPROXY_OUTPUT, which
#   redirects locally originated connections to MX_PORTS too, except
#   those of MX_PROXY_UID and MX_MARK (at least one is then required:
#   without them mxproxy's own backend connection would be redirected back
#   into mxproxy) and those to 127.0.0.0/8.
#
# MODE=tproxy (mxproxy: transparent = tproxy, backend = original_dst,
#              mark = MX_MARK, optionally source = client)
#
#   mangle PREROUTING -> MXPROXY_TPROXY:
#       packets marked MX_MARK          RETURN (mxproxy's own connections
#                                       arriving over lo)
#       packets of an mxproxy socket    MARK MX_TPROXY_MARK, ACCEPT
#       (-m socket --transparent)
#       tcp dport in MX_PORTS           TPROXY to :MX_PROXY_PORT, MARK MX_TPROXY_MARK
#   ip rule add fwmark MX_TPROXY_MARK lookup MX_TPROXY_TABLE
#   ip route add local 0.0.0.0/0 dev lo table MX_TPROXY_TABLE
#       Marked packets are delivered locally whatever their destination, so
#       the TPROXY socket (and, with source = client, mxproxy's backend
#       socket bound to the client's address) receives them.
#   mangle OUTPUT -> MXPROXY_TPROXY_OUT (for source = client):
#       packets marked MX_MARK          CONNMARK --save-mark
#       packets of such connections     MARK MX_TPROXY_MARK
#       The mail server's answers to mxproxy are addressed to the client's
#       address; the connection mark routes them back to mxproxy through lo
#       instead of out of the pod.
#   Nothing is rewritten: the mail server's socket sees the pod address it
#   listens on, and mxproxy's accepted socket has the original destination
#   as its local address.
#
# IPv4 only. For IPv6 run the same with IPTABLES=ip6tables after adapting the
# route (`ip -6 route add local ::/0 dev lo table ...`).

set -eu

MODE=${MODE:-redirect}
MX_PORTS=${MX_PORTS:-25 465 587}
MX_PROXY_PORT=${MX_PROXY_PORT:-15025}
MX_MARK=${MX_MARK:-}
MX_PROXY_UID=${MX_PROXY_UID:-}
MX_INTERCEPT_OUTPUT=${MX_INTERCEPT_OUTPUT:-0}
MX_TPROXY_MARK=${MX_TPROXY_MARK:-0x4d58}
MX_TPROXY_TABLE=${MX_TPROXY_TABLE:-100}
IPTABLES=${IPTABLES:-iptables}

ACTION=install
case "${1:-}" in
  "") ;;
  --delete) ACTION=delete ;;
  *) echo "usage: $0 [--delete]" >&2; exit 2 ;;
esac

die() { echo "iptables-init: $*" >&2; exit 1; }

is_uint() {
  case "$1" in
    ''|*[!0-9]*) return 1 ;;
  esac
  return 0
}

is_mark() {
  case "$1" in
    0x*|0X*) v=${1#0?}; case "$v" in ''|*[!0-9a-fA-F]*) return 1 ;; esac; return 0 ;;
  esac
  is_uint "$1"
}

# Validates everything before touching anything: a half-installed rule set
# is worse than none.
check_config() {
  case "$MODE" in
    redirect|tproxy) ;;
    *) die "MODE must be redirect or tproxy, not '$MODE'" ;;
  esac
  is_uint "$MX_PROXY_PORT" && [ "$MX_PROXY_PORT" -ge 1 ] && [ "$MX_PROXY_PORT" -le 65535 ] ||
    die "MX_PROXY_PORT must be a port number, not '$MX_PROXY_PORT'"
  [ -n "$MX_PORTS" ] || die "MX_PORTS is empty"
  for p in $MX_PORTS; do
    is_uint "$p" && [ "$p" -ge 1 ] && [ "$p" -le 65535 ] || die "bad port '$p' in MX_PORTS"
    [ "$p" != "$MX_PROXY_PORT" ] || die "MX_PORTS must not contain MX_PROXY_PORT ($p)"
  done
  [ -z "$MX_MARK" ] || { is_mark "$MX_MARK" && [ "$MX_MARK" != 0 ]; } ||
    die "MX_MARK must be a non-zero number, not '$MX_MARK'"
  [ -z "$MX_PROXY_UID" ] || is_uint "$MX_PROXY_UID" ||
    die "MX_PROXY_UID must be a number, not '$MX_PROXY_UID'"
  case "$MX_INTERCEPT_OUTPUT" in 0|1) ;; *) die "MX_INTERCEPT_OUTPUT must be 0 or 1" ;; esac
  if [ "$MODE" = redirect ] && [ "$MX_INTERCEPT_OUTPUT" = 1 ] &&
     [ -z "$MX_MARK" ] && [ -z "$MX_PROXY_UID" ]; then
    die "MX_INTERCEPT_OUTPUT=1 needs MX_MARK or MX_PROXY_UID (mxproxy would catch its own connections)"
  fi
  if [ "$MODE" = tproxy ]; then
    [ -n "$MX_MARK" ] || die "MODE=tproxy needs MX_MARK (the owner match does not work in PREROUTING)"
    is_mark "$MX_TPROXY_MARK" && [ "$MX_TPROXY_MARK" != 0 ] || die "bad MX_TPROXY_MARK '$MX_TPROXY_MARK'"
    [ "$(printf '%d' "$MX_TPROXY_MARK")" != "$(printf '%d' "$MX_MARK")" ] ||
      die "MX_TPROXY_MARK and MX_MARK must differ"
    is_uint "$MX_TPROXY_TABLE" || die "bad MX_TPROXY_TABLE '$MX_TPROXY_TABLE'"
  fi
}

# Runs a command that may fail because what it removes is not there.
quietly() { "$@" >/dev/null 2>&1 || true; }

# Removes every jump from BUILTIN to CHAIN (there may be several after a
# crashed run), then CHAIN itself. Every jump is installed as
# `-p tcp -j CHAIN`, exactly what -C and -D look for.
drop_chain() {
  table=$1 builtin=$2 chain=$3
  while $IPTABLES -w -t "$table" -C "$builtin" -p tcp -j "$chain" >/dev/null 2>&1; do
    $IPTABLES -w -t "$table" -D "$builtin" -p tcp -j "$chain"
  done
  quietly $IPTABLES -w -t "$table" -F "$chain"
  quietly $IPTABLES -w -t "$table" -X "$chain"
}

# Removes what either mode installs, so switching MODE between runs leaves
# nothing behind.
delete_all() {
  drop_chain nat PREROUTING MXPROXY_REDIRECT
  drop_chain nat OUTPUT MXPROXY_OUTPUT
  drop_chain mangle PREROUTING MXPROXY_TPROXY
  drop_chain mangle OUTPUT MXPROXY_TPROXY_OUT
  while ip rule del fwmark "$MX_TPROXY_MARK" lookup "$MX_TPROXY_TABLE" >/dev/null 2>&1; do :; done
  quietly ip route del local 0.0.0.0/0 dev lo table "$MX_TPROXY_TABLE"
}

install_redirect() {
  ipt="$IPTABLES -w -t nat"
  $ipt -N MXPROXY_REDIRECT
  [ -z "$MX_MARK" ] || $ipt -A MXPROXY_REDIRECT -m mark --mark "$MX_MARK" -j RETURN
  for p in $MX_PORTS; do
    $ipt -A MXPROXY_REDIRECT -p tcp --dport "$p" -j REDIRECT --to-ports "$MX_PROXY_PORT"
  done
  $ipt -A PREROUTING -p tcp -j MXPROXY_REDIRECT

  [ "$MX_INTERCEPT_OUTPUT" = 1 ] || return 0
  $ipt -N MXPROXY_OUTPUT
  [ -z "$MX_MARK" ] || $ipt -A MXPROXY_OUTPUT -m mark --mark "$MX_MARK" -j RETURN
  [ -z "$MX_PROXY_UID" ] || $ipt -A MXPROXY_OUTPUT -m owner --uid-owner "$MX_PROXY_UID" -j RETURN
  $ipt -A MXPROXY_OUTPUT -d 127.0.0.0/8 -j RETURN
  for p in $MX_PORTS; do
    $ipt -A MXPROXY_OUTPUT -p tcp --dport "$p" -j REDIRECT --to-ports "$MX_PROXY_PORT"
  done
  $ipt -A OUTPUT -p tcp -j MXPROXY_OUTPUT
}

install_tproxy() {
  ipt="$IPTABLES -w -t mangle"
  $ipt -N MXPROXY_TPROXY
  $ipt -A MXPROXY_TPROXY -m mark --mark "$MX_MARK" -j RETURN
  # Packets of connections an mxproxy socket already holds (an intercepted
  # client's later segments, answers to a source = client connection).
  # --transparent: only sockets with IP_TRANSPARENT, i.e. mxproxy's; without
  # it the mail server's own listening socket on the pod address would match
  # every SYN to port 25 and nothing would be intercepted.
  $ipt -A MXPROXY_TPROXY -m socket --transparent -j MARK --set-mark "$MX_TPROXY_MARK"
  $ipt -A MXPROXY_TPROXY -m mark --mark "$MX_TPROXY_MARK" -j ACCEPT
  for p in $MX_PORTS; do
    $ipt -A MXPROXY_TPROXY -p tcp --dport "$p" -j TPROXY --on-ip 0.0.0.0 \
      --on-port "$MX_PROXY_PORT" --tproxy-mark "$MX_TPROXY_MARK"
  done
  $ipt -A PREROUTING -p tcp -j MXPROXY_TPROXY

  $ipt -N MXPROXY_TPROXY_OUT
  $ipt -A MXPROXY_TPROXY_OUT -m mark --mark "$MX_MARK" -j CONNMARK --set-mark "$MX_MARK"
  $ipt -A MXPROXY_TPROXY_OUT -m connmark --mark "$MX_MARK" -m mark ! --mark "$MX_MARK" \
    -j MARK --set-mark "$MX_TPROXY_MARK"
  $ipt -A OUTPUT -p tcp -j MXPROXY_TPROXY_OUT

  ip rule add fwmark "$MX_TPROXY_MARK" lookup "$MX_TPROXY_TABLE"
  ip route add local 0.0.0.0/0 dev lo table "$MX_TPROXY_TABLE"
}

check_config
delete_all
if [ "$ACTION" = delete ]; then
  echo "iptables-init: removed mxproxy's rules" >&2
  exit 0
fi
if [ "$MODE" = redirect ]; then
  install_redirect
else
  install_tproxy
fi
echo "iptables-init: MODE=$MODE ports '$MX_PORTS' -> :$MX_PROXY_PORT${MX_MARK:+, mark $MX_MARK exempt}${MX_PROXY_UID:+, uid $MX_PROXY_UID exempt}" >&2
