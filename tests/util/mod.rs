//! Test harness: a temp home per test, the built `cacher` run with a clean environment
//! against the shared S3 server (Garage, or moto with `CACHER_TEST_SERVER=moto`; each
//! test under its own prefix) or a `file://` store, and a real HTTP server for
//! `download --url`.

pub mod http;
pub mod proxy;
pub mod server;
pub mod tls;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use cacher::store::Store;

pub use server::{garage, server};

/// One test's world: its own HOME, its own prefix, and how to reach the store.
pub struct TestEnv {
    /// Temp dir removed at the end of the test.
    pub dir: tempfile::TempDir,
    /// Environment every command gets (on top of a cleared one).
    pub vars: Vec<(String, String)>,
    /// The prefix this test's keys live under (S3 tests).
    pub prefix: String,
}

/// What a command did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn of(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Panics with the output unless the exit code is `code`.
    #[track_caller]
    pub fn code(&self, code: i32) -> &Run {
        assert_eq!(
            self.code, code,
            "expected exit {code}, got {}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    /// Panics unless the command succeeded.
    #[track_caller]
    pub fn ok(&self) -> &Run {
        self.code(0)
    }

    /// Everything the command printed.
    pub fn all_output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// A name unique within this test process.
pub fn unique(name: &str) -> String {
    format!("{name}-{:08x}", fastrand::u32(..))
}

impl TestEnv {
    /// A test against the shared S3 server the suite runs on, under a fresh prefix.
    pub fn s3(name: &str) -> TestEnv {
        TestEnv::on(server(), name)
    }

    /// A test against `server`, under a fresh prefix.
    pub fn on(g: &server::Server, name: &str) -> TestEnv {
        let prefix = unique(name);
        let mut env = TestEnv::bare();
        env.prefix = prefix.clone();
        env.set("CACHER_ENDPOINT", &g.endpoint);
        env.set("CACHER_REGION", &g.region);
        env.set("CACHER_BUCKET", &g.bucket);
        env.set("CACHER_PREFIX", &prefix);
        env.set("CACHER_S3_KEY_ID", &g.key_id);
        env.set("CACHER_S3_SECRET", &g.secret);
        env
    }

    /// A test against a `file://` store inside the temp dir.
    pub fn file_store() -> TestEnv {
        let mut env = TestEnv::bare();
        let store = env.path("store");
        env.set("CACHER_ENDPOINT", &format!("file://{}", store.display()));
        env
    }

    /// Only HOME and PATH: no store configured.
    pub fn bare() -> TestEnv {
        let dir = tempfile::tempdir().expect("temp dir");
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).expect("home");
        let mut env = TestEnv {
            dir,
            vars: Vec::new(),
            prefix: String::new(),
        };
        env.set("HOME", &home.display().to_string());
        env.set("PATH", &std::env::var("PATH").unwrap_or_default());
        env
    }

    /// Sets (or replaces) an environment variable for every later command.
    pub fn set(&mut self, name: &str, value: &str) {
        self.vars.retain(|(n, _)| n != name);
        self.vars.push((name.to_string(), value.to_string()));
    }

    /// Removes an environment variable.
    pub fn unset(&mut self, name: &str) {
        self.vars.retain(|(n, _)| n != name);
    }

    /// A path inside the test's temp dir.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The HOME of the commands.
    pub fn home(&self) -> PathBuf {
        self.path("home")
    }

    /// Writes a file in the temp dir and returns its path.
    pub fn write(&self, rel: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&p, content).expect("write");
        p
    }

    /// The `cacher` command with this environment only.
    pub fn cmd<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cacher"));
        cmd.args(args).env_clear().current_dir(self.dir.path());
        for (n, v) in &self.vars {
            cmd.env(n, v);
        }
        cmd
    }

    /// Starts every command at once, waits for all and returns what each did; panics
    /// unless all succeed.
    pub fn run_all_at_once(&self, commands: &[Vec<String>]) -> Vec<Run> {
        let children: Vec<_> = commands
            .iter()
            .map(|args| {
                self.cmd(args)
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("spawn cacher")
            })
            .collect();
        children
            .into_iter()
            .map(|child| {
                let run = Run::of(child.wait_with_output().expect("wait for cacher"));
                run.ok();
                run
            })
            .collect()
    }

    /// Runs `cacher` with these arguments.
    pub fn run<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Run::of(self.cmd(args).output().expect("run cacher"))
    }
}

