//! Check thresholds under paused time, with a scripted probe and a recording verdict sink.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use super::*;
use svcd_config::Instance;

/// Answers from a script; passes once the script runs out.
struct ScriptedProbe(Mutex<VecDeque<bool>>);

#[async_trait]
impl Probe for ScriptedProbe {
    async fn probe(&self, _: &CheckSpec, _: SocketAddr) -> Result<(), String> {
        match self.0.lock().unwrap().pop_front() {
            Some(false) => Err("refused".into()),
            _ => Ok(()),
        }
    }
}

#[derive(Default)]
struct Recorded {
    regs: Vec<OwnRegistration>,
    verdicts: Mutex<Vec<(State, String, tokio::time::Instant)>>,
}

#[async_trait]
impl Verdicts for Recorded {
    async fn owned(&self) -> Vec<OwnRegistration> {
        self.regs.clone()
    }
    async fn set_health(
        &self,
        _: &InstanceKey,
        state: State,
        reason: String,
    ) -> Result<bool, StoreError> {
        self.verdicts
            .lock()
            .unwrap()
            .push((state, reason, tokio::time::Instant::now()));
        Ok(true)
    }
}

fn registration() -> OwnRegistration {
    let instance = Instance::from_json(
        br#"{"ip":"127.0.0.1","ports":{"http":80},
            "check":{"type":"tcp","interval":"1s","timeout":"1s","unhealthy_threshold":3,"healthy_threshold":2}}"#,
    )
    .unwrap();
    OwnRegistration {
        key: InstanceKey::new("default", "web", "a").unwrap(),
        instance,
        expires: None,
        written: true,
        health: None,
    }
}

#[tokio::test(start_paused = true)]
async fn thresholds_decide_verdicts_and_nothing_is_written_per_check() {
    // fail ×3 → unhealthy once; fail ×2 more → nothing; pass, fail, pass ×2 → healthy once.
    let script = [false, false, false, false, false, true, false, true, true];
    let probe = Arc::new(ScriptedProbe(Mutex::new(script.into_iter().collect())));
    let sink = Arc::new(Recorded {
        regs: vec![registration()],
        ..Recorded::default()
    });
    let metrics = CheckMetrics::new(&prometheus::Registry::new()).unwrap();
    let cancel = CancellationToken::new();
    let started = tokio::time::Instant::now();
    let task = tokio::spawn(run(sink.clone(), probe, metrics.clone(), cancel.clone()));
    tokio::time::sleep(Duration::from_secs(15)).await;
    let verdicts = sink.verdicts.lock().unwrap().clone();
    let states: Vec<State> = verdicts.iter().map(|v| v.0).collect();
    assert_eq!(states, [State::Unhealthy, State::Healthy]);
    assert_eq!(
        verdicts[0].1, "refused",
        "the failing probe's error is the reason"
    );
    // First probe at ~0.5 s (the first reconcile tick), one per second after it: the third
    // failure is the third probe, the ninth probe passes the healthy threshold.
    let at = |i: usize| (verdicts[i].2 - started).as_secs_f64();
    assert!((2.0..3.0).contains(&at(0)), "unhealthy at {}", at(0));
    assert!((8.0..9.0).contains(&at(1)), "healthy at {}", at(1));
    let pass = metrics
        .checks
        .with_label_values(&["web.default", "pass"])
        .get();
    assert!(pass >= 3, "{pass}");
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_removed_check_stops_and_its_series_go() {
    let probe = Arc::new(ScriptedProbe(Mutex::new(VecDeque::new())));
    struct Toggle(Mutex<Vec<OwnRegistration>>);
    #[async_trait]
    impl Verdicts for Toggle {
        async fn owned(&self) -> Vec<OwnRegistration> {
            self.0.lock().unwrap().clone()
        }
        async fn set_health(
            &self,
            _: &InstanceKey,
            _: State,
            _: String,
        ) -> Result<bool, StoreError> {
            Ok(false)
        }
    }
    let sink = Arc::new(Toggle(Mutex::new(vec![registration()])));
    let registry = prometheus::Registry::new();
    let metrics = CheckMetrics::new(&registry).unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(run(sink.clone(), probe, metrics, cancel.clone()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let series = || {
        registry
            .gather()
            .iter()
            .map(|f| f.get_metric().len())
            .sum::<usize>()
    };
    assert_eq!(series(), 2, "pass and fail for web.default");
    sink.0.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(series(), 0);
    cancel.cancel();
    task.await.unwrap();
}
