//! Command-line syntax: one clap struct per subcommand; the `///` comments are the help.
//!
//! Parsing only: values are merged with the environment and the config file in
//! [`crate::config`], and each subcommand's work is in [`crate::commands`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// A mistake in what was asked (a key that cannot be rendered, a malformed value):
/// always an error, even with `--on-error warn`, which softens errors of the cache only.
#[derive(Debug)]
pub struct InputError(pub String);

impl std::fmt::Display for InputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InputError {}

/// An [`InputError`] saying `message`.
pub fn input_error(message: impl Into<String>) -> anyhow::Error {
    InputError(message.into()).into()
}

/// S3-backed CI cache: download, upload, list and invalidate cached build artifacts.
#[derive(Debug, Parser)]
#[command(name = "cacher", version = crate::version::VERSION_LINE)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command accepts; each overrides its `CACHER_*` variable and the config file.
#[derive(Debug, Clone, Default, Args)]
pub struct GlobalArgs {
    /// Config file to use [env: CACHER_CONFIG] [default: ~/.config/cacher/config.toml]
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<String>,
    /// S3 endpoint URL, or file:///dir for a local store [env: CACHER_ENDPOINT]
    #[arg(long, global = true, value_name = "URL")]
    pub endpoint: Option<String>,
    /// S3 signing region [env: CACHER_REGION] [default: garage]
    #[arg(long, global = true)]
    pub region: Option<String>,
    /// Bucket name [env: CACHER_BUCKET]
    #[arg(long, global = true)]
    pub bucket: Option<String>,
    /// Prefix joined in front of every key [env: CACHER_PREFIX]
    #[arg(long, global = true)]
    pub prefix: Option<String>,
    /// Append -<os>-<arch> to every key; `--arch-suffix=false` turns it off [env: CACHER_ARCH_SUFFIX]
    #[arg(
        long,
        global = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_name = "BOOL"
    )]
    pub arch_suffix: Option<bool>,
    /// File holding the S3 access key id [env: CACHER_KEY_FILE]
    #[arg(long, global = true, value_name = "PATH")]
    pub key_file: Option<String>,
    /// File holding the S3 secret key [env: CACHER_SECRET_FILE]
    #[arg(long, global = true, value_name = "PATH")]
    pub secret_file: Option<String>,
    /// PEM file of extra CA certificates to trust for https [env: CACHER_CA_BUNDLE]
    #[arg(long, global = true, value_name = "PATH")]
    pub ca_bundle: Option<String>,
    /// docker CLI to run [env: CACHER_DOCKER_BIN] [default: docker]
    #[arg(long, global = true, value_name = "PATH")]
    pub docker_bin: Option<String>,
    /// Concurrent transfers [env: CACHER_JOBS] [default: 8]
    #[arg(long, short = 'j', global = true)]
    pub jobs: Option<usize>,
    /// Seconds without progress before a request is retried or fails [env: CACHER_TIMEOUT] [default: 60]
    #[arg(long, global = true, value_name = "SECONDS")]
    pub timeout: Option<u64>,
    /// What an error of the cache does to a download or upload: `strict` exits 2, `warn`
    /// warns and goes on as a miss or a skipped upload [env: CACHER_ON_ERROR] [default: strict]
    #[arg(long, global = true, value_name = "MODE")]
    pub on_error: Option<crate::config::OnError>,
    /// ed25519 private key file (see `cacher keygen`): uploads sign what they write [env: CACHER_SIGNING_KEY]
    #[arg(long, global = true, value_name = "PATH")]
    pub signing_key: Option<String>,
    /// Comma-separated public key files whose signatures restores accept [env: CACHER_TRUSTED_KEYS]
    #[arg(long, global = true, value_name = "PATH,...", value_delimiter = ',')]
    pub trusted_keys: Option<Vec<String>>,
    /// Restore only entries signed by a trusted key; others are a miss [env: CACHER_REQUIRE_SIGNATURE] [default: true with --signing-key, else false]
    #[arg(
        long,
        global = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_name = "BOOL"
    )]
    pub require_signature: Option<bool>,
    /// Print results as JSON, one object per line on stdout (see docs/json.md)
    #[arg(long, global = true)]
    pub json: bool,
    /// Print errors only (no summary lines)
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Log every storage request to stderr
    #[arg(long, short, global = true)]
    pub verbose: bool,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print version, git commit and target
    Version,
    /// Write ~/.config/cacher/config.toml from the global flags, then run the smoke test
    Init,
    /// Show where each setting comes from and run the smoke test
    Doctor,
    /// Restore a cached file; on a miss fetch it from --url and seed the cache
    Download(DownloadArgs),
    /// Store a file under a key (skipped when the key exists, unless --force)
    Upload(UploadArgs),
    /// Exit 0 when the key is cached, 1 when it is not
    Exists(KeyArg),
    /// List cached keys, `aws s3 ls` style
    List(ListArgs),
    /// Invalidate a cached key
    Delete(KeyArg),
    /// Print a cache key built from a template and file hashes
    Key(KeyTemplateArgs),
    /// Write a new ed25519 key pair for signed entries: FILE (private) and FILE.pub
    Keygen(KeygenArgs),
    /// Cache directory trees as deduplicated chunks
    #[command(subcommand)]
    Dir(DirCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions {
        /// The shell to complete for
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout
    Man,
    /// Cache docker images as deduplicated chunks
    #[command(subcommand)]
    Docker(DockerCommand),
    /// Condemn packs no entry references; delete those condemned a grace period ago
    Gc(GcArgs),
    /// Delete cache entries (plain files and manifests) not used for a given age
    Prune(PruneArgs),
    /// Entries, logical and stored bytes, dedup ratio and last use under a prefix
    Stats(StatsArgs),
}

/// Arguments of `stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Only entries under this key prefix
    #[arg(id = "stats_prefix", value_name = "PREFIX")]
    pub prefix: Option<String>,
}

