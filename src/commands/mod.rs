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
mod list;
mod upload;

use crate::cli::{Cli, Command};
use crate::config::Config;

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
    if let Command::Version = cli.command {
        println!("{}", crate::version::version_line());
        return Ok(Outcome::Success);
    }
    let config = Config::resolve(&cli.global)?;
    match &cli.command {
        Command::Version => unreachable!("handled above"),
        Command::Init => init::run(&config).await,
        Command::Doctor => doctor::run(&config).await,
        Command::Download(args) => download::run(&config, args).await,
        Command::Upload(args) => upload::run(&config, args).await,
        Command::Exists(args) => exists::run(&config, &args.key).await,
        Command::List(args) => list::run(&config, args).await,
        Command::Delete(args) => delete::run(&config, &args.key).await,
        Command::Key(args) => key::run(&config, args),
        Command::Dir(cmd) => dir::run(&config, cmd).await,
        Command::Docker(cmd) => docker::run(&config, cmd).await,
        Command::Gc(args) => gc::run_gc(&config, args).await,
        Command::Prune(args) => gc::run_prune(&config, args).await,
    }
}
