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
/// Default seconds a request may wait for its response, or a piece of it, before it is
/// abandoned.
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

/// The config file's contents; every field is optional. Unknown fields are warned
/// about (a config written for a newer cacher still works), wrong types are errors.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_error: Option<OnError>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trusted_keys: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub require_signature: Option<bool>,
}

/// What an error of the cache itself (no credentials, server down, a broken entry)
/// does to a download or an upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Exit 2, as the seed does: the job sees the failure.
    Strict,
    /// One warning; a download goes on as a miss, an upload as skipped (actions/cache
    /// and GitLab never fail a job because of the cache).
    Warn,
}

impl fmt::Display for OnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnError::Strict => "strict",
            OnError::Warn => "warn",
        })
    }
}

fn parse_on_error(s: &str) -> Result<OnError, String> {
    <OnError as clap::ValueEnum>::from_str(s, true).map_err(|_| "expected strict or warn".into())
}

/// The configuration every command runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The config file that was read or would be written; `None` without a HOME and
    /// without `--config` (there is no file to read or write then).
    pub path: Option<PathBuf>,
    /// Problems found in the config file that did not stop the command (unknown
    /// fields), each naming the field and the line; `doctor` lists them.
    pub warnings: Vec<String>,
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
    /// Whether errors of the cache fail downloads and uploads or only warn.
    pub on_error: Setting<OnError>,
    /// ed25519 private key (PEM) uploads sign with; see [`crate::sign`].
    pub signing_key: Setting<Option<PathBuf>>,
    /// Public keys (PEM) whose signatures restores accept, besides the signing key's.
    pub trusted_keys: Setting<Vec<PathBuf>>,
    /// Whether restores take only entries signed by a trusted key.
    pub require_signature: Setting<bool>,
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
            (Some(p), _) => (Some(expand_tilde(p)), true),
            (None, Some(p)) => (Some(expand_tilde(&p)), true),
            // Without a HOME there is no default file: flags and CACHER_* say it all.
            (None, None) => (default_config_path().ok(), false),
        };
        let read = match &path {
            Some(path) => std::fs::read_to_string(path),
            None => Err(std::io::ErrorKind::NotFound.into()),
        };
        let (file, warnings, file_read) = match read {
            Ok(text) => {
                let path = path.as_deref().expect("a file was read");
                let (file, warnings) = parse_config_file(path, &text)?;
                for w in &warnings {
                    crate::ui::warn(w);
                }
                (file, warnings, true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                (ConfigFile::default(), Vec::new(), false)
            }
            Err(e) => {
                let path = path.as_deref().unwrap_or(Path::new("?"));
                return Err(e)
                    .with_context(|| format!("cannot read config file {}", path.display()));
            }
        };

        let endpoint = pick(
            args.endpoint.clone(),
            "CACHER_ENDPOINT",
            file.endpoint.clone(),
            // Empty without a HOME: opening the store says what to set.
            || default_store_dir().map_or(String::new(), |d| format!("file://{}", d.display())),
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
            args.arch_suffix,
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
        let on_error = pick_parsed(
            args.on_error,
            "CACHER_ON_ERROR",
            file.on_error,
            parse_on_error,
            || OnError::Strict,
        )?;
        // Empty counts as unset wherever it comes from, as an empty variable does: a
        // secret that a fork's job does not get.
        let signing_key = pick(
            args.signing_key.clone().filter(|p| !p.is_empty()).map(Some),
            "CACHER_SIGNING_KEY",
            file.signing_key.clone().filter(|p| !p.is_empty()).map(Some),
            || None,
        );
        let trusted_keys = pick_parsed(
            args.trusted_keys.clone(),
            "CACHER_TRUSTED_KEYS",
            file.trusted_keys.clone(),
            |raw| Ok(split_list(raw)),
            Vec::new,
        )?;
        // A job that signs is one others trust: by default it restores only signed
        // entries too, or an entry anyone wrote would end up in what it signs next.
        let signs = signing_key.value.is_some();
        let require_signature = pick_parsed(
            args.require_signature,
            "CACHER_REQUIRE_SIGNATURE",
            file.require_signature,
            parse_bool,
            || signs,
        )?;
        // Key material where a path belongs (a secret pasted into the variable) must
        // not be echoed by an error or by `doctor`.
        let material = |v: &str| v.contains("-----BEGIN") || v.contains('\n');
        let pasted = match (&signing_key.value, &trusted_keys.value) {
            (Some(key), _) if material(key) => Some("signing_key"),
            (_, keys) if keys.iter().any(|k| material(k)) => Some("trusted_keys"),
            _ => None,
        };
        if let Some(name) = pasted {
            return Err(crate::cli::InputError(format!(
                "{name} holds key material, not a path: write the key to a file (mode 0600) and give its path"
            ))
            .into());
        }

        let to_path = |s: Setting<Option<String>>| Setting {
            value: s.value.as_deref().map(expand_tilde),
            source: s.source,
        };
        Ok(Config {
            path,
            warnings,
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
            on_error,
            signing_key: to_path(signing_key),
            trusted_keys: Setting {
                value: trusted_keys
                    .value
                    .iter()
                    .filter(|p| !p.trim().is_empty())
                    .map(|p| expand_tilde(p.trim()))
                    .collect(),
                source: trusted_keys.source,
            },
            require_signature,
        })
    }

    /// Whether the store is a local directory rather than S3.
    pub fn is_file_store(&self) -> bool {
        self.endpoint.value.starts_with("file://")
    }

    /// The settings `cacher init` writes: those given as flags, and those already in
    /// the config file; never values taken from `CACHER_*` variables or defaults.
    pub fn to_file(&self) -> ConfigFile {
        fn kept<T: Clone>(s: &Setting<T>) -> Option<T> {
            matches!(s.source, Source::Flag | Source::File).then(|| s.value.clone())
        }
        let path_str =
            |s: &Setting<Option<PathBuf>>| kept(s).flatten().map(|p| p.display().to_string());
        ConfigFile {
            endpoint: kept(&self.endpoint),
            region: kept(&self.region),
            bucket: kept(&self.bucket).filter(|b| !b.is_empty()),
            prefix: kept(&self.prefix).filter(|p| !p.is_empty()),
            arch_suffix: kept(&self.arch_suffix),
            key_file: path_str(&self.key_file),
            secret_file: path_str(&self.secret_file),
            ca_bundle: path_str(&self.ca_bundle),
            docker_bin: kept(&self.docker_bin),
            jobs: kept(&self.jobs),
            timeout: kept(&self.timeout),
            multipart_threshold: kept(&self.multipart_threshold),
            part_size: kept(&self.part_size),
            on_error: kept(&self.on_error),
            signing_key: path_str(&self.signing_key),
            trusted_keys: kept(&self.trusted_keys)
                .filter(|keys| !keys.is_empty())
                .map(|keys| keys.iter().map(|p| p.display().to_string()).collect()),
            require_signature: kept(&self.require_signature),
        }
    }

    /// The S3 settings given without an endpoint (which then defaults to a local
    /// `file://` store), for an error naming them: cacher never silently stores
    /// elsewhere than the bucket the user named.
    pub fn s3_settings_without_endpoint(&self) -> Vec<String> {
        if self.endpoint.source != Source::Default {
            return Vec::new();
        }
        let mut given = Vec::new();
        if !self.bucket.value.is_empty() {
            given.push(format!("bucket ({})", self.bucket.source));
        }
        if self.region.source != Source::Default {
            given.push(format!("region ({})", self.region.source));
        }
        for (name, s) in [
            ("key_file", &self.key_file),
            ("secret_file", &self.secret_file),
        ] {
            if s.value.is_some() {
                given.push(format!("{name} ({})", s.source));
            }
        }
        for var in ["CACHER_S3_KEY_ID", "CACHER_S3_SECRET"] {
            if env(var).is_some() {
                given.push(var.to_string());
            }
        }
        given
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

/// Parses a config file: its settings, and a warning for each unknown field; a wrong
/// type is an error naming the file, the line and the field.
pub fn parse_config_file(path: &Path, text: &str) -> anyhow::Result<(ConfigFile, Vec<String>)> {
    let located = |e: toml::de::Error| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
        let msg = e.message().trim().to_string();
        match line {
            Some(line) => {
                let field = text
                    .lines()
                    .nth(line - 1)
                    .and_then(|l| l.split_once('='))
                    .map(|(key, _)| key.trim().trim_matches('"'))
                    .filter(|key| !key.is_empty());
                match field {
                    Some(field) => anyhow::anyhow!(
                        "config file {} line {line}: `{field}`: {msg}",
                        path.display()
                    ),
                    None => anyhow::anyhow!("config file {} line {line}: {msg}", path.display()),
                }
            }
            None => anyhow::anyhow!("config file {}: {msg}", path.display()),
        }
    };
    let table: toml::Table = toml::from_str(text).map_err(located)?;
    let known =
        serde_json::to_value(ConfigFile::every_field()).expect("the config fields serialize");
    let known = known.as_object().expect("a struct serializes to an object");
    let warnings = table
        .keys()
        .filter(|key| !known.contains_key(key.as_str()))
        .map(|key| {
            let line = field_line(key, text).map_or(String::new(), |l| format!(" line {l}"));
            format!(
                "config file {}{line}: unknown field `{key}` ignored (a setting of another cacher version, or a typo)",
                path.display()
            )
        })
        .collect();
    let file = toml::from_str(text).map_err(located)?;
    Ok((file, warnings))
}

impl ConfigFile {
    /// A value with every field set, to list the field names (unknown-field warnings,
    /// the docs test); a new field does not compile until it is added here.
    pub fn every_field() -> ConfigFile {
        ConfigFile {
            endpoint: Some(String::new()),
            region: Some(String::new()),
            bucket: Some(String::new()),
            prefix: Some(String::new()),
            arch_suffix: Some(false),
            key_file: Some(String::new()),
            secret_file: Some(String::new()),
            ca_bundle: Some(String::new()),
            docker_bin: Some(String::new()),
            jobs: Some(0),
            timeout: Some(0),
            multipart_threshold: Some(0),
            part_size: Some(0),
            on_error: Some(OnError::Strict),
            signing_key: Some(String::new()),
            trusted_keys: Some(Vec::new()),
            require_signature: Some(false),
        }
    }
}

/// The 1-based line defining `field`.
fn field_line(field: &str, text: &str) -> Option<usize> {
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

/// The local store used when no endpoint is set (a first try works without any
/// server; `doctor` says so): `$XDG_CACHE_HOME/cacher`, else `~/.cache/cacher`.
fn default_store_dir() -> Option<PathBuf> {
    match env("XDG_CACHE_HOME") {
        Some(d) => Some(PathBuf::from(d).join("cacher")),
        None => home_dir().ok().map(|h| h.join(".cache/cacher")),
    }
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

/// The items of a comma-separated list, trimmed, empty ones dropped.
fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_string)
        .collect()
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
    fn unknown_fields_are_warnings_and_wrong_types_errors_naming_field_and_line() {
        let (file, warnings) =
            parse_config_file(Path::new("c.toml"), "bucket = \"b\"\nbogus = 1\n").unwrap();
        assert_eq!(file.bucket.as_deref(), Some("b"));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("line 2") && warnings[0].contains("`bogus`"));
        let err = parse_config_file(Path::new("c.toml"), "region = \"r\"\nendpoint = 42\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 2") && err.contains("`endpoint`"),
            "{err}"
        );
        assert!(err.contains("expected a string"), "{err}");
    }
}