/// The user unprivileged runs switch to (nobody on Debian).
pub const NOBODY: u32 = 65534;

/// Whether this process can run commands as another user (it is root), so tests of
/// what an unprivileged CI user sees can run; says SKIPPED when not.
pub fn can_switch_users(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("SKIPPED {test}: needs root to run cacher as an unprivileged user");
    }
    root
}

impl TestEnv {
    /// Runs `cacher` as user and group [`NOBODY`], with no supplementary groups, from a
    /// copy of the binary nobody can execute. The test's temp dir is opened for
    /// traversal (0755), and HOME handed to nobody.
    pub fn run_unprivileged<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        use std::os::unix::fs::PermissionsExt;
        let bin = self.path("cacher-bin");
        if !bin.exists() {
            std::fs::copy(env!("CARGO_BIN_EXE_cacher"), &bin).expect("copy cacher");
            std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o755))
                .unwrap();
            self.give_to_nobody(&self.home());
        }
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--",
        ])
        .arg(&bin)
        .args(args)
        .env_clear()
        .current_dir(self.dir.path());
        for (n, v) in &self.vars {
            cmd.env(n, v);
        }
        Run::of(cmd.output().expect("run setpriv"))
    }

    /// Makes `path` (and everything below it) owned by [`NOBODY`].
    pub fn give_to_nobody(&self, path: &Path) {
        let status = Command::new("chown")
            .args(["-R", "-h", &format!("{NOBODY}:{NOBODY}")])
            .arg(path)
            .status()
            .expect("chown");
        assert!(status.success(), "chown {}", path.display());
    }
}

/// Reads a whole file.
pub fn read(path: impl AsRef<Path>) -> Vec<u8> {
    std::fs::read(path.as_ref()).unwrap_or_else(|e| panic!("read {}: {e}", path.as_ref().display()))
}

/// Deterministic pseudo-random bytes (not compressible, unlike zeros).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = vec![0u8; len];
    rng.fill(&mut out);
    out
}