/// `cacher docker ...`
#[derive(Debug, Subcommand)]
pub enum DockerCommand {
    /// Store an image (`docker save`, streamed); only chunks the bucket lacks are sent
    Upload(DockerUploadArgs),
    /// Load a cached image into docker and tag it; with --pull, pull and seed on a miss
    Download(DockerDownloadArgs),
    /// Exit 0 when the key is cached, 1 when it is not
    Exists(KeyArg),
}

/// Arguments of `docker upload`.
#[derive(Debug, Args)]
pub struct DockerUploadArgs {
    #[command(flatten)]
    pub key: KeySpec,
    /// Local image reference, e.g. myimage:latest
    pub image: String,
    /// Overwrite the key when it exists (only new chunks are sent)
    #[arg(long)]
    pub force: bool,
}

/// Arguments of `docker download`.
#[derive(Debug, Args)]
pub struct DockerDownloadArgs {
    #[command(flatten)]
    pub key: KeySpec,
    /// Image reference to have locally afterwards, e.g. postgres:16
    pub image: String,
    /// On a miss, `docker pull IMAGE` and seed the cache with it
    #[arg(long)]
    pub pull: bool,
}

/// Arguments of `gc`.
#[derive(Debug, Args)]
pub struct GcArgs {
    /// Condemn unreferenced packs older than this; delete them this long after (e.g. 24h, 30m, 7d, 0s)
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub grace: Duration,
    /// Report what would be deleted without deleting
    #[arg(long)]
    pub dry_run: bool,
}

/// Arguments of `prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Delete entries not uploaded or hit for more than this long (e.g. 7d, 12h)
    #[arg(long, value_parser = parse_duration)]
    pub older_than: Duration,
    /// Only entries under this key prefix
    #[arg(id = "prune_prefix", value_name = "PREFIX")]
    pub prefix: Option<String>,
    /// Report what would be deleted without deleting
    #[arg(long)]
    pub dry_run: bool,
}

/// Parses `90s`, `30m`, `24h`, `7d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 30m, 24h or 7d"))?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use s, m, h or d)")),
    };
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

/// `cacher dir ...`
#[derive(Debug, Subcommand)]
pub enum DirCommand {
    /// Store a directory tree; only chunks the bucket lacks are sent
    Upload(DirUploadArgs),
    /// Restore a directory tree (exit 1 when the key and every fallback miss)
    Download(DirDownloadArgs),
    /// Exit 0 when the key is cached, 1 when it is not
    Exists(KeyArg),
}

