# Sourced by the benchmark scripts (from the repository root): peers installed when missing,
# svcd built in release, a work dir whose processes are stopped and files removed on exit, free
# loopback ports, medians.

# install_missing CMD:PACKAGE ... — CMD is a command name, or an absolute path that must exist.
install_missing() {
  local need=() pair cmd
  for pair in "$@"; do
    cmd=${pair%%:*}
    if [[ $cmd == /* ]]; then [ -e "$cmd" ] || need+=("${pair#*:}")
    else command -v "$cmd" >/dev/null || need+=("${pair#*:}"); fi
  done
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  scripts/setup
  cargo build --release --bin svcd -q
}

work=$(mktemp -d)
chmod 755 "$work"  # nginx workers run as www-data
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Median of whitespace-separated numbers on stdin.
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
