"""Orchestrator for scripts/snapshot-study.sh (run that, not this): boots, snapshots and
restores microvms and prints the timings and findings that docs/snapshots.md quotes.

Every QEMU process is started by this script, killed by its own pid, and lives in the
study's temporary directory; guest RAM files live in the study's /dev/shm directory.
"""

import json
import os
import secrets
import socket
import statistics
import subprocess
import time

WORK = os.environ["STUDY_WORK"]
SHM = os.environ["STUDY_SHM"]
KERNEL = os.environ["STUDY_KERNEL"]
RUNS = int(os.environ["STUDY_RUNS"])
MEM = int(os.environ["STUDY_MEM"])
VSOCK_BIN = os.environ["STUDY_VSOCK_BIN"]
INITRD = os.path.join(WORK, "initramfs.gz")
DISK = os.path.join(WORK, "disk.raw")
TIMEOUT = 30.0


def host_tsc_khz():
    """As qemu.rs::host_tsc_khz: TCG guests cannot calibrate the TSC without it."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    raise RuntimeError("no `cpu MHz` in /proc/cpuinfo")


CMDLINE = f"console=ttyS0 reboot=t panic=-1 quiet tsc_early_khz={host_tsc_khz()} init=/init"


def base_argv(mem_object, channel, disk=DISK):
    """matchlock's QEMU line for TCG (crates/matchlock-vm/src/qemu.rs::qemu_args), with the
    memory backend and the host channel supplied by the caller."""
    return [
        "qemu-system-x86_64",
        "-M", "microvm,memory-backend=mem",
        "-object", mem_object,
        "-global", "virtio-mmio.force-legacy=false",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-accel", "tcg", "-cpu", "max,-erms,-fsrm",
        "-smp", "1", "-m", f"{MEM}M",
        "-chardev", "file,id=con,path=" + os.path.join(WORK, "console.log"),
        "-serial", "chardev:con",
        "-kernel", KERNEL, "-initrd", INITRD,
        "-append", CMDLINE,
        *channel,
        "-drive", f"id=d0,file={disk},format=raw,if=none,readonly=on,discard=unmap",
        "-device", "virtio-blk-device,drive=d0,serial=rootfs",
        "-device", "virtio-rng-device",
    ]


def serial_channel(name):
    sock = os.path.join(WORK, name + ".port")
    return sock, [
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=ch,path={sock},server=on,wait=off",
        "-device", "virtserialport,chardev=ch,name=ml.0",
    ]


def file_mem(path, share="on"):
    return f"memory-backend-file,id=mem,size={MEM}M,mem-path={path},share={share}"


def connect(path, deadline):
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            s.settimeout(max(0.1, deadline - time.monotonic()))
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no listener on {path}")
            time.sleep(0.001)


class Port:
    """The host end of the guest's virtio-serial port: one request line, one reply line."""

    def __init__(self, path, deadline):
        self.s = connect(path, deadline)
        self.buf = b""

    def ask(self, line):
        self.s.sendall(line.encode() + b"\n")
        while b"\n" not in self.buf:
            chunk = self.s.recv(4096)
            if not chunk:
                raise EOFError("guest port closed")
            self.buf += chunk
        reply, self.buf = self.buf.split(b"\n", 1)
        return reply.decode()

    def close(self):
        self.s.close()


