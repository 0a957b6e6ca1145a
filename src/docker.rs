//! The docker CLI as a child process: `save` as a readable stream, `load` fed from a
//! stream, `pull`, `tag` and `image inspect`. stderr is captured so failures carry
//! docker's own words. Any CLI that speaks these subcommands should do (podman is not tested here).

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Errors from running docker.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The CLI could not be started.
    #[error("cannot run `{bin}`: {source}; install docker or set --docker-bin / CACHER_DOCKER_BIN")]
    Missing { bin: String, source: io::Error },
    /// The CLI ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
}

/// A docker CLI.
#[derive(Debug, Clone)]
pub struct Docker {
    bin: String,
}

/// Collects a child's stderr on a thread so the pipe never fills up.
fn capture(stderr: std::process::ChildStderr) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = io::BufReader::new(stderr).read_to_string(&mut text);
        text
    })
}

fn one_line(text: &str) -> String {
    let text = text.trim();
    if text.is_empty() {
        "no error output".to_string()
    } else {
        text.lines().collect::<Vec<_>>().join(" / ")
    }
}

impl Docker {
    /// The CLI named `bin` (found on PATH when not a path).
    pub fn new(bin: &str) -> Docker {
        Docker {
            bin: bin.to_string(),
        }
    }

    fn spawn(&self, args: &[&str], stdin: Stdio, stdout: Stdio) -> Result<Child, DockerError> {
        Command::new(&self.bin)
            .args(args)
            .stdin(stdin)
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| DockerError::Missing {
                bin: self.bin.clone(),
                source,
            })
    }

    fn failed(&self, args: &[&str], status: std::process::ExitStatus, stderr: &str) -> DockerError {
        DockerError::Failed {
            command: format!("{} {}", self.bin, args.join(" ")),
            status: status.to_string(),
            stderr: one_line(stderr),
        }
    }

    /// Runs a short command to its end, whatever its exit status.
    fn output(&self, args: &[&str]) -> Result<std::process::Output, DockerError> {
        let child = self.spawn(args, Stdio::null(), Stdio::piped())?;
        child
            .wait_with_output()
            .map_err(|source| DockerError::Missing {
                bin: self.bin.clone(),
                source,
            })
    }

    /// Runs a short command and returns its stdout.
    pub fn run(&self, args: &[&str]) -> Result<String, DockerError> {
        let out = self.output(args)?;
        if !out.status.success() {
            return Err(self.failed(args, out.status, &String::from_utf8_lossy(&out.stderr)));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The image's id (`sha256:…`); fails when the image is unknown or the daemon down.
    pub fn image_id(&self, image: &str) -> Result<String, DockerError> {
        Ok(self
            .run(&["image", "inspect", "--format", "{{.Id}}", image])?
            .trim()
            .to_string())
    }

    /// The image's id and the diff IDs of its layers, bottom first. A CLI that cannot
    /// say (its template lacks `RootFS`) gives no diff IDs: the entry then has no
    /// member map.
    pub fn image_layers(&self, image: &str) -> Result<(String, Vec<String>), DockerError> {
        let format = "{{.Id}} {{json .RootFS.Layers}}";
        let layers = self
            .run(&["image", "inspect", "--format", format, image])
            .ok()
            .and_then(|out| {
                let (id, layers) = out.trim().split_once(' ')?;
                let layers: Option<Vec<String>> = serde_json::from_str(layers).ok()?;
                Some((id.to_string(), layers.unwrap_or_default()))
            });
        match layers {
            Some(found) => Ok(found),
            None => Ok((self.image_id(image)?, Vec::new())),
        }
    }

    /// Whether `docker load` on this daemon skips reading the member of a layer it
    /// holds, which a thin archive relies on. Known for docker's graph drivers
    /// (overlay2 and the like). The containerd image store instead stores whatever
    /// the member holds, so an empty one would become the layer; other CLIs are unknown.
    pub fn skips_known_layers(&self) -> bool {
        let Ok(out) = self.run(&["info", "--format", "{{json .DriverStatus}}"]) else {
            return false;
        };
        let status: Option<Vec<Vec<String>>> = serde_json::from_str(out.trim()).ok().flatten();
        status.is_some_and(|pairs| {
            !pairs
                .iter()
                .flatten()
                .any(|v| v.contains("containerd.snapshotter"))
        })
    }

    /// The chain IDs of every layer the daemon holds for some image, intermediate
    /// images included: `docker load` skips reading a layer whose chain ID is here.
    pub fn layer_chains(&self) -> Result<HashSet<String>, DockerError> {
        let ids = self.run(&["image", "ls", "--all", "--quiet", "--no-trunc"])?;
        let ids: Vec<&str> = ids
            .split_whitespace()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let mut chains = HashSet::new();
        // In batches, so a host with many images stays under the argument limit.
        for batch in ids.chunks(256) {
            let mut args = vec!["image", "inspect", "--format", "{{json .RootFS.Layers}}"];
            args.extend(batch);
            // An image removed since the listing makes inspect fail for it alone; the
            // others are still printed, and a layer missed only costs a fetch.
            let out = self.output(&args)?;
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Ok(Some(diff_ids)) = serde_json::from_str::<Option<Vec<String>>>(line) {
                    chains.extend(crate::image_archive::chain_ids(&diff_ids));
                }
            }
        }
        Ok(chains)
    }

    /// `docker pull IMAGE`.
    pub fn pull(&self, image: &str) -> Result<(), DockerError> {
        self.run(&["pull", "--quiet", image]).map(|_| ())
    }

    /// `docker tag SOURCE TARGET`.
    pub fn tag(&self, source: &str, target: &str) -> Result<(), DockerError> {
        self.run(&["tag", source, target]).map(|_| ())
    }

    /// `docker save IMAGE` as a stream; reading it to the end fails if docker failed.
    pub fn save(&self, image: &str) -> Result<SaveStream, DockerError> {
        let args = ["save", image];
        let mut child = self.spawn(&args, Stdio::null(), Stdio::piped())?;
        let stderr = capture(child.stderr.take().expect("stderr is piped"));
        let stdout = child.stdout.take().expect("stdout is piped");
        Ok(SaveStream {
            docker: self.clone(),
            image: image.to_string(),
            child,
            stdout,
            stderr: Some(stderr),
            waited: Arc::default(),
        })
    }

    /// `docker load`, fed through the returned writer; call [`LoadStream::finish`].
    pub fn load(&self) -> Result<LoadStream, DockerError> {
        let mut child = self.spawn(&["load"], Stdio::piped(), Stdio::piped())?;
        let stderr = capture(child.stderr.take().expect("stderr is piped"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let stdout = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = io::BufReader::new(stdout).read_to_string(&mut text);
            text
        });
        let stdin = child.stdin.take().expect("stdin is piped");
        Ok(LoadStream {
            docker: self.clone(),
            child,
            stdin: Some(stdin),
            stdout: Some(stdout),
            stderr: Some(stderr),
        })
    }
}

