//! Real S3 servers for tests and benchmarks, on loopback with random ports and a temp
//! dir, started once per process and killed when the process exits: a single-node Garage
//! (the default) or moto's S3 server, which behaves like AWS where Garage is looser
//! (`If-None-Match`, the 5 MiB part minimum). `CACHER_TEST_SERVER=moto` runs the suite
//! against moto; tests of what only Garage offers (credential checks) use [`garage`],
//! and those that kill and restart a server start a [`Node`] of their own.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Which S3 server implementation a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Garage,
    Moto,
}

/// Connection facts of a running node.
#[derive(Debug, Clone)]
pub struct Server {
    /// The implementation, for tests whose expectations differ by server.
    pub kind: Kind,
    /// `http://127.0.0.1:<port>` of the S3 API.
    pub endpoint: String,
    /// Signing region.
    pub region: String,
    /// The bucket created at start-up.
    pub bucket: String,
    /// Access key id.
    pub key_id: String,
    /// Secret key.
    pub secret: String,
    /// Directory holding the node's config, data and log.
    pub dir: PathBuf,
}

impl Server {
    /// Whether a conditional write (`If-None-Match: *`) onto an existing key gets 412
    /// (Garage ignores the header: the last complete write wins).
    pub fn honours_if_none_match(&self) -> bool {
        self.kind == Kind::Moto
    }

    /// Whether aws-sdk-s3 can read the server's ListParts reply (moto 5.2.5 names its
    /// root element `ListPartsResponse`, not `ListPartsResult`).
    pub fn lists_parts(&self) -> bool {
        self.kind == Kind::Garage
    }

    fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }
}

static GARAGE: OnceLock<Server> = OnceLock::new();
static MOTO: OnceLock<Server> = OnceLock::new();

/// The process-wide Garage node, started on first use, living as long as the process.
pub fn garage() -> &'static Server {
    shared(&GARAGE, Kind::Garage)
}

/// The server the suite runs against: `CACHER_TEST_SERVER=moto` selects moto, anything
/// else (or nothing) Garage.
pub fn server() -> &'static Server {
    match std::env::var("CACHER_TEST_SERVER").as_deref() {
        Ok("moto") => shared(&MOTO, Kind::Moto),
        _ => garage(),
    }
}

