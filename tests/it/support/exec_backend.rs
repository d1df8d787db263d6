//! An echo backend (`support::echo`) as a process of its own, run by `svcd exec`: the test
//! binary itself, running the ignored test [`ENTRY`] with [`BACKEND_ENV`] set, so it really dies
//! (SIGKILL), `svcd exec` deregisters it, and a new process registers again on the same port.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::RngExt;
use tokio::net::TcpListener;
use tokio::time::Instant;

use super::daemon::{Daemon, ExecJob};
use super::echo::EchoBackend;
use super::{eventually, free_port, svcd_bin};

/// The ignored test that calls [`serve_from_env`].
pub const ENTRY: &str = "soak::exec_backend_process";

/// What the backend process serves: `<name> <port> <seed> <race file>`.
const BACKEND_ENV: &str = "SVCD_SOAK_BACKEND";

/// Serves the echo backend [`BACKEND_ENV`] describes until the process is killed; returns at
/// once without it.
pub async fn serve_from_env() {
    let Ok(spec) = std::env::var(BACKEND_ENV) else {
        return;
    };
    let mut f = spec.split(' ');
    let (name, port, seed, races) = (
        f.next().expect("name"),
        f.next().and_then(|p| p.parse::<u16>().ok()).expect("port"),
        f.next().and_then(|s| s.parse::<u64>().ok()).expect("seed"),
        f.next().expect("race file"),
    );
    // The last incarnation's listener is closed (it was killed); bind as soon as the kernel
    // lets go of the port.
    let listener = eventually(Duration::from_secs(5), "the backend's port", || async {
        TcpListener::bind(("127.0.0.1", port)).await.ok()
    })
    .await;
    let backend = EchoBackend::serve(listener, name, seed, Some(races.into()));
    backend.run_forever().await;
}

/// An instance run by `svcd exec` (this test binary at [`ENTRY`]) on a fixed port: started,
/// SIGKILLed and started again.
pub struct Executed {
    id: &'static str,
    port: u16,
    seed: u64,
    pub race_file: std::path::PathBuf,
    log: std::path::PathBuf,
    incarnation: u32,
    job: Option<ExecJob>,
}

impl Executed {
    pub fn new(d: &Daemon, id: &'static str, seed: u64) -> Executed {
        Executed {
            id,
            port: free_port(),
            seed,
            race_file: d.dir.path().join(format!("{id}.races")),
            log: d.dir.path().join(format!("{id}.log")),
            incarnation: 0,
            job: None,
        }
    }

    /// The name its answers carry (`x-backend`): `<id>.<incarnation>`.
    fn name(&self) -> String {
        format!("{}.{}", self.id, self.incarnation)
    }

    /// Starts the next incarnation (registered by `svcd exec` with `d`).
    pub fn start(&mut self, d: &Daemon) {
        self.incarnation += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("exec log");
        let mut base = std::process::Command::new(svcd_bin());
        base.env(
            BACKEND_ENV,
            format!(
                "{} {} {} {}",
                self.name(),
                self.port,
                self.seed,
                self.race_file.display()
            ),
        )
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
        let port = format!("http={}", self.port);
        let me = std::env::current_exe().expect("test binary");
        let me = me.to_str().expect("utf-8 path");
        self.job = Some(ExecJob::spawn(
            d,
            "web",
            self.id,
            &[
                "--ip",
                "127.0.0.1",
                "--port",
                &port,
                "--protocol",
                "http",
                "--check",
                "tcp",
                "--check-interval",
                "1s",
                "--ttl",
                "2s",
            ],
            &[me, ENTRY, "--exact", "--ignored", "--nocapture"],
            base,
        ));
    }

    /// SIGKILLs the running incarnation and waits until `svcd exec` has deregistered it from
    /// every daemon; its name and the moment it was killed.
    async fn kill(&mut self, daemons: &[&Daemon]) -> Option<(String, Instant)> {
        let mut job = self.job.take()?;
        job.kill_child().await;
        let at = Instant::now();
        job.wait_exit(Duration::from_secs(10)).await;
        for d in daemons {
            eventually(
                Duration::from_secs(10),
                "the killed instance deregistered",
                || async {
                    (!d.instance_ids("default", "web")
                        .await
                        .iter()
                        .any(|i| i == self.id))
                    .then_some(())
                },
            )
            .await;
        }
        Some((self.name(), at))
    }

    /// Lives 2–6 s, dies, stays dead 0.2–1.5 s, comes back, until `until`; the incarnations
    /// killed.
    pub async fn cycle(
        &mut self,
        daemons: &[&Daemon],
        rng: &mut StdRng,
        until: Instant,
    ) -> Vec<(String, Instant)> {
        let mut killed = Vec::new();
        loop {
            let death = Instant::now() + Duration::from_millis(rng.random_range(2000..6000));
            if death + Duration::from_secs(3) >= until {
                return killed;
            }
            tokio::time::sleep_until(death).await;
            killed.extend(self.kill(daemons).await);
            tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
            self.start(daemons[0]);
            for d in daemons {
                eventually(Duration::from_secs(10), "the instance back", || async {
                    d.instance_ids("default", "web")
                        .await
                        .iter()
                        .any(|i| i == self.id)
                        .then_some(())
                })
                .await;
            }
        }
    }

    /// Kills the last incarnation (the run is over); its name.
    pub async fn stop(&mut self, d: &Daemon) -> Option<(String, Instant)> {
        self.kill(&[d]).await
    }
}
