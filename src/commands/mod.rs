//! One module per subcommand; each is a thin layer over the library modules and reads
//! like the README's description of the command.

mod delete;
mod dir;
mod docker;
mod doctor;
mod download;
mod exists;
mod gc;
mod init;
mod key;
mod keygen;
mod list;
mod stats;
mod upload;

use crate::cli::{Cli, Command, DirCommand, DockerCommand, InputError};
use crate::config::{Config, OnError};

/// How a command ended, when it did not fail; mapped to exit codes in `main`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done, or the key exists.
    Success,
    /// The key is not in the cache.
    Miss,
    /// `download` found no cached object and had no `--url` to fall back to.
    DownloadMiss,
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    // Commands that need no configuration.
    match &cli.command {
        Command::Version => {
            let _ = crate::ui::line(crate::version::version_line());
            return Ok(Outcome::Success);
        }
        Command::Completions { shell } => {
            // Rendered to memory first: clap_complete panics on a closed stdout.
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut command, "cacher", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script)?;
            return Ok(Outcome::Success);
        }
        Command::Man => {
            let command = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(command).render(&mut std::io::stdout())?;
            return Ok(Outcome::Success);
        }
        Command::Keygen(args) => return keygen::run(args),
        _ => {}
    }
    // A config that cannot be read is a mistake to fix, not an error of the cache.
    let config = Config::resolve(&cli.global)?;
    let result = run_command(&config, &cli.command).await;
    match result {
        Err(e) if config.on_error.value == OnError::Warn => soften(&cli.command, e),
        result => result,
    }
}

/// With `--on-error warn`, how a command that failed because of the cache goes on:
/// a download as a miss, an upload as skipped, after one warning. Mistakes in what
/// was asked ([`InputError`]) and commands with no such reading stay errors.
fn soften(command: &Command, e: anyhow::Error) -> anyhow::Result<Outcome> {
    // A job being stopped is not a cache error: its child processes fail first.
    if e.chain().any(|c| c.is::<InputError>()) || crate::ui::cancelled() {
        return Err(e);
    }
    let (outcome, result, name) = match command {
        // With --url the command itself goes on to the URL (see `download`); what fails
        // there is the URL's, not the cache's.
        Command::Download(args) if args.url.is_none() => {
            (Outcome::DownloadMiss, "miss", "download")
        }
        Command::Exists(_) => (Outcome::Miss, "miss", "exists"),
        Command::Dir(DirCommand::Download(_)) => (Outcome::Miss, "miss", "dir download"),
        Command::Dir(DirCommand::Exists(_)) => (Outcome::Miss, "miss", "dir exists"),
        // With --pull, as with --url: the command goes on to the registry itself.
        Command::Docker(DockerCommand::Download(args)) if !args.pull => {
            (Outcome::Miss, "miss", "docker download")
        }
        Command::Docker(DockerCommand::Exists(_)) => (Outcome::Miss, "miss", "docker exists"),
        Command::Upload(_) => (Outcome::Success, "skipped", "upload"),
        Command::Dir(DirCommand::Upload(_)) => (Outcome::Success, "skipped", "dir upload"),
        Command::Docker(DockerCommand::Upload(_)) => (Outcome::Success, "skipped", "docker upload"),
        _ => return Err(e),
    };
    warn_soft(&e, result);
    if crate::ui::json_enabled() {
        crate::ui::json(serde_json::json!({
            "command": name, "result": result, "error": crate::ui::one_line(&e),
        }));
    }
    Ok(outcome)
}

/// The one warning `--on-error warn` gives for `e`.
pub(crate) fn warn_soft(e: &anyhow::Error, result: &str) {
    let going_on = match result {
        "skipped" => "not uploaded",
        _ => "treated as a miss",
    };
    crate::ui::warn(format!(
        "{}; {going_on} (--on-error warn)",
        crate::ui::one_line(e)
    ));
}

async fn run_command(config: &Config, command: &Command) -> anyhow::Result<Outcome> {
    match command {
        Command::Version | Command::Completions { .. } | Command::Man | Command::Keygen(_) => {
            unreachable!("handled above")
        }
        Command::Init => init::run(config).await,
        Command::Doctor => doctor::run(config).await,
        Command::Download(args) => download::run(config, args).await,
        Command::Upload(args) => upload::run(config, args).await,
        Command::Exists(args) => exists::run(config, &args.key).await,
        Command::List(args) => list::run(config, args).await,
        Command::Delete(args) => delete::run(config, &args.key).await,
        Command::Key(args) => key::run(config, args),
        Command::Dir(cmd) => dir::run(config, cmd).await,
        Command::Docker(cmd) => docker::run(config, cmd).await,
        Command::Gc(args) => gc::run_gc(config, args).await,
        Command::Prune(args) => gc::run_prune(config, args).await,
        Command::Stats(args) => stats::run(config, args).await,
    }
}