fn shared(cell: &'static OnceLock<Server>, kind: Kind) -> &'static Server {
    cell.get_or_init(|| {
        let node = Node::start(kind, "shared");
        let server = node.server.clone();
        // Never stopped: it dies with the test process.
        std::mem::forget(node);
        server
    })
}

/// A loopback port free now, for a server to bind a moment later. Drawn below Linux's
/// ephemeral range (32768 and up): a port the kernel hands out itself could meanwhile
/// become the source port of some outgoing connection, and the server would then fail
/// to bind it (seen: Garage's RPC port, with tests connecting in parallel).
fn free_port() -> u16 {
    loop {
        let port = fastrand::u16(20_000..32_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", fastrand::u8(..)))
        .collect()
}

/// Removes data dirs left by earlier test processes that no longer run.
fn remove_stale_dirs(base: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(rest) = name.strip_prefix("cacher-s3-")
            && let Some(pid) = rest.split('-').next()
            && !PathBuf::from(format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// What the node's keeper thread is asked to do.
enum Order {
    Start,
    Kill,
}

/// A server node owned by a test: it can be killed and started again on the same data
/// and ports (Garage keeps its data; moto starts empty). Dropping it kills the node.
pub struct Node {
    /// Connection facts.
    pub server: Server,
    orders: std::sync::mpsc::Sender<(Order, std::sync::mpsc::Sender<Result<(), String>>)>,
}

impl Node {
    /// Starts a node named `name` (its data dir is unique to this process and name).
    pub fn start(kind: Kind, name: &str) -> Node {
        let base = std::env::temp_dir();
        remove_stale_dirs(&base);
        let dir = base.join(format!("cacher-s3-{}-{kind:?}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create server dir");
        let server = match kind {
            Kind::Garage => garage_config(dir),
            Kind::Moto => Server {
                kind,
                endpoint: format!("http://127.0.0.1:{}", free_port()),
                region: "us-east-1".to_string(),
                bucket: "cacher-test".to_string(),
                // Any pair works; these are only for the secret-leak greps.
                key_id: format!("AKIA{}", random_hex(8)),
                secret: random_hex(20),
                dir,
            },
        };
        let (orders, inbox) = std::sync::mpsc::channel();
        let kept = server.clone();
        // The node must die with its owner, whatever ends it. PR_SET_PDEATHSIG fires
        // when the spawning *thread* exits, so one thread spawns and keeps the process
        // until the Node is dropped.
        std::thread::spawn(move || keep(&kept, inbox));
        let node = Node { server, orders };
        node.order(Order::Start);
        node
    }
}

/// Writes a single-node Garage config into `dir` and returns the node's facts.
fn garage_config(dir: PathBuf) -> Server {
    let (s3_port, rpc_port, admin_port) = (free_port(), free_port(), free_port());
    std::fs::write(
        dir.join("garage.toml"),
        format!(
            r#"metadata_dir = "{dir}/meta"
data_dir = "{dir}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{secret}"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3_port}"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:{admin_port}"
admin_token = "{token}"
"#,
            dir = dir.display(),
            secret = random_hex(32),
            token = random_hex(16),
        ),
    )
    .expect("write garage config");
    Server {
        kind: Kind::Garage,
        endpoint: format!("http://127.0.0.1:{s3_port}"),
        region: "garage".to_string(),
        bucket: "cacher-test".to_string(),
        key_id: format!("GK{}", random_hex(12)),
        secret: random_hex(32),
        dir,
    }
}

impl Node {
    fn order(&self, order: Order) {
        let (done, result) = std::sync::mpsc::channel();
        self.orders.send((order, done)).expect("server keeper");
        if let Err(e) = result.recv().expect("server keeper") {
            let install = match self.server.kind {
                Kind::Garage => {
                    "Install Garage (`cargo install garage --locked`) or set GARAGE_BIN"
                }
                Kind::Moto => "Install moto (`pip install 'moto[server]'`) or set PYTHON",
            };
            panic!(
                "cannot start the {:?} server: {e}. {install}; scripts/test.sh does it",
                self.server.kind
            );
        }
    }

    /// Kills the node with SIGKILL, as a crash would.
    pub fn kill(&self) {
        self.order(Order::Kill);
    }

    /// Starts the node again on the same ports, and waits until it serves.
    pub fn restart(&self) {
        self.order(Order::Start);
    }
}

/// The keeper thread: spawns and kills the node on orders, until the Node is dropped.
fn keep(
    server: &Server,
    inbox: std::sync::mpsc::Receiver<(Order, std::sync::mpsc::Sender<Result<(), String>>)>,
) {
    let mut child: Option<std::process::Child> = None;
    for (order, done) in inbox {
        let result = match order {
            Order::Kill => {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                Ok(())
            }
            Order::Start => spawn_server(server).and_then(|c| {
                child = Some(c);
                wait_ready(server)
            }),
        };
        let _ = done.send(result);
    }
    if let Some(mut c) = child {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn spawn_server(server: &Server) -> Result<std::process::Child, String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(server.log())
        .map_err(|e| e.to_string())?;
    let mut cmd = match server.kind {
        Kind::Garage => {
            let mut cmd = Command::new(std::env::var("GARAGE_BIN").unwrap_or("garage".into()));
            cmd.arg("-c")
                .arg(server.dir.join("garage.toml"))
                .args(["server", "--single-node", "--default-bucket"])
                .env("GARAGE_DEFAULT_ACCESS_KEY", &server.key_id)
                .env("GARAGE_DEFAULT_SECRET_KEY", &server.secret)
                .env("GARAGE_DEFAULT_BUCKET", &server.bucket)
                .env("RUST_LOG", "warn");
            cmd
        }
        Kind::Moto => {
            let port = server.endpoint.rsplit(':').next().unwrap_or_default();
            let mut cmd = Command::new(std::env::var("PYTHON").unwrap_or("python3".into()));
            cmd.args(["-m", "moto.server", "-H", "127.0.0.1", "-p", port]);
            cmd
        }
    };
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| e.to_string())
}

/// Sends one unsigned HTTP/1.1 request and returns the status line (moto needs no
/// signature, and its bucket must be created by a request).
fn plain_request(addr: &str, method: &str, path: &str) -> std::io::Result<String> {
    use std::io::{BufRead, Write};
    let mut stream = TcpStream::connect(addr)?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut status = String::new();
    std::io::BufReader::new(stream).read_line(&mut status)?;
    Ok(status.trim_end().to_string())
}

/// Waits until the S3 port answers and the bucket accepts signed requests (creating it
/// first on moto, whose `--default-bucket` counterpart does not exist).
fn wait_ready(server: &Server) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = server.endpoint.trim_start_matches("http://").to_string();
    let log = server.log();
    while TcpStream::connect(&addr).is_err() {
        if Instant::now() > deadline {
            return Err(format!("nothing listens on {addr}; see {}", log.display()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if server.kind == Kind::Moto {
        plain_request(&addr, "PUT", &format!("/{}", server.bucket))
            .map_err(|e| format!("cannot create the bucket: {e}"))?;
    }
    // `exists` exits 1 on a miss only once bucket and key work; 2 while they do not yet.
    loop {
        let status = Command::new(env!("CARGO_BIN_EXE_cacher"))
            .args(["exists", "readiness-probe", "-q"])
            .env_clear()
            .env("HOME", &server.dir)
            .env("CACHER_ENDPOINT", &server.endpoint)
            .env("CACHER_REGION", &server.region)
            .env("CACHER_BUCKET", &server.bucket)
            .env("CACHER_S3_KEY_ID", &server.key_id)
            .env("CACHER_S3_SECRET", &server.secret)
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run cacher: {e}"))?;
        if status.code() == Some(1) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} never accepted requests; see {}",
                server.endpoint,
                log.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
