//! A client process for socket-level load balancing tests: the socket hooks
//! act on a process's sockets by its cgroup, so the client must be a process
//! of its own, placed in the test's cgroup. Each command prints one JSON
//! object per attempt on stdout.
//!
//! - `tcp ADDR N`: N connections; each: greeting backend, getpeername, the
//!   client address the backend saw.
//! - `udp ADDR N`: N datagrams, each from a new unconnected socket (a new
//!   flow); each: answering backend, the source recvfrom reported.
//! - `udp-sticky ADDR N`: N datagrams on one unconnected socket.
//! - `udp-connected ADDR SECONDS`: one connected socket, a datagram every
//!   100 ms for SECONDS; each: answering backend, or the error and any
//!   error left pending on the socket.
//! - `refused ADDR tcp|udp`: one connect (TCP) or send (unconnected UDP);
//!   the error and how long it took.
//! - `connect-loop ADDR N`: N times a fresh non-blocking TCP socket,
//!   `connect()` to ADDR, close (a connection's share of the socket hooks);
//!   the wall time per round trip and the calls that failed otherwise than
//!   in progress or refused (for the benchmark of the socket hooks).
#![expect(
    clippy::print_stderr,
    reason = "a helper process reports its usage on stderr"
)]

use std::{
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    process::ExitCode,
    time::{Duration, Instant},
};

use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(3);

fn backend_of(text: &str) -> String {
    text.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn tcp(target: SocketAddrV4, n: usize) {
    for _ in 0..n {
        let r = (|| -> std::io::Result<serde_json::Value> {
            let s = TcpStream::connect_timeout(&target.into(), TIMEOUT)?;
            s.set_read_timeout(Some(TIMEOUT))?;
            let peer = s.peer_addr()?;
            let mut greeting = String::new();
            BufReader::new(s).read_line(&mut greeting)?;
            let seen = greeting
                .split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .to_owned();
            Ok(json!({"backend": backend_of(&greeting), "peer": peer.to_string(), "seen": seen}))
        })();
        println!(
            "{}",
            r.unwrap_or_else(|e| json!({"error": format!("{:?}", e.kind())}))
        );
    }
}

fn udp(target: SocketAddrV4, n: usize, sticky: bool) -> std::io::Result<()> {
    let socket = || -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        Ok(s)
    };
    let one = socket()?;
    let mut buf = [0u8; 1500];
    for _ in 0..n {
        let fresh;
        let s = if sticky {
            &one
        } else {
            fresh = socket()?;
            &fresh
        };
        let r = s.send_to(b"q", target).and_then(|_| s.recv_from(&mut buf));
        println!(
            "{}",
            match r {
                Ok((len, from)) => json!({
                    "backend": backend_of(&String::from_utf8_lossy(&buf[..len])),
                    "from": from.to_string(),
                }),
                Err(e) => json!({"error": format!("{:?}", e.kind())}),
            }
        );
    }
    Ok(())
}

fn udp_connected(target: SocketAddrV4, seconds: u64) -> std::io::Result<()> {
    let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    s.connect(target)?;
    s.set_read_timeout(Some(Duration::from_millis(300)))?;
    let peer = s.peer_addr()?;
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut buf = [0u8; 1500];
    while Instant::now() < end {
        let r = s.send(b"q").and_then(|_| s.recv(&mut buf));
        let line = match r {
            Ok(len) => {
                json!({"backend": backend_of(&String::from_utf8_lossy(&buf[..len])), "peer": peer.to_string()})
            }
            // An aborted socket is also disconnected: the send may fail
            // first (EDESTADDRREQ) with the abort still pending.
            Err(e) => json!({
                "error": format!("{:?}", e.kind()),
                "raw": e.raw_os_error(),
                "pending": s.take_error().ok().flatten().map(|p| format!("{:?}", p.kind())),
            }),
        };
        println!("{line}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn refused(target: SocketAddrV4, proto: &str) -> std::io::Result<()> {
    let start = Instant::now();
    let err = if proto == "udp" {
        let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        s.send_to(b"q", target).err()
    } else {
        TcpStream::connect_timeout(&target.into(), Duration::from_secs(5)).err()
    };
    println!(
        "{}",
        json!({
            "error": err.as_ref().map(|e| format!("{:?}", e.kind())),
            "raw": err.as_ref().and_then(std::io::Error::raw_os_error),
            "ms": start.elapsed().as_millis() as u64,
        })
    );
    Ok(())
}

fn connect_loop(target: SocketAddrV4, n: u64) -> std::io::Result<()> {
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: target.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(target.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let mut errors = 0u64;
    let start = Instant::now();
    for _ in 0..n {
        // SAFETY: plain socket calls on a descriptor this loop owns and
        // closes, with a sockaddr_in that outlives them.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let rc = libc::connect(
                fd,
                std::ptr::from_ref(&addr).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            if rc != 0 {
                let e = std::io::Error::last_os_error().raw_os_error();
                errors += u64::from(!matches!(e, Some(libc::EINPROGRESS | libc::ECONNREFUSED)));
            }
            libc::close(fd);
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / n.max(1) as f64;
    println!("{}", json!({"ns_per_connect": ns, "errors": errors}));
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let run = || -> Result<(), String> {
        let (cmd, addr, arg) = match args.as_slice() {
            [c, a, x] => (c.as_str(), a, x),
            _ => {
                return Err(
                    "usage: sockprobe tcp|udp|udp-sticky|udp-connected|refused|connect-loop ADDR ARG".into(),
                );
            }
        };
        let target: SocketAddrV4 = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
        let number = || arg.parse::<u64>().map_err(|e| format!("{arg}: {e}"));
        match cmd {
            "tcp" => tcp(target, number()? as usize),
            "udp" => udp(target, number()? as usize, false).map_err(|e| e.to_string())?,
            "udp-sticky" => udp(target, number()? as usize, true).map_err(|e| e.to_string())?,
            "udp-connected" => udp_connected(target, number()?).map_err(|e| e.to_string())?,
            "refused" => refused(target, arg).map_err(|e| e.to_string())?,
            "connect-loop" => connect_loop(target, number()?).map_err(|e| e.to_string())?,
            other => return Err(format!("unknown command {other}")),
        }
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sockprobe: {e}");
            ExitCode::FAILURE
        }
    }
}