/// Runs a shell pipeline and returns its stdout.
pub fn sh(script: &str, cwd: &Path) -> String {
    let out = Command::new("bash")
        .args(["-c", script])
        .current_dir(cwd)
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A store client straight on the test bucket, to check what is really there.
pub fn bucket() -> Arc<dyn Store> {
    bucket_client().0
}

/// The chunk store under `prefix` of the test bucket, to act as a job in the middle of a
/// command would (a restore that has read its manifest).
pub fn chunk_store(prefix: &str) -> cacher::chunk::store::ChunkStore {
    let (store, config) = bucket_client();
    let transfer = cacher::transfer::Transfer::new(store, &config);
    cacher::chunk::store::ChunkStore::new(Arc::new(transfer), prefix)
}

/// Every full key under `prefix` in the test bucket.
pub fn keys_under(prefix: &str) -> Vec<String> {
    let listing = rt().block_on(bucket().list(prefix, None)).expect("list");
    listing.objects.into_iter().map(|o| o.key).collect()
}

/// A client on the test bucket (no prefix) and its configuration.
fn bucket_client() -> (Arc<dyn Store>, cacher::config::Config) {
    let g = server();
    let env = TestEnv::bare();
    let key_file = env.write("key", &g.key_id);
    let secret_file = env.write("secret", &g.secret);
    let args = cacher::cli::GlobalArgs {
        config: Some(env.path("none.toml").display().to_string()),
        endpoint: Some(g.endpoint.clone()),
        region: Some(g.region.clone()),
        bucket: Some(g.bucket.clone()),
        key_file: Some(key_file.display().to_string()),
        secret_file: Some(secret_file.display().to_string()),
        ..Default::default()
    };
    std::fs::write(env.path("none.toml"), "").unwrap();
    let config = cacher::config::Config::resolve(&args).expect("config");
    // Credentials are read from the files now, while the temp dir still exists.
    let store = cacher::store::s3::S3Store::new(&config).expect("store");
    (Arc::new(store), config)
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// Writes `data` under a full key straight into the test bucket, bypassing cacher:
/// crafted and damaged objects.
pub fn put_object(full_key: &str, data: impl AsRef<[u8]>) {
    let body = cacher::store::Body::Bytes(bytes::Bytes::copy_from_slice(data.as_ref()));
    rt().block_on(bucket().put(full_key, body, &Default::default()))
        .unwrap();
}

/// The `stats` object of a `--json` chunked transfer.
pub fn json_stats(stdout: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON record");
    v["stats"].clone()
}

/// The manifest stored under `key` of the test's prefix.
pub fn manifest(env: &TestEnv, key: &str) -> cacher::chunk::format::Manifest {
    let data = stored(&format!("{}/{key}", env.prefix)).expect("manifest stored");
    cacher::chunk::format::Manifest::decode(key, &data).unwrap()
}

/// The bytes stored under a full key, read without cacher's download path.
pub fn stored(full_key: &str) -> Option<Vec<u8>> {
    let store = bucket();
    rt().block_on(async {
        let info = store.head(full_key).await.expect("head")?;
        Some(
            store
                .get_range(full_key, 0..info.size)
                .await
                .expect("get")
                .to_vec(),
        )
    })
}

/// `(total, new, sent)` from the stats line of a chunked upload
/// (`chunks T total / N new / R reused, sent X, ...`).
pub fn upload_stats(stderr: &str) -> (u64, u64, String) {
    let line = stderr
        .lines()
        .find(|l| l.contains("chunks") && l.contains("uploaded"))
        .unwrap_or_else(|| panic!("no stats line in {stderr}"));
    let nums: Vec<u64> = line
        .split("chunks ")
        .nth(1)
        .unwrap()
        .split(' ')
        .filter_map(|w| w.parse().ok())
        .take(2)
        .collect();
    let sent = line
        .split("sent ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap();
    (nums[0], nums[1], sent.to_string())
}

/// Names of cacher's temp files or dirs (`.cacher-*`) left in `dir`.
pub fn temp_leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".cacher-"))
        .collect()
}

/// Everything a user would compare between two trees: per path, the kind, mode, mtime
/// with nanoseconds, size and content hash, or the link target.
pub fn snapshot(root: &Path) -> Vec<(String, String)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
        let entry = entry.unwrap();
        let rel = entry
            .path()
            .strip_prefix(root)
            .unwrap()
            .display()
            .to_string();
        let meta = std::fs::symlink_metadata(entry.path()).unwrap();
        let what = if meta.file_type().is_symlink() {
            format!(
                "link -> {}",
                std::fs::read_link(entry.path()).unwrap().display()
            )
        } else if meta.is_dir() {
            format!(
                "dir {:o} mtime {}.{}",
                meta.mode() & 0o7777,
                meta.mtime(),
                meta.mtime_nsec()
            )
        } else {
            let digest = cacher::chunk::Id::of(&std::fs::read(entry.path()).unwrap()).to_hex();
            format!(
                "file {:o} mtime {}.{} {} bytes {digest}",
                meta.mode() & 0o7777,
                meta.mtime(),
                meta.mtime_nsec(),
                meta.len()
            )
        };
        out.push((rel, what));
    }
    out
}

/// Makes `cmd` run with at most `limit` open files (`ulimit -n`).
pub fn limit_open_files(cmd: &mut Command, limit: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe and touches nothing of the parent's.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
}
