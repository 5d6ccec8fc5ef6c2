# Helpers the measurement scripts share (sourced from the repository root, after `cd`).
# Messages name the script that sourced them.

# A free loopback port (bound and released).
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# wait_for WHAT COMMAND...: run COMMAND every 50 ms until it succeeds, WAIT_TRIES times (400)
# at most, else say what never happened and exit.
wait_for() {
  local what=$1; shift
  for _ in $(seq 1 "${WAIT_TRIES:-400}"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "$(basename "$0"): timed out waiting for $what" >&2; exit 1
}

# listening PORT: something accepts on 127.0.0.1:PORT.
listening() { python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)" "$1"; }

# certs_valid ADMIN-PORT DOMAIN...: the sidecar's admin port shows every DOMAIN valid.
certs_valid() {
  python3 - "$@" <<'PY'
import json, sys, urllib.request
certs = json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/certs", timeout=1))
valid = {c["domain"] for c in certs if c["status"] == "valid"}
sys.exit(0 if set(sys.argv[2:]) <= valid else 1)
PY
}