class Qmp:
    def __init__(self, path, deadline):
        self.s = connect(path, deadline)
        self.f = self.s.makefile("rwb")
        json.loads(self.f.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.f.flush()
        while True:
            msg = json.loads(self.f.readline())
            if "return" in msg or "error" in msg:
                return msg

    def close(self):
        self.s.close()


SPAWNED = []  # every QEMU this script started, killed by pid at exit whatever happens


def spawn(argv):
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    SPAWNED.append(proc)
    return proc


def stop(proc):
    proc.kill()
    proc.wait()


def cold_boot(mem_path, name, qmp=False):
    """Starts a VM; returns (process, port, seconds from spawn to the first exec's reply)."""
    sock, chan = serial_channel(name)
    argv = base_argv(file_mem(mem_path), chan)
    if qmp:
        argv += ["-qmp", f"unix:{os.path.join(WORK, name + '.qmp')},server=on,wait=off"]
    t0 = time.monotonic()
    proc = spawn(argv)
    port = Port(sock, t0 + TIMEOUT)
    pong = port.ask("p")
    t_pong = time.monotonic()
    reply = port.ask("x")
    t = time.monotonic() - t0
    if pong != "pong" or reply != "done 0":
        raise RuntimeError(f"cold boot: unexpected replies {pong!r} {reply!r}")
    t1 = time.monotonic()
    if port.ask("x") != "done 0":
        raise RuntimeError("cold boot: second exec failed")
    warm = time.monotonic() - t1
    with open(os.path.join(WORK, "console.log"), errors="replace") as f:
        marks = [l.split()[-2] for l in f if l.startswith("init: port open")]
    phases = {"guest uptime at port open": float(marks[-1]) if marks else float("nan"),
              "spawn to first ping": t_pong - t0, "first exec of /bin/true": t1 - t_pong,
              "second exec (warm)": warm}
    return proc, port, t, phases


def save(name, state):
    """Snapshots a running VM (RAM stays in its shared file); returns seconds and bytes."""
    qmp = Qmp(os.path.join(WORK, name + ".qmp"), time.monotonic() + TIMEOUT)
    r = qmp.cmd("migrate-set-capabilities",
                capabilities=[{"capability": "x-ignore-shared", "state": True}])
    assert "return" in r, r
    t0 = time.monotonic()
    r = qmp.cmd("migrate", uri=f"exec:cat > {state}")
    assert "return" in r, r
    while True:
        st = qmp.cmd("query-migrate")["return"].get("status")
        if st == "completed":
            break
        if st in ("failed", "cancelled"):
            raise RuntimeError(f"migrate {st}")
        time.sleep(0.002)
    t = time.monotonic() - t0
    qmp.close()
    return t, os.path.getsize(state)


def start_incoming(mem_path, state, name, share="on", disk=DISK):
    """Starts QEMU with `-incoming defer`; the capability must be set before the stream is
    read (QEMU 7.2 has no `-global migration.x-ignore-shared`), so it goes through QMP."""
    sock, chan = serial_channel(name)
    qmp_path = os.path.join(WORK, name + ".qmp")
    argv = base_argv(file_mem(mem_path, share), chan, disk) + [
        "-qmp", f"unix:{qmp_path},server=on,wait=off", "-incoming", "defer"]
    proc = spawn(argv)
    qmp = Qmp(qmp_path, time.monotonic() + TIMEOUT)
    r = qmp.cmd("migrate-set-capabilities",
                capabilities=[{"capability": "x-ignore-shared", "state": True}])
    assert "return" in r, r
    r = qmp.cmd("migrate-incoming", uri=f"exec:cat {state}")
    assert "return" in r, r
    t_up = time.monotonic()
    while qmp.cmd("query-status")["return"]["status"] != "running":
        time.sleep(0.001)
    t_running = time.monotonic()
    qmp.close()
    return proc, sock, (t_up, t_running)


def restore(mem_path, state, name, share="on", disk=DISK):
    """Starts a VM from `state` + RAM file; returns (process, port, seconds to first exec)."""
    t0 = time.monotonic()
    proc, sock, (t_up, t_running) = start_incoming(mem_path, state, name, share, disk)
    try:
        port = Port(sock, t0 + TIMEOUT)
        pong = port.ask("p")
        t_pong = time.monotonic()
        reply = port.ask("x")
        t_first = time.monotonic()
        second = port.ask("x")
    except (OSError, EOFError) as e:
        time.sleep(0.5)
        alive = proc.poll() is None
        stop(proc)
        raise RuntimeError(f"restore failed (QEMU {'alive' if alive else proc.returncode}): "
                           f"{proc.stderr.read().decode(errors='replace')}") from e
    if pong != "pong" or reply != "done 0" or second != "done 0":
        raise RuntimeError(f"restore: unexpected replies {pong!r} {reply!r} {second!r}")
    phases = {"qemu up (QMP answers)": t_up - t0, "state loaded, running": t_running - t_up,
              "first ping (shell builtin)": t_pong - t_running,
              "first exec of /bin/true": t_first - t_pong,
              "second exec (warm)": time.monotonic() - t_first}
    return proc, port, t_first - t0, phases


def clone_ram(src, dst):
    t0 = time.monotonic()
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)
    return time.monotonic() - t0


def sha256(path):
    return subprocess.run(["sha256sum", path], capture_output=True, text=True,
                          check=True).stdout.split()[0]


def du_kib(path):
    return int(subprocess.run(["du", "-k", path], capture_output=True, text=True,
                              check=True).stdout.split()[0])


