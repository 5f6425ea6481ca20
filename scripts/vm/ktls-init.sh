#!/bin/sh
# /init of the kTLS guest (scripts/vm/build; run by tests/ktls_guest.rs). Loads the `tls`
# module, checks one offloaded socket against rustls (`ktls-helper pair`), then runs a relay
# and an agent with TLS data connections offloaded to the kernel and checksums visitors'
# bytes through them: both ends on kTLS, the agent on rustls, the relay on tokio. Prints
# `KTLS-GUEST PASS` or `KTLS-GUEST FAIL: why`, then powers off.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs tmp /tmp
mount -t devtmpfs dev /dev 2>/dev/null
ip link set lo up
echo "guest kernel $(uname -r), $(nproc) cpus"

fail() {
  echo "KTLS-GUEST FAIL: $*"
  for f in /tmp/*.log; do echo "--- $f"; tail -n 30 "$f"; done
  poweroff -f
}

for m in $(cat /lib/modules/order); do
  [ -f "/lib/modules/$m.ko" ] && insmod "/lib/modules/$m.ko" 2>/dev/null
done
echo "tcp_available_ulp: $(cat /proc/sys/net/ipv4/tcp_available_ulp)"
grep -qw tls /proc/sys/net/ipv4/tcp_available_ulp || fail "no tls ULP after insmod"

ktls-helper pair || fail "offloaded socket checks"

# Waits up to 60 s for a line matching $2 in log $1.
wait_for() {
  i=0
  while ! grep -q "$2" "$1" 2>/dev/null; do
    i=$((i + 1))
    [ $i -gt 600 ] && fail "no '$2' in $1"
    sleep 0.1
  done
}

ktls-helper echo 127.0.0.1:7000 > /tmp/echo.log 2>&1 &
export RINGTUNNEL_SECRET=guest-secret-for-the-ktls-check
ringtunnel relay --control 127.0.0.1:7843 --bind-addr 127.0.0.1 --port-range 20000-20010 \
  --state-dir /tmp/state --backend uring --data-tls on > /tmp/relay.log 2>&1 &
wait_for /tmp/relay.log "ready control"
fp=$(grep -o 'fingerprint=[0-9a-f:]*' /tmp/relay.log | head -n 1 | cut -d= -f2)
grep -q "encrypted by the kernel (kTLS)" /tmp/relay.log || fail "the relay did not find kTLS"

# Both ends on kTLS.
ringtunnel agent --relay 127.0.0.1:7843 --relay-fingerprint "$fp" --local 127.0.0.1:7000 \
  --remote-port 20000 --name both --backend uring > /tmp/agent-ktls.log 2>&1 &
wait_for /tmp/agent-ktls.log "online service=both"
wait_for /tmp/agent-ktls.log "encrypted by the kernel (kTLS)"
ktls-helper check 127.0.0.1:20000 1000 20 || fail "small visitors, kTLS both ends"
ktls-helper check 127.0.0.1:20000 4194304 2 || fail "bulk visitors, kTLS both ends"
echo "--- /proc/net/tls_stat after kTLS both ends"
cat /proc/net/tls_stat
tx=$(awk '/^TlsTxSw/ { print $2 }' /proc/net/tls_stat)
rx=$(awk '/^TlsRxSw/ { print $2 }' /proc/net/tls_stat)
[ "${tx:-0}" -gt 0 ] && [ "${rx:-0}" -gt 0 ] || fail "no socket was offloaded (TlsTxSw=$tx TlsRxSw=$rx)"
decrypt=$(awk '/^TlsDecryptError/ { print $2 }' /proc/net/tls_stat)
[ "${decrypt:-0}" -eq 0 ] || fail "TlsDecryptError=$decrypt"

# The agent on rustls against the kTLS relay: close_notify both ways between the two.
RINGTUNNEL_KTLS=off ringtunnel agent --relay 127.0.0.1:7843 --relay-fingerprint "$fp" \
  --local 127.0.0.1:7000 --remote-port 20001 --name mixed --backend uring \
  > /tmp/agent-rustls.log 2>&1 &
wait_for /tmp/agent-rustls.log "online service=mixed"
wait_for /tmp/agent-rustls.log "kTLS is unavailable: turned off by RINGTUNNEL_KTLS=off"
ktls-helper check 127.0.0.1:20001 1000 20 || fail "small visitors, rustls agent"
ktls-helper check 127.0.0.1:20001 4194304 2 || fail "bulk visitors, rustls agent"
# A kTLS agent against a relay on the tokio backend (rustls in user space there).
ringtunnel relay --control 127.0.0.1:7844 --bind-addr 127.0.0.1 --port-range 20100-20110 \
  --state-dir /tmp/state2 --backend tokio --data-tls on > /tmp/relay-tokio.log 2>&1 &
wait_for /tmp/relay-tokio.log "ready control"
fp2=$(grep -o 'fingerprint=[0-9a-f:]*' /tmp/relay-tokio.log | head -n 1 | cut -d= -f2)
ringtunnel agent --relay 127.0.0.1:7844 --relay-fingerprint "$fp2" --local 127.0.0.1:7000 \
  --remote-port 20100 --name tokio --backend uring > /tmp/agent-to-tokio.log 2>&1 &
wait_for /tmp/agent-to-tokio.log "online service=tokio"
ktls-helper check 127.0.0.1:20100 1000 20 || fail "small visitors, tokio relay"
ktls-helper check 127.0.0.1:20100 4194304 2 || fail "bulk visitors, tokio relay"
echo "--- /proc/net/tls_stat at the end"
cat /proc/net/tls_stat
echo "--- what relays and agents said of their data plane"
grep -h "data plane backend" /tmp/relay.log /tmp/relay-tokio.log /tmp/agent-*.log | sed 's/^.*data plane/data plane/'
echo "KTLS-GUEST PASS"
poweroff -f