/// The archive `docker save` writes.
pub struct SaveStream {
    docker: Docker,
    image: String,
    child: Child,
    stdout: ChildStdout,
    stderr: Option<JoinHandle<String>>,
    /// Nanoseconds spent waiting for docker's output.
    waited: Arc<AtomicU64>,
}

impl SaveStream {
    /// A clock of the time readers have spent waiting for docker to write the
    /// archive, readable while the stream is in use elsewhere.
    pub fn waited(&self) -> SaveWait {
        SaveWait(self.waited.clone())
    }
}

/// See [`SaveStream::waited`].
pub struct SaveWait(Arc<AtomicU64>);

impl SaveWait {
    /// The time waited so far.
    pub fn get(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

impl Read for SaveStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let started = Instant::now();
        let n = self.stdout.read(buf);
        let waited = started.elapsed().as_nanos() as u64;
        self.waited.fetch_add(waited, Ordering::Relaxed);
        let n = n?;
        if n == 0 && !buf.is_empty() {
            // End of the archive: only a successful exit makes it complete.
            let status = self.child.wait()?;
            let stderr = self
                .stderr
                .take()
                .map(|h| h.join().unwrap_or_default())
                .unwrap_or_default();
            if !status.success() {
                let args = ["save", self.image.as_str()];
                return Err(io::Error::other(self.docker.failed(&args, status, &stderr)));
            }
        }
        Ok(n)
    }
}

impl Drop for SaveStream {
    fn drop(&mut self) {
        // Abandoned mid-stream (an upload failed): do not leave docker running.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A running `docker load`.
pub struct LoadStream {
    docker: Docker,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

impl Write for LoadStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self
            .stdin
            .as_mut()
            .ok_or_else(|| io::Error::other("docker load input already closed"))?
            .write(buf);
        // docker load quit early (daemon down, archive refused): report its own words,
        // never a broken pipe, which `main` would take for a closed stdout.
        written.map_err(|e| match e.kind() {
            io::ErrorKind::BrokenPipe => self.died(),
            _ => e,
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.stdin.as_mut() {
            Some(s) => s.flush(),
            None => Ok(()),
        }
    }
}

impl LoadStream {
    /// The error of a `docker load` that stopped reading its input: its exit status
    /// and stderr.
    fn died(&mut self) -> io::Error {
        drop(self.stdin.take());
        let status = self.child.wait();
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        match status {
            Ok(status) => io::Error::other(self.docker.failed(&["load"], status, &stderr)),
            Err(e) => e,
        }
    }

    /// Closes the input and waits; returns the references docker reports it loaded
    /// (`Loaded image: REF` or `Loaded image ID: sha256:…`).
    pub fn finish(mut self) -> Result<Vec<String>, DockerError> {
        drop(self.stdin.take());
        let status = self.child.wait().map_err(|source| DockerError::Missing {
            bin: self.docker.bin.clone(),
            source,
        })?;
        let joined = |h: Option<JoinHandle<String>>| {
            h.map(|h| h.join().unwrap_or_default()).unwrap_or_default()
        };
        let stdout = joined(self.stdout.take());
        let stderr = joined(self.stderr.take());
        if !status.success() {
            return Err(self.docker.failed(&["load"], status, &stderr));
        }
        Ok(stdout
            .lines()
            .filter_map(|l| {
                l.strip_prefix("Loaded image: ")
                    .or_else(|| l.strip_prefix("Loaded image ID: "))
            })
            .map(|s| s.trim().to_string())
            .collect())
    }
}

impl Drop for LoadStream {
    /// A load dropped before [`LoadStream::finish`] had bad or partial input: kill
    /// docker before the archive's end, so it imports nothing.
    fn drop(&mut self) {
        if self.stdin.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
