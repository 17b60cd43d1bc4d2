//! Raw ioctls and the child-side setup run between spawn and exec (with `spawn.rs`, the only
//! modules with `unsafe`).
//!
//! # Design
//! Everything here is a thin wrapper over one syscall or a fixed sequence of them, so the
//! safety arguments stay local. The pre-exec hook only calls async-signal-safe syscalls on
//! data allocated before the spawn (no allocation, no locks): the spawned child shares the
//! agent's memory until it execs.
//!
//! # Limitations
//! x86_64/aarch64 Linux only (ioctl numbers and `ifreq` layout come from `libc`).

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use matchlock_guest_proto::WinSize;

/// Capabilities removed from the bounding set of unprivileged commands: CAP_SYS_MODULE (16),
/// CAP_SYS_RAWIO (17), CAP_SYS_PTRACE (19), CAP_SYS_ADMIN (21), CAP_SYS_BOOT (22)
/// (`linux/capability.h`; `libc` does not export them).
pub const DROPPED_CAPS: [libc::c_int; 5] = [16, 17, 19, 21, 22];

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Sets `IFF_UP` on the interface `name` (e.g. `lo`).
pub fn interface_up(name: &str) -> io::Result<()> {
    let mut req = ifreq_for(name)?;
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").or_else(|_| {
        // No IPv4 address may be configured yet; an unbound datagram socket is enough.
        std::net::UdpSocket::bind("[::]:0")
    })?;
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of a valid, owned `ifreq`.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: the kernel just filled the `ifru_flags` member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads a valid, owned `ifreq`.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) })
}

/// An `ifreq` naming `name`, everything else zero.
fn ifreq_for(name: &str) -> io::Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: `ifreq` is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

