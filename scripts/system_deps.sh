#!/usr/bin/env bash
# System packages for the multi-node test (tests/test_multinode.py): pdsh and openssh-server.
#
#   bash scripts/system_deps.sh
#
# Idempotent and quiet: does nothing when both tools are present. Never fails the build:
# when they cannot be installed (not root, no apt, no network) it says why and exits 0,
# and the multi-node test then skips itself with the reason.
# Installing openssh-server does not start a system sshd here (the test starts its own,
# bound to 127.0.0.2/127.0.0.3, and stops it); if the package's postinst did start one,
# that is the distribution's doing, not ours.

missing=()
command -v pdsh >/dev/null 2>&1 || missing+=(pdsh)
{ command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ]; } || missing+=(openssh-server)
command -v ssh >/dev/null 2>&1 || missing+=(openssh-client)
[ ${#missing[@]} -eq 0 ] && exit 0

say() { echo "system_deps: $*" >&2; }
if ! command -v apt-get >/dev/null 2>&1; then
  say "cannot install ${missing[*]}: no apt-get on this system; the multi-node test will be skipped"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    say "cannot install ${missing[*]}: not root and no passwordless sudo; the multi-node test will be skipped"
    exit 0
  fi
fi
log=$(mktemp)
say "installing ${missing[*]} with apt-get (log: $log)"
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
  # the package lists may be missing or stale on a fresh machine
  if ! { $SUDO apt-get update -qq >>"$log" 2>&1 &&
         $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$log" 2>&1; }; then
    say "apt-get could not install ${missing[*]} (last lines of $log below); the multi-node test will be skipped"
    tail -n 5 "$log" >&2
    exit 0
  fi
fi
rm -f "$log"
say "installed ${missing[*]}"
exit 0