def ms(t):
    return f"{t * 1000:.0f} ms"


def vhost_user_vsock_blocker():
    """Tries to migrate a VM with matchlock's own host channel and returns QEMU's answer."""
    vhost = os.path.join(WORK, "vhost.sock")
    helper = subprocess.Popen(
        [VSOCK_BIN, "--vm", f"guest-cid=3,socket={vhost},uds-path={os.path.join(WORK, 'vsock')}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(vhost):
            if time.monotonic() > deadline:
                return "vhost-device-vsock did not start"
            time.sleep(0.01)
        qmp_path = os.path.join(WORK, "vsock.qmp")
        argv = base_argv(f"memory-backend-memfd,id=mem,size={MEM}M,share=on", [
            "-chardev", f"socket,id=vs,path={vhost}",
            "-device", "vhost-user-vsock-device,chardev=vs",
        ]) + ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
        proc = spawn(argv)
        try:
            qmp = Qmp(qmp_path, time.monotonic() + TIMEOUT)
            r = qmp.cmd("migrate", uri=f"exec:cat > {os.path.join(WORK, 'vsock.state')}")
            qmp.close()
            return r.get("error", {}).get("desc", f"no error: {r}")
        finally:
            stop(proc)
    finally:
        helper.kill()
        helper.wait()


def main():
    print("## 1. What blocks it today")
    print(f"vhost-user-vsock-device, QMP migrate -> {vhost_user_vsock_blocker()!r}")
    for dev in ("/dev/vhost-vsock", "/dev/vsock", "/dev/kvm"):
        print(f"{dev}: {'present' if os.path.exists(dev) else 'absent'}")

    print("\n## 2. Cold boot, snapshot, restore (virtio-serial channel, file-backed RAM)")
    snap_ram = os.path.join(SHM, "snap.ram")
    state = os.path.join(WORK, "snap.state")
    proc, port, t_cold0, _ = cold_boot(snap_ram, "snap", qmp=True)
    print(f"first cold boot (kept as the snapshot source): {ms(t_cold0)}")
    port.ask("s " + str(int(time.time())) + " " + secrets.token_hex(32))
    print(f"snapshot source reads its disk before the save: {port.ask('d')!r}")
    t_save, size = save("snap", state)
    port.close()
    stop(proc)
    print(f"save (migrate to exec:cat, x-ignore-shared): {ms(t_save)}, "
          f"device state {size} bytes, RAM file {du_kib(snap_ram)} KiB resident of {MEM} MiB")

    # One run = one cold boot and one restore back to back, so load hits both alike.
    cold, rest, copy = [], [], []
    cold_ph, rest_ph, priv, priv_ph = {}, {}, [], {}
    digest = sha256(snap_ram)
    for i in range(RUNS):
        proc, port, t, ph = cold_boot(os.path.join(SHM, f"cold{i}.ram"), f"cold{i}")
        for k, v in ph.items():
            cold_ph.setdefault(k, []).append(v)
        cold.append(t)
        port.close()
        stop(proc)
        os.unlink(os.path.join(SHM, f"cold{i}.ram"))
        ram = os.path.join(SHM, f"clone{i}.ram")
        c = clone_ram(snap_ram, ram)
        proc, port, t, ph = restore(ram, state, f"clone{i}")
        for k, v in ph.items():
            rest_ph.setdefault(k, []).append(v)
        copy.append(c)
        rest.append(t)
        port.close()
        stop(proc)
        os.unlink(ram)
        # The same snapshot file mapped privately (copy-on-write), no clone.
        proc, port, t, ph = restore(snap_ram, state, f"priv{i}", share="off")
        for k, v in ph.items():
            priv_ph.setdefault(k, []).append(v)
        priv.append(t)
        port.close()
        stop(proc)
    mc, mr, mk = (statistics.median(v) for v in (cold, rest, copy))
    print(f"cold boot to first exec, median of {RUNS}: {ms(mc)}  (all: "
          f"{', '.join(ms(t) for t in cold)})")
    print(f"restore share=on of a fresh RAM copy, to first exec, median of {RUNS}: {ms(mr)}  (all: "
          f"{', '.join(ms(t) for t in rest)})")
    mp = statistics.median(priv)
    print(f"restore share=off (private map of the snapshot file, no clone), median of {RUNS}: "
          f"{ms(mp)}  (all: {', '.join(ms(t) for t in priv)}); snapshot file "
          f"{'unchanged' if sha256(snap_ram) == digest else 'CHANGED'} after all restores")
    for label, ph in (("cold boot", cold_ph), ("restore share=on+clone", rest_ph),
                      ("restore share=off", priv_ph)):
        print(f"  {label} phases (medians): " + "; ".join(
            f"{k} {statistics.median(v) * 1000:.0f} ms" if "uptime" not in k
            else f"{k} {statistics.median(v):.2f} s" for k, v in ph.items()))
    print(f"RAM file clone (cp --sparse=always on tmpfs), median: {ms(mk)}")
    print(f"restore + clone: {ms(mr + mk)}; ratios cold/(restore+clone) {mc / (mr + mk):.1f}x, "
          f"cold/restore-private {mc / mp:.1f}x; bar 350 ms (best path, median {ms(mp)}): "
          f"{'met' if mp <= 0.35 else 'missed'}")

    print("\n## 3. Guest state after restore")
    a_ram, b_ram = os.path.join(SHM, "a.ram"), os.path.join(SHM, "b.ram")
    clone_ram(snap_ram, a_ram)
    clone_ram(snap_ram, b_ram)
    time.sleep(2)  # make the snapshot's age visible in the guest clock
    pa, qa, _, _ = restore(a_ram, state, "a")
    pb, qb, _, _ = restore(b_ram, state, "b")
    host_now = time.time()
    clock = qa.ask("t")
    guest_now = float(clock.split()[1])
    print(f"guest clock right after restore: {clock}; host {host_now:.3f}; "
          f"guest behind by {host_now - guest_now:.2f} s")
    ra, rb = qa.ask("r"), qb.ask("r")
    print(f"first 16 random bytes in clone a: {ra}")
    print(f"first 16 random bytes in clone b: {rb}  ({'IDENTICAL' if ra == rb else 'different'})")
    print(f"hostnames: {qa.ask('h')} / {qb.ask('h')}")
    seed_a, seed_b = secrets.token_hex(32), secrets.token_hex(32)
    t0 = time.monotonic()
    qa.ask(f"s {int(time.time())} {seed_a}")
    t_fix = time.monotonic() - t0
    qb.ask(f"s {int(time.time())} {seed_b}")
    ra, rb = qa.ask("r"), qb.ask("r")
    print(f"after 'set clock + write seed to /dev/urandom + hostname' ({ms(t_fix)}):")
    print(f"  random a {ra} / b {rb}  ({'IDENTICAL' if ra == rb else 'different'})")
    print(f"  clock {qa.ask('t')}; host {time.time():.3f}; hostnames "
          f"{qa.ask('h')} / {qb.ask('h')}")
    for p, q in ((pa, qa), (pb, qb)):
        q.close()
        stop(p)

    # Per-VM disks: the restored guest kernel read the snapshot's disk at probe time.
    disk_b = os.path.join(WORK, "disk-b.raw")
    with open(disk_b, "wb") as f:
        f.write(b"BBBB")
        f.truncate(1 << 20)
    pd, qd, _, _ = restore(snap_ram, state, "disk", share="off", disk=disk_b)
    before = qd.ask("d")
    flushed = qd.ask("f")
    print(f"restore with another disk file (starts BBBB): guest reads {before!r}; "
          f"after BLKFLSBUF ({flushed}): {qd.ask('d')!r}")
    qd.close()
    stop(pd)

    print("\n## 4. Control: the same device state with an empty RAM file")
    # Shows the restored guest really runs from the RAM file, not from the stream.
    empty = os.path.join(SHM, "empty.ram")
    with open(empty, "wb") as f:
        f.truncate(MEM << 20)
    answer = "no answer within 5 s"
    proc = None
    try:
        proc, sock, _ = start_incoming(empty, state, "empty", share="off")
        port = Port(sock, time.monotonic() + 5)
        port.s.settimeout(5)
        answer = f"answered {port.ask('x')!r}"
    except (OSError, EOFError, TimeoutError, KeyError, ValueError) as e:
        answer += f" ({type(e).__name__})"
    if proc is None:
        proc = subprocess.Popen(["true"])  # never started: nothing to stop
    stop(proc)
    print(f"empty RAM file: guest {answer}")

if __name__ == "__main__":
    try:
        main()
    finally:
        for p in SPAWNED:
            if p.poll() is None:
                stop(p)