/// A `sockaddr` holding the IPv4 address `ip` (port 0).
fn sockaddr_v4(ip: std::net::Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `sockaddr_in` and `sockaddr` have the same size (16 bytes) on Linux and both
    // are plain old data; the kernel reads the former through the latter for AF_INET.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Gives interface `name` the IPv4 address `addr/prefix_len` and the MTU `mtu`, brings it
/// up and adds a default route via `gateway` (classic `SIOC*` ioctls, no netlink).
pub fn configure_ipv4(
    name: &str,
    addr: std::net::Ipv4Addr,
    prefix_len: u8,
    gateway: std::net::Ipv4Addr,
    mtu: u16,
) -> io::Result<()> {
    if !(1..=30).contains(&prefix_len) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let fd = sock.as_raw_fd();
    let mask = std::net::Ipv4Addr::from(u32::MAX << (32 - u32::from(prefix_len)));
    let mut req = ifreq_for(name)?;
    req.ifr_ifru.ifru_addr = sockaddr_v4(addr);
    // SAFETY: SIOCSIFADDR reads a valid, owned `ifreq` whose address member is set.
    check(unsafe { libc::ioctl(fd, libc::SIOCSIFADDR, &req) })?;
    req.ifr_ifru.ifru_netmask = sockaddr_v4(mask);
    // SAFETY: SIOCSIFNETMASK reads a valid, owned `ifreq` whose netmask member is set.
    check(unsafe { libc::ioctl(fd, libc::SIOCSIFNETMASK, &req) })?;
    req.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
    // SAFETY: SIOCSIFMTU reads a valid, owned `ifreq` whose MTU member is set.
    check(unsafe { libc::ioctl(fd, libc::SIOCSIFMTU, &req) })?;
    interface_up(name)?;
    // SAFETY: `rtentry` is plain old data; all-zero is a valid value (null device pointer:
    // the kernel picks the interface from the gateway).
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_v4(std::net::Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr_v4(std::net::Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr_v4(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: SIOCADDRT reads a valid, owned `rtentry`.
    check(unsafe { libc::ioctl(fd, libc::SIOCADDRT, &rt) })
}

/// `struct in6_rtmsg` of `<linux/ipv6_route.h>` (the libc crate keeps its fields private).
#[repr(C)]
struct In6Rtmsg {
    dst: libc::in6_addr,
    src: libc::in6_addr,
    gateway: libc::in6_addr,
    kind: u32,
    dst_len: u16,
    src_len: u16,
    metric: u32,
    info: libc::c_ulong,
    flags: u32,
    ifindex: libc::c_int,
}

/// Writes `value` to `/proc/sys/net/ipv6/conf/<name>/<key>`.
fn ipv6_conf(name: &str, key: &str, value: &str) -> io::Result<()> {
    std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/{key}"), value)
}

/// Gives `name` the static IPv6 address `addr/prefix_len` and a default route via
/// `gateway`, with duplicate address detection and router advertisements off (the host's
/// stack is the only other node on the link, and the settings come with the boot config).
pub fn configure_ipv6(
    name: &str,
    addr: std::net::Ipv6Addr,
    prefix_len: u8,
    gateway: std::net::Ipv6Addr,
) -> io::Result<()> {
    if !(1..=126).contains(&prefix_len) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for (key, value) in [("accept_dad", "0"), ("accept_ra", "0"), ("autoconf", "0")] {
        ipv6_conf(name, key, value)?;
    }
    let cname =
        std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: if_nametoindex reads a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    let index =
        libc::c_int::try_from(index).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let sock = std::net::UdpSocket::bind("[::]:0")?;
    let fd = sock.as_raw_fd();
    let req = libc::in6_ifreq {
        ifr6_addr: libc::in6_addr {
            s6_addr: addr.octets(),
        },
        ifr6_prefixlen: u32::from(prefix_len),
        ifr6_ifindex: index,
    };
    // SAFETY: SIOCSIFADDR on an AF_INET6 socket reads a valid, owned `in6_ifreq`.
    check(unsafe { libc::ioctl(fd, libc::SIOCSIFADDR, &req) })?;
    let unspecified = libc::in6_addr { s6_addr: [0; 16] };
    let rt = In6Rtmsg {
        dst: unspecified,
        src: unspecified,
        gateway: libc::in6_addr {
            s6_addr: gateway.octets(),
        },
        kind: 0,
        dst_len: 0,
        src_len: 0,
        metric: 1,
        info: 0,
        flags: u32::from(libc::RTF_UP | libc::RTF_GATEWAY),
        ifindex: index,
    };
    // SAFETY: SIOCADDRT on an AF_INET6 socket reads a valid, owned `in6_rtmsg` (same layout).
    check(unsafe { libc::ioctl(fd, libc::SIOCADDRT, &rt) })
}

/// Sets the window size of a terminal (normally a PTY master).
pub fn set_winsize(fd: BorrowedFd<'_>, size: WinSize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a valid `winsize` from a live pointer; `fd` is borrowed open.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) })
}

/// Microseconds of `CLOCK_BOOTTIME`: in the VM, time since the kernel started (what
/// `/proc/uptime` shows). 0 if the clock cannot be read.
pub fn boottime_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| {
            let us = i128::from(t.tv_sec()) * 1_000_000 + i128::from(t.tv_nsec()) / 1000;
            u64::try_from(us).unwrap_or(0)
        })
        .unwrap_or(0)
}

/// A pidfd for `pid` (readable once it has exited), close-on-exec.
pub fn pidfd_open(pid: i32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes integers; a non-negative result is a new fd we own.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(ret).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Sends signal number `sig` (any number, including real-time signals) to process group
/// `pgid`.
pub fn kill_group(pgid: i32, sig: i32) -> io::Result<()> {
    if pgid <= 1 {
        // kill(-1) or kill(0) would hit everything; never a command's group.
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: kill takes integers only and touches no memory of ours.
    check(unsafe { libc::kill(-pgid, sig) })
}

/// Blocks until some child has exited and returns its pid, leaving it a zombie
/// (`waitid(P_ALL, WEXITED | WNOWAIT)`). Raw libc because `nix` rejects statuses carrying
/// real-time signal numbers.
pub fn wait_any_exited() -> io::Result<i32> {
    // SAFETY: `siginfo_t` is plain old data; all-zero is valid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes into the owned, properly sized `info`.
    check(unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) })?;
    // SAFETY: for WEXITED results the kernel filled the `si_pid` member.
    Ok(unsafe { info.si_pid() })
}

/// Reaps `pid` if it has exited: `Ok(None)` if it has not, else its raw wait status.
pub fn reap(pid: i32) -> io::Result<Option<libc::c_int>> {
    let mut status: libc::c_int = 0;
    // SAFETY: waitpid writes one int into the owned `status`.
    let ret = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    match ret {
        r if r < 0 => Err(io::Error::last_os_error()),
        0 => Ok(None),
        _ => Ok(Some(status)),
    }
}

/// Syscalls that unprivileged commands get `EPERM` for (as the reference): reading or writing
/// other processes' memory, tracing them, and loading a new kernel.
const DENIED_SYSCALLS: [libc::c_long; 5] = [
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
];

/// Address families whose `socket(2)` unprivileged commands get `EPERM` for: `AF_VSOCK`, the
/// transport of the guest agent (and of the host's listeners), which only PID 1 needs.
const DENIED_SOCKET_FAMILIES: [libc::c_int; 1] = [libc::AF_VSOCK];

type Program = std::sync::Arc<Vec<libc::sock_filter>>;

fn build_seccomp_program() -> Result<Program, seccompiler::BackendError> {
    use seccompiler::{SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition};
    let mut rules: std::collections::BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        DENIED_SYSCALLS.iter().map(|nr| (*nr, Vec::new())).collect();
    let family_rules = DENIED_SOCKET_FAMILIES
        .iter()
        .map(|family| {
            // The domain is an int: compare the low 32 bits only.
            let cond = SeccompCondition::new(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                u64::from(family.unsigned_abs()),
            )?;
            seccompiler::SeccompRule::new(vec![cond])
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_socket, family_rules);
    let filter = seccompiler::SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM.unsigned_abs()),
        seccompiler::TargetArch::x86_64,
    )?;
    let prog: seccompiler::BpfProgram = filter.try_into()?;
    Ok(std::sync::Arc::new(
        prog.iter()
            .map(|i| libc::sock_filter {
                code: i.code,
                jt: i.jt,
                jf: i.jf,
                k: i.k,
            })
            .collect(),
    ))
}

/// The seccomp program for unprivileged commands, compiled once (before any spawn, since the
/// child may not allocate) with rust-vmm's `seccompiler`.
pub fn seccomp_program() -> io::Result<Program> {
    use std::sync::OnceLock;
    static PROGRAM: OnceLock<Result<Program, String>> = OnceLock::new();
    let built = PROGRAM.get_or_init(|| build_seccomp_program().map_err(|e| e.to_string()));
    built.clone().map_err(io::Error::other)
}

/// Kernel interfaces that unprivileged commands see read-only (Docker's `readonlyPaths`
/// for `/proc`, plus all of `/sys`): writes there change the whole VM (`kernel.hostname`,
/// `kernel.poweroff_cmd`, `vm.drop_caches`, cgroup limits, ...). Missing ones are skipped.
const READONLY_KERNEL_PATHS: [&std::ffi::CStr; 6] = [
    c"/proc/sys",
    c"/proc/sysrq-trigger",
    c"/proc/irq",
    c"/proc/bus",
    c"/proc/fs",
    c"/sys",
];

/// What the child does to itself between spawn and exec.
#[derive(Debug, Clone)]
pub struct ChildSetup {
    /// Make fd 0 (a PTY slave) the controlling terminal of the new session.
    pub controlling_tty: bool,
    /// Enter a private mount namespace where [`READONLY_KERNEL_PATHS`] are read-only.
    pub readonly_kernel_fs: bool,
    /// Drop [`DROPPED_CAPS`] from the bounding set.
    pub drop_caps: bool,
    pub uid: u32,
    pub gid: u32,
    /// All groups including `gid`.
    pub groups: Vec<u32>,
    /// Set `no_new_privs` and install this seccomp program, last (after the user switch).
    pub seccomp: Option<Program>,
}

/// New session, and the PTY on fd 0 as its controlling terminal if asked.
fn enter_session(controlling_tty: bool) -> io::Result<()> {
    // SAFETY: setsid has no memory effects; the child is a new process, not a group leader.
    check(unsafe { libc::setsid() })?;
    if controlling_tty {
        // SAFETY: fd 0 is the PTY slave installed by Command; TIOCSCTTY takes an int arg.
        check(unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) })?;
    }
    Ok(())
}