/// What an upload (or a download's seed) does with its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteMode {
    /// Nothing: the key is cached (said on stderr, and on stdout with `--json`).
    Skip,
    /// Create it; a concurrent writer that creates it first wins.
    Create,
    /// Replace what is there (`--force`, an entry not trusted when this job signs, one
    /// that cannot be used).
    Replace,
}

/// How a job may write over an entry it could not use (refused, broken, stale): it
/// replaces it, unless it checks signatures but cannot sign, as a pull-request job
/// holding only the public key (it must not overwrite main's entries).
pub(crate) fn replace_mode(trust: &crate::sign::Trust) -> WriteMode {
    match trust.checks() && !trust.can_sign() {
        true => WriteMode::Skip,
        false => WriteMode::Replace,
    }
}

/// Whether an upload to `key` writes it: not when the key exists and `force` is off,
/// unless this job signs and its trust refuses the entry there.
async fn write_mode(
    transfer: &crate::transfer::Transfer,
    key: &str,
    force: bool,
    command: &str,
) -> anyhow::Result<WriteMode> {
    if force {
        return Ok(WriteMode::Replace);
    }
    let Some(info) = transfer.store().head(key).await? else {
        return Ok(WriteMode::Create);
    };
    if let Err(refused) = transfer.trust().check(&info)
        && transfer.trust().can_sign()
    {
        say_replacing(&refused.into());
        return Ok(WriteMode::Replace);
    }
    say_skipped(key, command);
    Ok(WriteMode::Skip)
}

/// Whether a download that missed seeds `key` with what it fetched elsewhere, as
/// `seed` says; says so when it does not.
fn may_seed(seed: WriteMode, key: &str) -> bool {
    if seed == WriteMode::Skip {
        crate::ui::status(format!(
            "{key} holds an entry this job could not use; not replaced (no signing_key)"
        ));
    }
    seed != WriteMode::Skip
}

/// Says that an upload replaces the entry refused with `e`, which it signs.
fn say_replacing(e: &anyhow::Error) {
    crate::ui::status(format!(
        "{}; replacing it with a signed entry",
        untrusted_reason(e)
    ));
}

/// The one line saying why an entry is not trusted: the [`crate::sign::Untrusted`] in
/// `e`'s chain (which names the key), else `e` itself.
fn untrusted_reason(e: &anyhow::Error) -> String {
    e.chain()
        .find_map(|c| c.downcast_ref::<crate::sign::Untrusted>())
        .map_or_else(|| crate::ui::one_line(e), ToString::to_string)
}

/// Says that an upload to `key` was skipped because another job created the key
/// while it ran.
fn say_concurrent(key: &str, command: &str) {
    crate::ui::status(format!("{key} was written by a concurrent upload; skipped"));
    if crate::ui::json_enabled() {
        crate::ui::json(serde_json::json!({ "command": command, "key": key, "result": "skipped" }));
    }
}

/// Says that an upload to `key` was skipped because the key is cached.
fn say_skipped(key: &str, command: &str) {
    crate::ui::status(format!(
        "{key} already cached; skipped (use --force to overwrite)"
    ));
    if crate::ui::json_enabled() {
        crate::ui::json(serde_json::json!({ "command": command, "key": key, "result": "skipped" }));
    }
}

/// Turns an error saying the entry itself is broken, or not trusted, into a miss,
/// with one warning: the job goes on without the cache, and the next upload (a signed
/// one, for an entry not trusted) replaces the entry.
pub(crate) fn heal<T>(key: &str, result: anyhow::Result<T>) -> anyhow::Result<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(e) if crate::sign::is_untrusted(&e) => {
            crate::ui::warn(format!("{}; treating it as a miss", untrusted_reason(&e)));
            Ok(None)
        }
        Err(e) if crate::chunk::store::is_broken(&e) => {
            crate::ui::warn(format!(
                "{key} cannot be restored ({e:#}); treating it as a miss"
            ));
            Ok(None)
        }
        Err(e) => Err(e),
    }
}
