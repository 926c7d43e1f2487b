"""Two "hosts" on one machine: an sshd bound to 127.0.0.2 and 127.0.0.3 on a high port.

Throwaway host and user keys live in a temp folder; nothing in ~/.ssh or /etc/ssh is
touched, and sshd is stopped by its pid. All traffic stays on 127.0.0.0/8.

    with LoopbackCluster(tmp_dir) as c:       # raises Unavailable(reason) when it cannot run
        env["PDSH_SSH_ARGS_APPEND"] = c.ssh_args
        c.ssh("127.0.0.3", "hostname")

Run by hand (python -m tests.loopback_cluster) it starts the cluster, prints how to use
it, and stops it on Enter.
"""
from __future__ import annotations

import getpass
import os
import shlex
import shutil
import socket
import subprocess
import time

HOSTS = ("127.0.0.2", "127.0.0.3")


class Unavailable(Exception):
    """The loopback cluster cannot run here; the message says why (used as the skip reason)."""


def _which(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)),
                                      None)


def free_port_on(hosts=HOSTS) -> int:
    """A port that is free on every address in hosts (tries a few)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        try:
            for h in hosts:
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((h, port))
            return port
        except OSError:
            continue
    raise Unavailable(f"no port free on all of {hosts}")


class LoopbackCluster:
    def __init__(self, root, hosts=HOSTS):
        self.root = os.path.abspath(str(root))
        self.hosts = tuple(hosts)
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.key = os.path.join(self.root, "user_key")
        self.log = os.path.join(self.root, "sshd.log")
        self._made_privsep_dir = None

    # ------------------------------------------------------------------------------------
    @property
    def ssh_args(self) -> str:
        """What PDSH_SSH_ARGS_APPEND needs: port, key, no host-key prompts, never a password prompt."""
        return (f"-p {self.port} -i {self.key} -o IdentitiesOnly=yes -o StrictHostKeyChecking=no "
                f"-o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR")

    def ssh(self, host: str, command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        assert host in self.hosts, host  # never anything but our loopback addresses
        return subprocess.run(["ssh", *shlex.split(self.ssh_args), host, command], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def _log_tail(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    # ------------------------------------------------------------------------------------
    def start(self) -> "LoopbackCluster":
        sshd, ssh, keygen = _which("sshd"), _which("ssh"), _which("ssh-keygen")
        missing = [n for n, p in (("pdsh", _which("pdsh")), ("sshd (openssh-server)", sshd), ("ssh", ssh),
                                  ("ssh-keygen", keygen)) if p is None]
        if missing:
            raise Unavailable(f"{', '.join(missing)} not installed (bash scripts/system_deps.sh installs them)")
        for h in self.hosts:
            try:
                with socket.socket() as s:
                    s.bind((h, 0))
            except OSError as e:
                raise Unavailable(f"cannot bind to {h}: {e}") from e
        os.makedirs(self.root, exist_ok=True)
        for name in ("host_key", "user_key"):
            path = os.path.join(self.root, name)
            if not os.path.exists(path):
                subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", f"ppllm-test-{name}", "-f", path],
                               check=True, capture_output=True)
        shutil.copy(self.key + ".pub", os.path.join(self.root, "authorized_keys"))
        os.chmod(os.path.join(self.root, "authorized_keys"), 0o600)
        user = getpass.getuser()
        root_user = os.geteuid() == 0
        # sshd without PAM refuses accounts whose password field is locked ("!..."); PAM does not
        use_pam = "no"
        if root_user and os.path.exists("/etc/pam.d/sshd"):
            try:
                shadow = subprocess.run(["getent", "shadow", user], capture_output=True, text=True).stdout
                if shadow.split(":")[1:2] and shadow.split(":")[1].startswith("!"):
                    use_pam = "yes"
            except (OSError, IndexError):
                pass
        privsep = "/run/sshd"  # sshd insists on its privilege-separation folder when run as root
        if root_user and not os.path.isdir(privsep):
            os.makedirs(privsep, mode=0o755)
            self._made_privsep_dir = privsep
        self.port = free_port_on(self.hosts)
        config = os.path.join(self.root, "sshd_config")
        with open(config, "w") as f:
            f.write("\n".join([*(f"ListenAddress {h}:{self.port}" for h in self.hosts),
                               f"HostKey {self.root}/host_key",
                               f"PidFile {self.root}/sshd.pid",
                               f"AuthorizedKeysFile {self.root}/authorized_keys",
                               f"AllowUsers {user}",
                               "PubkeyAuthentication yes", "PasswordAuthentication no",
                               "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
                               f"UsePAM {use_pam}", "StrictModes no", "X11Forwarding no",
                               "AllowTcpForwarding no", "AllowAgentForwarding no", "PrintMotd no",
                               "MaxStartups 50", "LogLevel INFO", ""]))
        check = subprocess.run([sshd, "-t", "-f", config], capture_output=True, text=True)
        if check.returncode != 0:
            self.stop()
            raise Unavailable(f"sshd rejects the test config: {check.stderr.strip()[-500:]}")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sshd, "-D", "-e", "-f", config], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.time() + 30
        last = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                tail = self._log_tail()
                self.stop()
                raise Unavailable(f"sshd exited with {self.proc.returncode}: {tail[-500:]}")
            try:
                results = [self.ssh(h, "echo ok", timeout=15) for h in self.hosts]
            except subprocess.TimeoutExpired as e:
                last = f"ssh timed out: {e}"
                continue
            if all(r.returncode == 0 and r.stdout.strip() == "ok" for r in results):
                return self
            last = "; ".join(f"{h}: rc {r.returncode} {r.stderr.strip()[-300:]}" for h, r in zip(self.hosts, results))
            time.sleep(0.5)
        tail = self._log_tail()
        self.stop()
        raise Unavailable(f"ssh to the loopback sshd does not work: {last}\nsshd log: {tail[-800:]}")

    def stop(self) -> None:
        """Stop our sshd by its pid (sessions it started end with their commands)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._made_privsep_dir:
            try:
                os.rmdir(self._made_privsep_dir)
            except OSError:
                pass
            self._made_privsep_dir = None

    def __enter__(self) -> "LoopbackCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory(prefix="ppllm-loopback-") as d, LoopbackCluster(d) as c:
        print(f"sshd pid {c.proc.pid} on {', '.join(c.hosts)} port {c.port}")
        print(f"export PDSH_SSH_ARGS_APPEND='{c.ssh_args}'")
        print(f"pdsh -R ssh -w {','.join(c.hosts)} hostname")
        input("Enter stops sshd ")