/// `mount(2)` with no data argument; every pointer is a `'static` C string or null.
fn mount_raw(
    source: Option<&'static std::ffi::CStr>,
    target: &'static std::ffi::CStr,
    flags: libc::c_ulong,
) -> io::Result<()> {
    let source = source.map_or(std::ptr::null(), std::ffi::CStr::as_ptr);
    // SAFETY: all pointers are null or NUL-terminated strings that outlive the call.
    check(unsafe {
        libc::mount(
            source,
            target.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    })
}

/// Sets `MOUNT_ATTR_RDONLY` on `path` and every mount below it, in this mount namespace only.
fn make_readonly_recursive(path: &'static std::ffi::CStr) -> io::Result<()> {
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr reads `size_of::<mount_attr>()` bytes from the live `attr` and
    // the NUL-terminated `path`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_RECURSIVE,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Moves the child into its own mount namespace (receiving, never sending, propagation) and
/// makes [`READONLY_KERNEL_PATHS`] read-only there. `/proc` entries are not mount points,
/// so each is bind-mounted onto itself first; `/sys` is (sysfs, cgroup2 below it).
fn protect_kernel_fs() -> io::Result<()> {
    // SAFETY: unshare takes flags only; the child is single-threaded (it shares no `fs` with us).
    check(unsafe { libc::unshare(libc::CLONE_NEWNS) })?;
    mount_raw(None, c"/", libc::MS_REC | libc::MS_SLAVE)?;
    for path in READONLY_KERNEL_PATHS {
        if path != c"/sys" {
            match mount_raw(Some(path), path, libc::MS_BIND | libc::MS_REC) {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                other => other?,
            }
        }
        make_readonly_recursive(path)?;
    }
    Ok(())
}

fn drop_bounding_caps() -> io::Result<()> {
    for cap in DROPPED_CAPS {
        // SAFETY: prctl with integer arguments only.
        let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        // EINVAL: capability unknown to this kernel; nothing to drop.
        if ret < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Groups, gid, then uid (while still root). Raw syscalls: glibc's wrappers would try to
/// change the credentials of every thread of the agent, whose memory a spawned child shares
/// (see `spawn.rs`).
fn switch_user(uid: u32, gid: u32, groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: `groups` was allocated before the spawn and is borrowed for the call.
    check_long(unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) })?;
    // SAFETY: plain syscalls with integer arguments.
    check_long(unsafe { libc::syscall(libc::SYS_setgid, gid) })?;
    // SAFETY: as above.
    check_long(unsafe { libc::syscall(libc::SYS_setuid, uid) })
}

fn check_long(ret: libc::c_long) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `no_new_privs`, then the filter (which the kernel copies).
fn apply_seccomp(prog: &[libc::sock_filter]) -> io::Result<()> {
    let fprog = libc::sock_fprog {
        len: u16::try_from(prog.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?,
        // The kernel only reads the program; the cast satisfies the C signature.
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
    // SAFETY: `fprog` points at `prog`, allocated before the spawn and alive for the call.
    check(unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &fprog as *const libc::sock_fprog,
        )
    })
}

/// The child's hardening, run by the spawned child before exec: new session, optional
/// controlling tty, read-only kernel filesystems, capability drop, then groups, gid and uid,
/// then seccomp. Only syscalls on data allocated before the spawn (`groups`, the program).
pub fn apply_child_setup(setup: &ChildSetup, groups: &[libc::gid_t]) -> io::Result<()> {
    enter_session(setup.controlling_tty)?;
    if setup.readonly_kernel_fs {
        protect_kernel_fs()?;
    }
    if setup.drop_caps {
        drop_bounding_caps()?;
    }
    if setup.uid != 0 || setup.gid != 0 || groups.len() > 1 {
        switch_user(setup.uid, setup.gid, groups)?;
    }
    if let Some(prog) = &setup.seccomp {
        apply_seccomp(prog)?;
    }
    Ok(())
}

/// `RNDADDENTROPY` (`_IOW('R', 0x03, int[2])`); not in the `libc` crate.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` (`_IO('R', 0x07)`, Linux 4.17+); not in the `libc` crate.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
/// Largest seed accepted (bytes).
pub const MAX_SEED: usize = 256;

/// Credits `seed` to the kernel's input pool (`RNDADDENTROPY`, needs `CAP_SYS_ADMIN`) and
/// forces the CRNG to reseed from it now (`RNDRESEEDCRNG`).
pub fn add_entropy_and_reseed(seed: &[u8]) -> io::Result<()> {
    if seed.is_empty() || seed.len() > MAX_SEED {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("seed of {} bytes (1-{MAX_SEED})", seed.len()),
        ));
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let words = seed.len().div_ceil(4);
    let mut info: Vec<libc::c_int> = vec![0; 2 + words];
    let bits = libc::c_int::try_from(seed.len() * 8).unwrap_or(0);
    let size = libc::c_int::try_from(seed.len()).unwrap_or(0);
    info[0] = bits;
    info[1] = size;
    for (i, chunk) in seed.chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = libc::c_int::from_ne_bytes(w);
    }
    // SAFETY: `info` is a valid rand_pool_info of `size` bytes of buffer that outlives the
    // call; the kernel only reads it.
    check(unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) })?;
    // SAFETY: no argument.
    check(unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `socket(family, SOCK_STREAM)` on a thread that installed the command filter (filters
    /// and `no_new_privs` are per thread, so the rest of the test process is unaffected).
    fn socket_errno_under_filter(families: Vec<libc::c_int>) -> Vec<Option<i32>> {
        let prog = seccomp_program().expect("program");
        std::thread::spawn(move || {
            apply_seccomp(&prog).expect("install filter");
            families
                .into_iter()
                .map(|family| {
                    // SAFETY: socket takes integers; a returned fd is closed right away.
                    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM, 0) };
                    if fd >= 0 {
                        // SAFETY: `fd` was just returned by socket and is owned here.
                        unsafe { libc::close(fd) };
                        None
                    } else {
                        io::Error::last_os_error().raw_os_error()
                    }
                })
                .collect()
        })
        .join()
        .expect("filter thread")
    }

    #[test]
    fn filter_denies_vsock_sockets_only() {
        let got = socket_errno_under_filter(vec![libc::AF_VSOCK, libc::AF_UNIX, libc::AF_INET]);
        assert_eq!(got, vec![Some(libc::EPERM), None, None]);
    }
}
