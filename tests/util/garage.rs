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

/// The process-wide Garage node, started on first use.
pub fn garage() -> &'static Garage {
    GARAGE.get_or_init(start)
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
        if let Some(pid) = name.strip_prefix("cacher-garage-")
            && !PathBuf::from(format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn start() -> Garage {
    let bin = std::env::var("GARAGE_BIN").unwrap_or_else(|_| "garage".to_string());
    let base = std::env::temp_dir();
    remove_stale_dirs(&base);
    let dir = base.join(format!("cacher-garage-{}", std::process::id()));
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
        config_path: config_path.clone(),
        dir: dir.clone(),
    };

    // The node must die with this process, whatever ends it. PR_SET_PDEATHSIG fires
    // when the spawning *thread* exits, so spawn from a thread that lives forever.
    let (tx, rx) = std::sync::mpsc::channel();
    let spawn = garage.clone();
    std::thread::spawn(move || {
        let log = std::fs::File::create(spawn.dir.join("garage.log")).expect("garage log");
        let mut cmd = Command::new(&bin);
        cmd.arg("-c")
            .arg(&spawn.config_path)
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_DEFAULT_ACCESS_KEY", &spawn.key_id)
            .env("GARAGE_DEFAULT_SECRET_KEY", &spawn.secret)
            .env("GARAGE_DEFAULT_BUCKET", &spawn.bucket)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("garage log"))
            .stderr(log);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn();
        let _ = tx.send(child.map(|c| c.id()).map_err(|e| e.to_string()));
        loop {
            std::thread::park();
        }
    });
    if let Err(e) = rx.recv().expect("garage spawner") {
        panic!(
            "cannot start `{bin_name}`: {e}. Install Garage (`cargo install garage --locked`) \
             or set GARAGE_BIN; scripts/test.sh does both",
            bin_name = std::env::var("GARAGE_BIN").unwrap_or_else(|_| "garage".into())
        );
    }
    wait_ready(&garage);
    garage
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
