//! The resolved configuration: flags, `CACHER_*` environment variables, the config file
//! and built-in defaults, merged once with that precedence.
//!
//! Every value remembers where it came from so `cacher doctor` can say why a setting
//! has the value it has. Commands receive a `&Config` and never look at the
//! environment themselves.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::cli::GlobalArgs;

/// Default S3 region: the one a stock Garage node signs with.
pub const DEFAULT_REGION: &str = "garage";
/// Default number of concurrent transfers.
pub const DEFAULT_JOBS: usize = 8;
/// Default size above which plain files go up in multipart and down in ranges.
pub const DEFAULT_MULTIPART_THRESHOLD: u64 = 64 * 1024 * 1024;
/// Default seconds without progress before a request is abandoned.
pub const DEFAULT_TIMEOUT_SECS: u64 = 60;
/// Default multipart part size (and ranged-GET size).
pub const DEFAULT_PART_SIZE: u64 = 8 * 1024 * 1024;

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A command-line flag.
    Flag,
    /// An environment variable, named.
    Env(&'static str),
    /// The config file.
    File,
    /// The built-in default.
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag => f.write_str("flag"),
            Source::Env(name) => write!(f, "env {name}"),
            Source::File => f.write_str("config file"),
            Source::Default => f.write_str("default"),
        }
    }
}

/// A value together with its source.
#[derive(Debug, Clone)]
pub struct Setting<T> {
    /// The value in force.
    pub value: T,
    /// Where it came from.
    pub source: Source,
}

/// The config file's contents; every field is optional and unknown fields are errors.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch_suffix: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_bin: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jobs: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multipart_threshold: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub part_size: Option<u64>,
}

/// The configuration every command runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The config file that was read or would be written, and whether it exists.
    pub path: PathBuf,
    /// Whether `path` existed and was read.
    pub file_read: bool,
    /// `http(s)://host:port` of the S3 API, or `file:///dir` for a local store.
    pub endpoint: Setting<String>,
    /// Signing region.
    pub region: Setting<String>,
    /// Bucket name (ignored by `file://` stores).
    pub bucket: Setting<String>,
    /// Joined in front of every key, normalised without leading or trailing `/`.
    pub prefix: Setting<String>,
    /// Whether keys get `-<os>-<arch>`.
    pub arch_suffix: Setting<bool>,
    /// File holding the access key id.
    pub key_file: Setting<Option<PathBuf>>,
    /// File holding the secret key.
    pub secret_file: Setting<Option<PathBuf>>,
    /// PEM file of extra CA certificates trusted for https endpoints and `--url`, on top
    /// of the bundled webpki roots (for a server with a private CA).
    pub ca_bundle: Setting<Option<PathBuf>>,
    /// The docker CLI to run.
    pub docker_bin: Setting<String>,
    /// Concurrent transfers.
    pub jobs: Setting<usize>,
    /// Seconds without progress before a request is abandoned (and retried).
    pub timeout: Setting<u64>,
    /// Plain files above this size use multipart upload and ranged download.
    pub multipart_threshold: Setting<u64>,
    /// Multipart part size and ranged-GET size.
    pub part_size: Setting<u64>,
}

/// A secret string that never prints itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for handing to the signer only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(** {} chars **)", self.0.chars().count())
    }
}

/// Resolved S3 credentials and where each came from.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// Access key id.
    pub key_id: Secret,
    /// Secret access key.
    pub secret: Secret,
    /// Where the key id came from (env var name or file path).
    pub key_id_source: String,
    /// Where the secret came from.
    pub secret_source: String,
}

