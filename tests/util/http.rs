//! A real HTTP/1.1 server on loopback serving fixed bodies, counting requests per path.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

/// How the server answers one path.
#[derive(Clone)]
pub enum Reply {
    /// 200 with this body.
    Body(Vec<u8>),
    /// This status and a short body.
    Status(u16),
    /// Announces `len` bytes but sends only `body`, then closes.
    Truncated { body: Vec<u8>, len: usize },
    /// 200 with this body, sent 1 KiB at a time with a pause between pieces.
    Slow { body: Vec<u8>, pause_ms: u64 },
    /// Announces `len` bytes, sends `body`, then holds the connection open silently.
    Stall { body: Vec<u8>, len: usize },
}

/// The server; it stops when the test process ends.
pub struct HttpServer {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    hits: Arc<Mutex<HashMap<String, usize>>>,
}

impl HttpServer {
    /// Starts serving `routes` (path → reply); unknown paths get 404.
    pub fn start(routes: Vec<(&str, Reply)>) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind http");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let routes: HashMap<String, Reply> = routes
            .into_iter()
            .map(|(p, r)| (p.to_string(), r))
            .collect();
        let hits = Arc::new(Mutex::new(HashMap::new()));
        let counter = hits.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                let path = request_line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("/")
                    .to_string();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                }
                *counter.lock().unwrap().entry(path.clone()).or_insert(0) += 1;
                let (status, body, len) = match routes.get(&path) {
                    Some(Reply::Slow { body, pause_ms }) => {
                        let head = format!(
                            "HTTP/1.1 200 X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = stream.write_all(head.as_bytes());
                        for piece in body.chunks(1024) {
                            if stream.write_all(piece).is_err() {
                                break;
                            }
                            std::thread::sleep(std::time::Duration::from_millis(*pause_ms));
                        }
                        continue;
                    }
                    Some(Reply::Stall { body, len }) => {
                        let head = format!("HTTP/1.1 200 X\r\nContent-Length: {len}\r\n\r\n");
                        let _ = stream.write_all(head.as_bytes());
                        let _ = stream.write_all(body);
                        // Held open on a thread of its own, so later requests are served.
                        std::thread::spawn(move || {
                            std::thread::sleep(std::time::Duration::from_secs(300));
                            drop(stream);
                        });
                        continue;
                    }
                    Some(Reply::Body(b)) => (200, b.clone(), b.len()),
                    Some(Reply::Status(s)) => (*s, b"nope".to_vec(), 4),
                    Some(Reply::Truncated { body, len }) => (200, body.clone(), *len),
                    None => (404, b"not found".to_vec(), 9),
                };
                let head = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body);
            }
        });
        HttpServer { base, hits }
    }

    /// Full URL of a path.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// How many requests `path` got.
    pub fn hits(&self, path: &str) -> usize {
        *self.hits.lock().unwrap().get(path).unwrap_or(&0)
    }
}
