#!/usr/bin/env bash
# Start (or stop) a throw-away OpenSSH server on 127.0.0.1 to try the `ssh` validation target by hand.
#
# Usage: scripts/sshd_loopback.sh start DIR [PORT]   then paste the printed `export` lines
#        scripts/sshd_loopback.sh stop DIR
# Everything (host key, client key, authorized_keys, config, pid file, log) lives in DIR; key-only login
# for the current user. tests/test_targets.py does the same from a fixture. Needs `sshd`
# (apt-get install -y --no-install-recommends openssh-server openssh-client).
set -euo pipefail

cmd=${1:-}; dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { sed -n '4,5p' "$0" >&2; exit 2; }
dir=$(mkdir -p "$dir" && cd "$dir" && pwd)

if [ "$cmd" = stop ]; then
    [ -f "$dir/sshd.pid" ] && kill "$(cat "$dir/sshd.pid")" && rm -f "$dir/sshd.pid" && echo "stopped"
    exit 0
fi
[ "$cmd" = start ] || { echo "unknown command '$cmd' (start or stop)" >&2; exit 2; }

SSHD=$(command -v sshd || echo /usr/sbin/sshd)
[ -x "$SSHD" ] || { echo "sshd not found: apt-get install -y --no-install-recommends openssh-server" >&2; exit 1; }
port=${3:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
[ -f "$dir/host_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$dir/host_key"
[ -f "$dir/client_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$dir/client_key"
cp "$dir/client_key.pub" "$dir/authorized_keys"
cat > "$dir/sshd_config" <<EOF
Port $port
ListenAddress 127.0.0.1
HostKey $dir/host_key
AuthorizedKeysFile $dir/authorized_keys
PidFile $dir/sshd.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
EOF
[ "$(id -u)" = 0 ] && mkdir -p /run/sshd  # privilege-separation dir, normally made by the service unit
"$SSHD" -f "$dir/sshd_config" -E "$dir/sshd.log"  # daemonises; the pid goes to sshd.pid
cat <<EOF
export SLIMFORMER_SSH_HOST=127.0.0.1 SLIMFORMER_SSH_PORT=$port SLIMFORMER_SSH_USER=$(id -un)
export SLIMFORMER_SSH_KEY=$dir/client_key SLIMFORMER_SSH_PYTHON=$(command -v python3)
# stop with: $0 stop $dir
EOF
