//! A fault-injecting TCP proxy on loopback, between cacher and Garage.
//!
//! Each new connection takes the next planned fault (then plain forwarding once the
//! plan is used up): cut the connection after N bytes of response, answer 503 SlowDown
//! without asking Garage, trickle the response slowly, or accept and never answer. The SDK pools connections, so a
//! fault hits whichever request opens the next connection.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// What the proxy does to one connection.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Forward, but cut both directions after this many response bytes.
    CutAfter(usize),
    /// Reply `503 SlowDown` and close, without contacting the server.
    SlowDown,
    /// Accept and never answer.
    Stall,
    /// Forward the response in 4 KiB pieces with this many milliseconds between them.
    Trickle(u64),
    /// Forward this many response bytes, then nothing more, the connection left open
    /// until the client closes it.
    StallAfter(usize),
    /// Forward as is (to let a connection through ahead of a fault).
    Pass,
    /// Forward, but as a server that ignores `If-Match` and sends another version
    /// would: each response's ETag and its first body byte altered.
    OtherVersion,
}

/// The running proxy; it lives until the test process ends.
pub struct Proxy {
    /// `http://127.0.0.1:<port>`, to use as the endpoint.
    pub endpoint: String,
    plan: Arc<Mutex<VecDeque<Fault>>>,
    /// Faults injected so far.
    injected: Arc<AtomicUsize>,
    stall_all: Arc<Mutex<bool>>,
}

impl Proxy {
    /// Starts forwarding to `upstream` (`http://host:port`).
    pub fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let upstream = upstream.trim_start_matches("http://").to_string();
        let plan: Arc<Mutex<VecDeque<Fault>>> = Arc::default();
        let injected = Arc::new(AtomicUsize::new(0));
        let stall_all = Arc::new(Mutex::new(false));
        let (p, i, s) = (plan.clone(), injected.clone(), stall_all.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let fault = if *s.lock().unwrap() {
                    Some(Fault::Stall)
                } else {
                    p.lock().unwrap().pop_front()
                };
                if fault.is_some() {
                    i.fetch_add(1, Ordering::SeqCst);
                }
                let upstream = upstream.clone();
                std::thread::spawn(move || serve(client, &upstream, fault));
            }
        });
        Proxy {
            endpoint,
            plan,
            injected,
            stall_all,
        }
    }

    /// Queues faults for the next connections.
    pub fn plan(&self, faults: &[Fault]) {
        self.plan.lock().unwrap().extend(faults.iter().copied());
    }

    /// Makes every new connection stall (a server that hangs).
    pub fn stall_everything(&self) {
        *self.stall_all.lock().unwrap() = true;
    }

    /// How many faults were injected.
    pub fn injected(&self) -> usize {
        self.injected.load(Ordering::SeqCst)
    }

    /// How many planned faults are still waiting for a connection.
    pub fn pending(&self) -> usize {
        self.plan.lock().unwrap().len()
    }
}

fn serve(mut client: TcpStream, upstream: &str, fault: Option<Fault>) {
    match fault {
        Some(Fault::SlowDown) => {
            let mut head = [0u8; 4096];
            let _ = client.read(&mut head);
            let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
            let reply = format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = client.write_all(reply.as_bytes());
            let _ = client.shutdown(Shutdown::Both);
        }
        Some(Fault::Stall) => {
            // Swallow what arrives and never answer.
            let mut sink = [0u8; 65536];
            while matches!(client.read(&mut sink), Ok(n) if n > 0) {}
        }
        cut => {
            let Ok(server) = TcpStream::connect(upstream) else {
                return;
            };
            let (limit, piece, pause) = match cut {
                Some(Fault::CutAfter(n)) => (n, 65536, 0),
                Some(Fault::Trickle(ms)) => (usize::MAX, 4096, ms),
                Some(Fault::StallAfter(n)) => (n, 65536, 0),
                _ => (usize::MAX, 65536, 0),
            };
            let (mut c_read, mut s_write) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            let up = std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_read, &mut s_write);
                let _ = s_write.shutdown(Shutdown::Write);
            });
            let (mut s_read, mut c_write) = (server, client);
            let mut buf = [0u8; 65536];
            let mut sent = 0usize;
            let mut other = OtherVersion::default();
            loop {
                let n = match s_read.read(&mut buf[..piece]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n.min(limit - sent),
                };
                if matches!(cut, Some(Fault::OtherVersion)) {
                    other.alter(&mut buf[..n]);
                }
                if c_write.write_all(&buf[..n]).is_err() {
                    break;
                }
                sent += n;
                if sent >= limit {
                    break;
                }
                if pause > 0 {
                    std::thread::sleep(std::time::Duration::from_millis(pause));
                }
            }
            if matches!(cut, Some(Fault::StallAfter(_))) {
                // Open and silent until the client gives up and closes its side.
                while !up.is_finished() {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
            let _ = c_write.shutdown(Shutdown::Both);
            let _ = s_read.shutdown(Shutdown::Both);
            let _ = up.join();
        }
    }
}

/// Alters a response stream as another version would look: each ETag's first
/// character, and the first body byte after the headers that hold it (whichever piece
/// of the stream it comes in).
#[derive(Default)]
struct OtherVersion {
    /// An ETag was altered; its headers have not ended yet.
    in_headers: bool,
    /// The last four bytes seen in those headers.
    last: u32,
    /// The next byte is the body's first.
    body_next: bool,
}

impl OtherVersion {
    fn alter(&mut self, piece: &mut [u8]) {
        const ETAG: &[u8] = b"\r\netag: \"";
        let mut i = 0;
        while i < piece.len() {
            if self.body_next {
                piece[i] ^= 1;
                self.body_next = false;
            } else if self.in_headers {
                self.last = (self.last << 8) | u32::from(piece[i]);
                if self.last == u32::from_be_bytes(*b"\r\n\r\n") {
                    (self.in_headers, self.body_next) = (false, true);
                }
            } else {
                let Some(found) = find_ascii_ci(&piece[i..], ETAG) else {
                    return;
                };
                i += found + ETAG.len();
                if i >= piece.len() {
                    return;
                }
                piece[i] = if piece[i] == b'0' { b'1' } else { b'0' };
                (self.in_headers, self.last) = (true, 0);
            }
            i += 1;
        }
    }
}

fn find_ascii_ci(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle))
}
