#!/usr/bin/env bash
# How long clients wait while one svcproxyd takes over from another (README, "Upgrading").
# Usage: benches/takeover.sh [SERVICES] [ROUNDS]   (defaults: 1000 services, 3 rounds)
#
# On loopback, without capture: SERVICES services, each with a TCP and a UDP port in front of
# one echo backend, 2 workers (so 4 x SERVICES listening sockets are handed over). Each round
# starts a new `svcproxyd run` with the same arguments, which takes over from the running one,
# while a probe opens a TCP connection to one service after another (a byte echoed on each)
# and asks one UDP service a question at a time. It prints, per round, the longest TCP
# connection (connect + echo) and the longest UDP answer seen during the round, and the pause
# between the old process's first export and the new one serving, from their logs. Needs
# python3 and a release build (cargo build --release -p svcproxyd).
set -euo pipefail
services=${1:-1000}
rounds=${2:-3}
cd "$(dirname "$0")/.."
bin=$PWD/target/release/svcproxyd
dir=$(mktemp -d)
pid=
trap 'kill $(jobs -p) $pid 2>/dev/null; rm -rf "$dir"' EXIT
backend=19401
python3 - "$backend" <<'PY' &
import socket, sys, threading
port = int(sys.argv[1])
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("127.0.0.1", port)); t.listen(1024)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", port))
def udp():
    while True:
        d, a = u.recvfrom(2048); u.sendto(d, a)
def serve(c):
    while (d := c.recv(4096)):
        c.sendall(d)
    c.close()
threading.Thread(target=udp, daemon=True).start()
while True:
    c, _ = t.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
PY
{
    printf '[proxy]\nworkers = 2\nshutdown_grace_s = 5\n\n[upgrade]\nsocket = "%s/upgrade.sock"\n\n' "$dir"
    for i in $(seq 0 $((services - 1))); do
        printf '[[services]]\nname = "default/s%d"\naddresses = ["127.0.0.1"]\nports = [{ name = "web", port = %d }, { name = "dns", port = %d, protocol = "UDP" }]\nendpoints = [{ address = "127.0.0.1:%d" }]\n\n' \
            "$i" $((21000 + i)) $((21000 + i)) "$backend"
    done
} > "$dir/svcproxyd.toml"
run() {
    "$bin" run --config "$dir/svcproxyd.toml" --no-capture --health 127.0.0.1:19402 \
        --metrics 127.0.0.1:19403 --admin 127.0.0.1:19404 > /dev/null 2> "$dir/$1.log" &
    echo $!
}
pid=$(run 0)
until grep -q "a new svcproxyd can take over here" "$dir/0.log"; do
    kill -0 "$pid" 2>/dev/null || { cat "$dir/0.log"; exit 1; }
    sleep 0.1
done
echo "svcproxyd takeover, $services services ($((4 * services)) listening sockets), 2 workers; $(nproc) CPUs, $(uname -r)"
for round in $(seq 1 "$rounds"); do
    touch "$dir/probing"
    python3 - "$dir/probing" "$services" > "$dir/probe.out" <<'PY' &
import os, socket, sys, time
flag, services = sys.argv[1], int(sys.argv[2])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(10)
tcp_max = udp_max = 0.0; n = lost = 0
while os.path.exists(flag) and n < 200000:
    port = 21000 + n % services
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"x"); assert c.recv(1) == b"x"
    t1 = time.monotonic()
    u.sendto(b"q", ("127.0.0.1", 21000))
    try:
        u.recvfrom(16)
    except socket.timeout:
        lost += 1
    t2 = time.monotonic()
    tcp_max, udp_max, n = max(tcp_max, t1 - t0), max(udp_max, t2 - t1), n + 1
print(f"{n} {tcp_max * 1e3:.1f} {udp_max * 1e3:.1f} {lost}")
PY
    probe=$!
    sleep 1
    new=$(run "$round")
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    sleep 0.5
    rm "$dir/probing"
    wait "$probe"
    read -r n tcp udp lost < "$dir/probe.out"
    exported=$(grep -m1 "sockets exported" "$dir/$((round - 1)).log" | cut -c1-27 | sed 's/\x1b\[[0-9;]*m//g')
    serving=$(grep -m1 "took over from the previous" "$dir/$round.log" | cut -c1-27 | sed 's/\x1b\[[0-9;]*m//g')
    pause=$(python3 -c "from datetime import datetime as d; f=lambda s: d.fromisoformat(s.strip().rstrip('Z')); print(round((f('$serving')-f('$exported')).total_seconds()*1e3, 1))")
    echo "round $round: $n probes, longest TCP connection ${tcp} ms, longest UDP answer ${udp} ms, lost $lost; pause (export to serving) ${pause} ms"
    pid=$new
done
