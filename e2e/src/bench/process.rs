//! The real binaries as child processes: finding (or building) them, starting the
//! hub (`brokkr-operator`) and the agent (`brokkr-agent`), waiting until they serve,
//! stopping them.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::BenchError;

/// Paths of the binaries under test; a binary that could not be built carries why.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub operator: PathBuf,
    pub agent: Result<PathBuf, String>,
}

impl Binaries {
    /// Given paths win; otherwise the binaries next to this executable, built first
    /// with the same profile unless `build` is false.
    pub fn locate(
        operator: Option<PathBuf>,
        agent: Option<PathBuf>,
        build: bool,
    ) -> Result<Binaries, BenchError> {
        let dir = binary_dir()?;
        let release = dir.file_name().is_some_and(|name| name == "release");
        let operator = match operator {
            Some(path) => path,
            None => {
                if build {
                    cargo_build("brokkr-operator", release)
                        .map_err(|reason| BenchError::Setup(reason.to_string()))?;
                }
                existing(dir.join("brokkr-operator")).map_err(BenchError::Setup)?
            }
        };
        let agent = match agent {
            Some(path) => Ok(path),
            None => {
                let built = if build {
                    cargo_build("brokkr-agent", release)
                } else {
                    Ok(())
                };
                built.and_then(|()| existing(dir.join("brokkr-agent")))
            }
        };
        Ok(Binaries { operator, agent })
    }
}

/// The directory cargo puts binaries of this profile in (`target/release`, ...).
fn binary_dir() -> Result<PathBuf, BenchError> {
    let exe = std::env::current_exe().map_err(|source| BenchError::Io {
        what: "find the bench executable".into(),
        source,
    })?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| BenchError::Setup("the bench executable has no directory".into()))?;
    // Tests run from target/<profile>/deps.
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir = dir.parent().unwrap_or(dir);
    }
    Ok(dir.to_path_buf())
}

fn existing(path: PathBuf) -> Result<PathBuf, String> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("{} does not exist", path.display()))
    }
}

fn cargo_build(package: &str, release: bool) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut command = std::process::Command::new(cargo);
    command
        .args([
            "build",
            "--quiet",
            "-p",
            package,
            "--bin",
            package,
            "--manifest-path",
        ])
        .arg(&manifest);
    if release {
        command.arg("--release");
    }
    eprintln!(
        "bench: building {package} ({})",
        if release { "release" } else { "debug" }
    );
    let status = command
        .status()
        .map_err(|err| format!("failed to run cargo to build {package}: {err}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`cargo build -p {package}` failed ({status})"))
    }
}

/// A free port on 127.0.0.1 (free when asked; nobody else on this machine races us
/// for it in practice).
pub fn free_addr() -> Result<SocketAddr, BenchError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map_err(|source| BenchError::Io {
            what: "find a free port".into(),
            source,
        })
}

/// A child process whose output goes to a log file.
pub struct ChildProcess {
    name: String,
    child: Child,
    pid: u32,
    log: PathBuf,
}

impl ChildProcess {
    pub fn spawn(
        name: &str,
        program: &Path,
        env: &[(&str, String)],
        log_dir: &Path,
    ) -> Result<ChildProcess, BenchError> {
        let log = log_dir.join(format!("{name}.log"));
        let io = |what: &str| {
            let what = format!("{what} for {name}");
            move |source| BenchError::Io { what, source }
        };
        let out = std::fs::File::create(&log).map_err(io("create the log file"))?;
        let err = out.try_clone().map_err(io("open the log file"))?;
        let mut command = Command::new(program);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        let child = command.spawn().map_err(io("start the process"))?;
        let pid = child
            .id()
            .ok_or_else(|| BenchError::Setup(format!("{name} exited at once")))?;
        Ok(ChildProcess {
            name: name.to_owned(),
            child,
            pid,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Polls `url` until it answers 2xx, failing when the process exits or `timeout`
    /// passes.
    pub async fn wait_until_serving(
        &mut self,
        url: &str,
        timeout: Duration,
    ) -> Result<(), BenchError> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("a plain-HTTP client always builds");
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.failure(&format!("exited ({status}) before serving")));
            }
            if let Ok(response) = client.get(url).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(self.failure(&format!("did not serve {url} within {timeout:?}")));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn failure(&self, what: &str) -> BenchError {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        BenchError::Setup(format!(
            "{} {what}; log {}:\n{}",
            self.name,
            self.log.display(),
            tail.join("\n")
        ))
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .stderr(Stdio::null())
            .status();
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// A running hub: `brokkr-operator` against the bench database and kubesim.
pub struct Hub {
    process: ChildProcess,
    api: SocketAddr,
    metrics: SocketAddr,
}

impl Hub {
    /// Starts a hub without waiting for it: its agent API at `api` (a free port when
    /// `None`).
    pub fn spawn(
        binary: &Path,
        database_url: &str,
        kubeconfig: &Path,
        log_dir: &Path,
        name: &str,
        api: Option<SocketAddr>,
    ) -> Result<Hub, BenchError> {
        let api = match api {
            Some(addr) => addr,
            None => free_addr()?,
        };
        let metrics = free_addr()?;
        let env = [
            ("DATABASE_URL", database_url.to_owned()),
            ("KUBECONFIG", kubeconfig.display().to_string()),
            ("BROKKR_API_ADDR", api.to_string()),
            ("BROKKR_METRICS_ADDR", metrics.to_string()),
            ("BROKKR_NAMESPACE", "default".to_owned()),
            ("BROKKR_INSTALL_CRDS", "true".to_owned()),
            ("BROKKR_HEARTBEAT_INTERVAL", "15s".to_owned()),
            ("POD_NAME", name.to_owned()),
        ];
        let process = ChildProcess::spawn(name, binary, &env, log_dir)?;
        Ok(Hub {
            process,
            api,
            metrics,
        })
    }

    /// Waits until the hub is ready and its agent API answers.
    pub async fn wait_until_serving(&mut self) -> Result<(), BenchError> {
        let (api, metrics) = (self.api, self.metrics);
        self.process
            .wait_until_serving(&format!("http://{metrics}/readyz"), Duration::from_secs(60))
            .await?;
        self.process
            .wait_until_serving(
                &format!("http://{api}/api/v1/openapi.json"),
                Duration::from_secs(30),
            )
            .await
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.api)
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.api
    }

    /// The value of a sample of the hub's `/metrics`, by the start of its line (`0` when
    /// absent or unreadable).
    pub async fn metric(&self, line: &str) -> f64 {
        let Ok(response) = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("a plain-HTTP client always builds")
            .get(format!("http://{}/metrics", self.metrics))
            .send()
            .await
        else {
            return 0.0;
        };
        let text = response.text().await.unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    pub async fn stop(self) {
        self.process.stop(Duration::from_secs(15)).await;
    }
}
