#!/usr/bin/env bash
# Passwordless ssh from this machine to itself, as `localhost` and `127.0.0.1` (two "hosts"), so DeepSpeed's
# default multi-node path (hostfile -> pdsh -> ssh) runs for real in tests/test_launch.py.
#
#   bash .ci/ssh_loopback.sh start   # root: install openssh-server + pdsh if missing, start a private sshd on
#                                    # 127.0.0.1:2222 with a throwaway key, point ssh at it for those two names
#   bash .ci/ssh_loopback.sh stop
#
# Everything lives in $SSH_CI_DIR (default /tmp/ci-ssh) plus one client snippet,
# /etc/ssh/ssh_config.d/ci-loopback.conf (ssh reads config from the passwd home or /etc, never from $HOME).
set -euo pipefail

STATE=${SSH_CI_DIR:-/tmp/ci-ssh}
PORT=${SSH_CI_PORT:-2222}
CLIENT_CONF=/etc/ssh/ssh_config.d/ci-loopback.conf

log() { echo "[ssh_loopback.sh] $*" >&2; }

start() {
    [ "$(id -u)" = 0 ] || { log "needs root (installs packages, writes $CLIENT_CONF)"; exit 1; }
    mkdir -p "$STATE" /run/sshd /etc/ssh/ssh_config.d
    if ! command -v pdsh >/dev/null || [ ! -x /usr/sbin/sshd ]; then
        log "installing openssh-server, openssh-client and pdsh (apt)"
        export DEBIAN_FRONTEND=noninteractive
        { apt-get install -y -qq openssh-server openssh-client pdsh || { apt-get update -qq && \
            apt-get install -y -qq openssh-server openssh-client pdsh; }; } >"$STATE/apt.log" 2>&1 \
            || { log "apt-get install failed; see $STATE/apt.log"; exit 1; }
    fi
    [ -f "$STATE/id" ] || ssh-keygen -q -t ed25519 -N "" -f "$STATE/id"
    [ -f "$STATE/hostkey" ] || ssh-keygen -q -t ed25519 -N "" -f "$STATE/hostkey"
    cp "$STATE/id.pub" "$STATE/authorized_keys"
    chmod 600 "$STATE/authorized_keys"
    cat >"$STATE/sshd_config" <<EOF
Port $PORT
ListenAddress 127.0.0.1
HostKey $STATE/hostkey
PidFile $STATE/sshd.pid
AuthorizedKeysFile $STATE/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
StrictModes no
UsePAM no
EOF
    cat >"$CLIENT_CONF" <<EOF
# written by .ci/ssh_loopback.sh; removed by its stop
Host localhost 127.0.0.1
    Port $PORT
    IdentityFile $STATE/id
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
EOF
    if [ ! -f "$STATE/sshd.pid" ] || ! kill -0 "$(cat "$STATE/sshd.pid")" 2>/dev/null; then
        /usr/sbin/sshd -f "$STATE/sshd_config" -E "$STATE/sshd.log"
    fi
    for _ in $(seq 1 20); do
        if ssh -o BatchMode=yes localhost true 2>/dev/null && ssh -o BatchMode=yes 127.0.0.1 true 2>/dev/null; then
            log "ssh to localhost and 127.0.0.1 works (port $PORT)"; return
        fi
        sleep 0.25
    done
    log "ssh to localhost does not work; see $STATE/sshd.log"; exit 1
}

stop() {
    if [ -f "$STATE/sshd.pid" ]; then kill "$(cat "$STATE/sshd.pid")" 2>/dev/null || true; rm -f "$STATE/sshd.pid"; fi
    if [ -f "$CLIENT_CONF" ] && grep -q "ssh_loopback.sh" "$CLIENT_CONF"; then rm -f "$CLIENT_CONF"; fi
    log "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
