//! A real single-node Garage for tests and benchmarks, on loopback with random ports and
//! a temp dir, started once per process and killed when the process exits.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Connection facts of the running node.
#[derive(Debug, Clone)]
pub struct Garage {
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
    /// The node's config file, for `garage -c … bucket …` calls.
    pub config_path: PathBuf,
    /// Directory holding the node's data and metadata.
    pub dir: PathBuf,
}

static GARAGE: OnceLock<Garage> = OnceLock::new();

/// The process-wide Garage node, started on first use, living as long as the process.
pub fn garage() -> &'static Garage {
    GARAGE.get_or_init(|| {
        let node = Node::start("shared");
        let garage = node.garage.clone();
        // Never stopped: it dies with the test process.
        std::mem::forget(node);
        garage
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
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
        if let Some(rest) = name.strip_prefix("cacher-garage-")
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

/// A Garage node owned by a test: it can be killed and started again on the same data
/// and ports. Dropping it kills the node.
pub struct Node {
    /// Connection facts.
    pub garage: Garage,
    orders: std::sync::mpsc::Sender<(Order, std::sync::mpsc::Sender<Result<(), String>>)>,
}

impl Node {
    /// Starts a node named `name` (its data dir is unique to this process and name).
    pub fn start(name: &str) -> Node {
        let base = std::env::temp_dir();
        remove_stale_dirs(&base);
        let dir = base.join(format!("cacher-garage-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create garage dir");
        let (s3_port, rpc_port, admin_port) = (free_port(), free_port(), free_port());
        let config_path = dir.join("garage.toml");
        std::fs::write(
            &config_path,
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
        let garage = Garage {
            endpoint: format!("http://127.0.0.1:{s3_port}"),
            region: "garage".to_string(),
            bucket: "cacher-test".to_string(),
            key_id: format!("GK{}", random_hex(12)),
            secret: random_hex(32),
            config_path,
            dir,
        };
        let (orders, inbox) = std::sync::mpsc::channel();
        let kept = garage.clone();
        // The node must die with its owner, whatever ends it. PR_SET_PDEATHSIG fires
        // when the spawning *thread* exits, so one thread spawns and keeps the process
        // until the Node is dropped.
        std::thread::spawn(move || keep(&kept, inbox));
        let node = Node { garage, orders };
        node.order(Order::Start);
        node
    }

    fn order(&self, order: Order) {
        let (done, result) = std::sync::mpsc::channel();
        self.orders.send((order, done)).expect("garage keeper");
        if let Err(e) = result.recv().expect("garage keeper") {
            panic!(
                "cannot start `garage`: {e}. Install Garage (`cargo install garage --locked`) \
                 or set GARAGE_BIN; scripts/test.sh does both"
            );
        }
    }

    /// Kills the node with SIGKILL, as a crash would.
    pub fn kill(&self) {
        self.order(Order::Kill);
    }

    /// Starts the node again on the same data and ports, and waits until it serves.
    pub fn restart(&self) {
        self.order(Order::Start);
    }
}

/// The keeper thread: spawns and kills the node on orders, until the Node is dropped.
fn keep(
    garage: &Garage,
    inbox: std::sync::mpsc::Receiver<(Order, std::sync::mpsc::Sender<Result<(), String>>)>,
) {
    let bin = std::env::var("GARAGE_BIN").unwrap_or_else(|_| "garage".to_string());
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
            Order::Start => spawn_server(&bin, garage).map(|c| {
                child = Some(c);
                wait_ready(garage);
            }),
        };
        let _ = done.send(result);
    }
    if let Some(mut c) = child {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn spawn_server(bin: &str, garage: &Garage) -> Result<std::process::Child, String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(garage.dir.join("garage.log"))
        .map_err(|e| e.to_string())?;
    let mut cmd = Command::new(bin);
    cmd.arg("-c")
        .arg(&garage.config_path)
        .args(["server", "--single-node", "--default-bucket"])
        .env("GARAGE_DEFAULT_ACCESS_KEY", &garage.key_id)
        .env("GARAGE_DEFAULT_SECRET_KEY", &garage.secret)
        .env("GARAGE_DEFAULT_BUCKET", &garage.bucket)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
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

/// Waits until the S3 port answers and the default bucket accepts signed requests.
fn wait_ready(garage: &Garage) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = garage.endpoint.trim_start_matches("http://").to_string();
    while TcpStream::connect(&addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "garage did not open {addr}; see {}",
            garage.dir.join("garage.log").display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // `exists` exits 1 on a miss only once bucket and key work; 2 while they do not yet.
    loop {
        let status = Command::new(env!("CARGO_BIN_EXE_cacher"))
            .args(["exists", "readiness-probe", "-q"])
            .env_clear()
            .env("HOME", &garage.dir)
            .env("CACHER_ENDPOINT", &garage.endpoint)
            .env("CACHER_BUCKET", &garage.bucket)
            .env("CACHER_S3_KEY_ID", &garage.key_id)
            .env("CACHER_S3_SECRET", &garage.secret)
            .stderr(Stdio::null())
            .status()
            .expect("run cacher");
        if status.code() == Some(1) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "garage at {} never accepted requests; see {}",
            garage.endpoint,
            garage.dir.join("garage.log").display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
