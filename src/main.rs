//! The `cacher` binary: parse the command line, run it, map the result to an exit code.

use std::process::ExitCode;

use clap::Parser;

use cacher::cli::Cli;
use cacher::commands::{self, Outcome};
use cacher::ui;

/// The static releases' allocator keeps large freed buffers for reuse (see its doc).
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: cacher::memory::LargeBlocks = cacher::memory::LargeBlocks::new();

/// Exit codes, in one place.
#[derive(Debug, Clone, Copy)]
enum Exit {
    /// Done, or the key exists.
    Success = 0,
    /// The key is not cached.
    Miss = 1,
    /// Operational error or bad input.
    Error = 2,
    /// `download` missed and had no `--url`.
    DownloadMiss = 3,
    /// Stopped by Ctrl-C / SIGINT.
    Interrupted = 130,
    /// Stopped by SIGTERM (how CI cancels a job).
    Terminated = 143,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // One line, like every other error; `--help` has the details.
            let text = e.render().to_string();
            let summary: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.is_empty() && !l.starts_with("Usage:"))
                .collect();
            eprintln!(
                "cacher: {} (see --help)",
                summary.join(" ").trim_start_matches("error: ")
            );
            return ExitCode::from(Exit::Error as u8);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let level = if cli.global.quiet {
        ui::Level::Quiet
    } else if cli.global.verbose {
        ui::Level::Verbose
    } else {
        ui::Level::Normal
    };
    ui::init(level, cli.global.json);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cacher: cannot start the async runtime: {e}");
            return ExitCode::from(Exit::Error as u8);
        }
    };
    let exit = runtime.block_on(async {
        // Dropping the command's future on a signal runs its destructors, which remove
        // temp files and leave destinations as they were.
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let terminated = async {
            match term.as_mut() {
                Some(term) => term.recv().await,
                None => std::future::pending().await,
            }
        };
        // Signals first: a SIGTERM to the job's process group also fails a child
        // (`docker load`), and the stop must win over that failure.
        tokio::select! {
            biased;
            _ = tokio::signal::ctrl_c() => {
                ui::cancel();
                eprintln!("cacher: interrupted");
                Exit::Interrupted
            }
            _ = terminated => {
                ui::cancel();
                eprintln!("cacher: terminated");
                Exit::Terminated
            }
            result = commands::run(cli) => exit_for(result),
        }
    });
    // Blocking threads that held a restore in progress remove its temp tree once the
    // command is gone: give them time to finish after a signal.
    let grace = match exit {
        Exit::Interrupted | Exit::Terminated => 10_000,
        _ => 100,
    };
    runtime.shutdown_timeout(std::time::Duration::from_millis(grace));
    ExitCode::from(exit as u8)
}

fn exit_for(result: anyhow::Result<Outcome>) -> Exit {
    match result {
        Ok(Outcome::Success) => Exit::Success,
        Ok(Outcome::Miss) => Exit::Miss,
        Ok(Outcome::DownloadMiss) => Exit::DownloadMiss,
        Err(e) if is_broken_pipe(&e) => Exit::Success,
        Err(e) => {
            eprintln!("cacher: {}", ui::one_line(&e));
            Exit::Error
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