/// Arguments of `dir upload`.
#[derive(Debug, Args)]
pub struct DirUploadArgs {
    #[command(flatten)]
    pub key: KeySpec,
    /// Directory to store; several (files too) make one entry, each restored to its place
    #[arg(required = true, value_name = "DIR")]
    pub dirs: Vec<PathBuf>,
    /// Leave out what matches, gitignore-style, relative to each DIR (repeatable:
    /// `incremental`, `registry/src`, `*.o`, `!keep.o`); a restore leaves it alone
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Overwrite the key when it exists (only new chunks are sent)
    #[arg(long)]
    pub force: bool,
}

/// Arguments of `dir download`.
#[derive(Debug, Args)]
pub struct DirDownloadArgs {
    #[command(flatten)]
    pub key: KeySpec,
    /// Directory to restore into (created, or merged into when it exists); an entry of
    /// several paths takes as many, in the order of its upload
    #[arg(required = true, value_name = "DIR")]
    pub dirs: Vec<PathBuf>,
    /// On a miss, restore the newest entry under this key prefix made from the same
    /// directory (repeatable, tried in order)
    #[arg(long, value_name = "PREFIX")]
    pub fallback: Vec<String>,
    /// Let --fallback restore entries made from another directory, or that do not say
    #[arg(long)]
    pub fallback_any_path: bool,
    /// Also remove the top-level entries of DIR that the entry lacks (DIR mirrors it)
    #[arg(long)]
    pub delete: bool,
}

/// A single key.
#[derive(Debug, Args)]
pub struct KeyArg {
    #[command(flatten)]
    pub key: KeySpec,
}

/// A cache key as typed: a template resolved as `cacher key` resolves it.
#[derive(Debug, Clone, Args)]
pub struct KeySpec {
    /// Cache key, relative to the configured prefix; {hash} is replaced by the digest of --hash-from
    pub key: String,
    /// File, directory or quoted pattern ('**/package-lock.json') whose content goes into
    /// the key's digest (repeatable)
    #[arg(long, value_name = "PATH")]
    pub hash_from: Vec<PathBuf>,
    /// Number of hex characters of the digest to keep (1 to 64)
    #[arg(long, default_value_t = 16)]
    pub hash_length: usize,
}

/// Arguments of `download`.
#[derive(Debug, Args)]
pub struct DownloadArgs {
    #[command(flatten)]
    pub key: KeySpec,
    /// Where to write the file
    pub dest: PathBuf,
    /// On a miss, fetch from this URL and upload it to the key
    #[arg(long)]
    pub url: Option<String>,
    /// Expected sha256 (hex) of the content; a mismatch fails and nothing is written
    #[arg(long, value_name = "HEX")]
    pub sha256: Option<String>,
}

/// Arguments of `upload`.
#[derive(Debug, Args)]
pub struct UploadArgs {
    #[command(flatten)]
    pub key: KeySpec,
    /// File to upload
    pub path: PathBuf,
    /// Overwrite the key when it exists
    #[arg(long)]
    pub force: bool,
}

/// Arguments of `list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only keys starting with this prefix
    #[arg(id = "list_prefix", value_name = "PREFIX")]
    pub prefix: Option<String>,
    /// List every key below the prefix instead of one level
    #[arg(long, short)]
    pub recursive: bool,
    /// Ignore the configured prefix and list from the bucket root
    #[arg(long)]
    pub root: bool,
    /// Also list cacher's own objects under `.cacher/` (packs, index, markers), which
    /// are hidden unless PREFIX is inside them
    #[arg(long, short)]
    pub all: bool,
}

/// Arguments of `cacher keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where to write the private key (mode 0600); the public key goes to FILE.pub
    pub file: std::path::PathBuf,
}

/// Arguments of `key`.
#[derive(Debug, Args)]
pub struct KeyTemplateArgs {
    /// Key template; {hash} is replaced by the digest of --hash-from
    pub template: String,
    /// File, directory or quoted pattern ('**/package-lock.json') whose content goes into
    /// the digest (repeatable)
    #[arg(long, value_name = "PATH")]
    pub hash_from: Vec<PathBuf>,
    /// Number of hex characters of the digest to keep (1 to 64)
    #[arg(long, default_value_t = 16)]
    pub hash_length: usize,
}