impl Config {
    /// Merges flags, environment and the config file into one configuration.
    pub fn resolve(args: &GlobalArgs) -> anyhow::Result<Config> {
        let (path, explicit) = match (&args.config, env("CACHER_CONFIG")) {
            (Some(p), _) => (expand_tilde(p), true),
            (None, Some(p)) => (expand_tilde(&p), true),
            (None, None) => (default_config_path()?, false),
        };
        let (file, file_read) = match std::fs::read_to_string(&path) {
            Ok(text) => (parse_config_file(&path, &text)?, true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                (ConfigFile::default(), false)
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot read config file {}", path.display()));
            }
        };

        let endpoint = pick(
            args.endpoint.clone(),
            "CACHER_ENDPOINT",
            file.endpoint.clone(),
            default_endpoint,
        );
        let region = pick(
            args.region.clone(),
            "CACHER_REGION",
            file.region.clone(),
            || DEFAULT_REGION.to_string(),
        );
        let bucket = pick(
            args.bucket.clone(),
            "CACHER_BUCKET",
            file.bucket.clone(),
            String::new,
        );
        let mut prefix = pick(
            args.prefix.clone(),
            "CACHER_PREFIX",
            file.prefix.clone(),
            String::new,
        );
        prefix.value = prefix.value.trim_matches('/').to_string();
        let arch_suffix = pick_parsed(
            args.arch_suffix.then_some(true),
            "CACHER_ARCH_SUFFIX",
            file.arch_suffix,
            parse_bool,
            || false,
        )?;
        let key_file = pick(
            args.key_file.clone().map(Some),
            "CACHER_KEY_FILE",
            file.key_file.clone().map(Some),
            || None,
        );
        let secret_file = pick(
            args.secret_file.clone().map(Some),
            "CACHER_SECRET_FILE",
            file.secret_file.clone().map(Some),
            || None,
        );
        let ca_bundle = pick(
            args.ca_bundle.clone().map(Some),
            "CACHER_CA_BUNDLE",
            file.ca_bundle.clone().map(Some),
            || None,
        );
        let docker_bin = pick(
            args.docker_bin.clone(),
            "CACHER_DOCKER_BIN",
            file.docker_bin.clone(),
            || "docker".to_string(),
        );
        let jobs = pick_parsed(args.jobs, "CACHER_JOBS", file.jobs, parse_jobs, || {
            DEFAULT_JOBS
        })?;
        let timeout = pick_parsed(
            args.timeout,
            "CACHER_TIMEOUT",
            file.timeout,
            parse_u64,
            || DEFAULT_TIMEOUT_SECS,
        )?;
        if timeout.value == 0 {
            bail!("timeout must be at least 1 second");
        }
        let multipart_threshold = pick_parsed(
            None,
            "CACHER_MULTIPART_THRESHOLD",
            file.multipart_threshold,
            parse_u64,
            || DEFAULT_MULTIPART_THRESHOLD,
        )?;
        let part_size = pick_parsed(None, "CACHER_PART_SIZE", file.part_size, parse_u64, || {
            DEFAULT_PART_SIZE
        })?;
        if !(5 * 1024 * 1024..=5 * 1024 * 1024 * 1024).contains(&part_size.value) {
            bail!(
                "part_size {} is outside S3's limits (5 MiB to 5 GiB)",
                part_size.value
            );
        }
        if jobs.value == 0 {
            bail!("jobs must be at least 1");
        }

        let to_path = |s: Setting<Option<String>>| Setting {
            value: s.value.as_deref().map(expand_tilde),
            source: s.source,
        };
        Ok(Config {
            path,
            file_read,
            endpoint,
            region,
            bucket,
            prefix,
            arch_suffix,
            key_file: to_path(key_file),
            secret_file: to_path(secret_file),
            ca_bundle: to_path(ca_bundle),
            docker_bin,
            jobs,
            timeout,
            multipart_threshold,
            part_size,
        })
    }

    /// Whether the store is a local directory rather than S3.
    pub fn is_file_store(&self) -> bool {
        self.endpoint.value.starts_with("file://")
    }

    /// The settings as they would be written to a config file by `cacher init`.
    pub fn to_file(&self) -> ConfigFile {
        let path_str = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        ConfigFile {
            endpoint: Some(self.endpoint.value.clone()),
            region: Some(self.region.value.clone()),
            bucket: Some(self.bucket.value.clone()).filter(|b| !b.is_empty()),
            prefix: Some(self.prefix.value.clone()).filter(|p| !p.is_empty()),
            arch_suffix: Some(self.arch_suffix.value),
            key_file: path_str(&self.key_file.value),
            secret_file: path_str(&self.secret_file.value),
            ca_bundle: path_str(&self.ca_bundle.value),
            docker_bin: (self.docker_bin.source != Source::Default)
                .then(|| self.docker_bin.value.clone()),
            jobs: (self.jobs.source != Source::Default).then_some(self.jobs.value),
            timeout: (self.timeout.source != Source::Default).then_some(self.timeout.value),
            multipart_threshold: (self.multipart_threshold.source != Source::Default)
                .then_some(self.multipart_threshold.value),
            part_size: (self.part_size.source != Source::Default).then_some(self.part_size.value),
        }
    }

    /// The PEM certificates of `ca_bundle`, if one is set; an unreadable file or one
    /// without a certificate is an error naming it.
    pub fn ca_certificates(&self) -> anyhow::Result<Option<Vec<u8>>> {
        let Some(path) = &self.ca_bundle.value else {
            return Ok(None);
        };
        let pem = std::fs::read(path)
            .with_context(|| format!("cannot read ca_bundle {}", path.display()))?;
        if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
            bail!("ca_bundle {} holds no PEM certificate", path.display());
        }
        Ok(Some(pem))
    }

    /// Resolves the S3 credentials: env vars first, then the key and secret files.
    pub fn credentials(&self) -> anyhow::Result<Credentials> {
        let (key_id, key_id_source) =
            read_credential("CACHER_S3_KEY_ID", &self.key_file, "key id", "--key-file")?;
        let (secret, secret_source) = read_credential(
            "CACHER_S3_SECRET",
            &self.secret_file,
            "secret",
            "--secret-file",
        )?;
        Ok(Credentials {
            key_id: Secret(key_id),
            secret: Secret(secret),
            key_id_source,
            secret_source,
        })
    }
}

/// Parses a config file, naming the file in the error.
pub fn parse_config_file(path: &Path, text: &str) -> anyhow::Result<ConfigFile> {
    toml::from_str(text).map_err(|e| {
        let msg = e.message().to_string();
        // For unknown fields toml's span covers the whole table; find the key instead.
        let line = unknown_field_line(&msg, text).or_else(|| {
            e.span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1))
        });
        match line {
            Some(line) => anyhow::anyhow!("config file {} line {line}: {msg}", path.display()),
            None => anyhow::anyhow!("config file {}: {msg}", path.display()),
        }
    })
}

/// The 1-based line defining the field an "unknown field `x`" message names.
fn unknown_field_line(msg: &str, text: &str) -> Option<usize> {
    let field = msg.strip_prefix("unknown field `")?.split('`').next()?;
    text.lines()
        .position(|line| {
            line.trim_start()
                .strip_prefix(field)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

/// `~/.config/cacher/config.toml`, the same path on every OS.
pub fn default_config_path() -> anyhow::Result<PathBuf> {
    Ok(home_dir()?.join(".config/cacher/config.toml"))
}

fn default_endpoint() -> String {
    // A local store lets a first try work without any server; `doctor` says so.
    let dir = match env("XDG_CACHE_HOME") {
        Some(d) => PathBuf::from(d).join("cacher"),
        None => home_dir()
            .map(|h| h.join(".cache/cacher"))
            .unwrap_or_else(|_| PathBuf::from(".cacher")),
    };
    format!("file://{}", dir.display())
}

fn home_dir() -> anyhow::Result<PathBuf> {
    match env("HOME") {
        Some(h) => Ok(PathBuf::from(h)),
        None => bail!("HOME is not set: cannot locate ~/.config/cacher/config.toml"),
    }
}

/// Expands a leading `~/` to the home directory.
pub fn expand_tilde(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), home_dir()) {
        (Some(rest), Ok(home)) => home.join(rest),
        _ if p == "~" => home_dir().unwrap_or_else(|_| PathBuf::from(p)),
        _ => PathBuf::from(p),
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The first of flag, environment variable and file value that is set, else the
/// default; an environment value goes through `parse`.
fn pick_parsed<T>(
    flag: Option<T>,
    var: &'static str,
    file: Option<T>,
    parse: impl FnOnce(&str) -> Result<T, String>,
    default: impl FnOnce() -> T,
) -> anyhow::Result<Setting<T>> {
    let (value, source) = match (flag, env(var), file) {
        (Some(v), _, _) => (v, Source::Flag),
        (None, Some(raw), _) => (
            parse(&raw).map_err(|e| anyhow::anyhow!("{var}={raw:?}: {e}"))?,
            Source::Env(var),
        ),
        (None, None, Some(v)) => (v, Source::File),
        (None, None, None) => (default(), Source::Default),
    };
    Ok(Setting { value, source })
}

/// [`pick_parsed`] for values taken from the environment as they are.
fn pick<T: From<String>>(
    flag: Option<T>,
    var: &'static str,
    file: Option<T>,
    default: impl FnOnce() -> T,
) -> Setting<T> {
    let verbatim = |raw: &str| Ok(T::from(raw.to_string()));
    pick_parsed(flag, var, file, verbatim, default).expect("taking a string as it is cannot fail")
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

fn parse_u64(s: &str) -> Result<u64, String> {
    s.parse().map_err(|_| "expected a number of bytes".into())
}

fn parse_jobs(s: &str) -> Result<usize, String> {
    s.parse().map_err(|_| "expected a number of jobs".into())
}

fn read_credential(
    var: &'static str,
    file: &Setting<Option<PathBuf>>,
    what: &str,
    flag: &str,
) -> anyhow::Result<(String, String)> {
    if let Ok(value) = std::env::var(var)
        && !value.is_empty()
    {
        return Ok((value, format!("env {var}")));
    }
    let Some(path) = &file.value else {
        bail!("no S3 {what}: set {var} or pass {flag} (or record it with `cacher init`)");
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the S3 {what} file {}", path.display()))?;
    // doctor and the store both read the credentials: warn once.
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if var == "CACHER_S3_SECRET"
        && let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
        && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        crate::ui::warn(format!(
            "the secret file {} can be read by other users (mode {:o}); chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        ));
    }
    let value = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text)
        .to_string();
    if value.is_empty() {
        bail!("the S3 {what} file {} is empty", path.display());
    }
    Ok((value, format!("file {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_debug_never_shows_the_value() {
        let s = Secret("hunter2-very-secret".into());
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("19 chars"), "{shown}");
    }

    #[test]
    fn config_file_errors_name_field_and_line() {
        let err = parse_config_file(Path::new("c.toml"), "bucket = \"b\"\nbogus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("bogus"), "{err}");
        let err = parse_config_file(Path::new("c.toml"), "arch_suffix = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1"), "{err}");
    }
}
