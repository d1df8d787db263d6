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
    regs: Mutex<Vec<OwnRegistration>>,
    verdicts: Mutex<Vec<(State, String, tokio::time::Instant)>>,
}

#[async_trait]
impl Verdicts for Recorded {
    async fn owned(&self) -> Vec<OwnRegistration> {
        self.regs.lock().unwrap().clone()
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
        regs: Mutex::new(vec![registration()]),
        ..Recorded::default()
    });
    let metrics = CheckMetrics::new(&prometheus::Registry::new()).unwrap();
    let cancel = CancellationToken::new();
    let started = tokio::time::Instant::now();
    let (_changes, wake) = watch::channel(0);
    let task = tokio::spawn(run(
        sink.clone(),
        probe,
        metrics.clone(),
        wake,
        cancel.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(15)).await;
    let verdicts = sink.verdicts.lock().unwrap().clone();
    let states: Vec<State> = verdicts.iter().map(|v| v.0).collect();
    assert_eq!(states, [State::Unhealthy, State::Healthy]);
    assert_eq!(
        verdicts[0].1, "refused",
        "the failing probe's error is the reason"
    );
    // First probe at once, one per second after it: the third failure is the third probe (a
    // pending instance becomes unhealthy by the usual threshold), the ninth probe passes the
    // healthy threshold.
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
    let (_changes, wake) = watch::channel(0);
    let task = tokio::spawn(run(sink.clone(), probe, metrics, wake, cancel.clone()));
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

/// Verdicts recorded by a run over `script` for `registration()` (healthy threshold 2,
/// unhealthy 3, interval 1 s), with their times from the start, after `for_` of paused time.
async fn verdicts_for(script: &[bool], for_: Duration) -> Vec<(State, f64)> {
    let probe = Arc::new(ScriptedProbe(Mutex::new(script.iter().copied().collect())));
    let sink = Arc::new(Recorded {
        regs: Mutex::new(vec![registration()]),
        ..Recorded::default()
    });
    let metrics = CheckMetrics::new(&prometheus::Registry::new()).unwrap();
    let cancel = CancellationToken::new();
    let started = tokio::time::Instant::now();
    let (_changes, wake) = watch::channel(0);
    let task = tokio::spawn(run(sink.clone(), probe, metrics, wake, cancel.clone()));
    tokio::time::sleep(for_).await;
    cancel.cancel();
    task.await.unwrap();
    let verdicts = sink.verdicts.lock().unwrap().clone();
    verdicts
        .into_iter()
        .map(|(s, _, at)| (s, (at - started).as_secs_f64()))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_pending_instance_is_healthy_on_its_first_pass_checked_at_once() {
    // Healthy threshold 2, but a pending instance needs one pass; the first check runs at once.
    let v = verdicts_for(&[true, true, true], Duration::from_secs(5)).await;
    assert_eq!(v.len(), 1, "one verdict, not one per pass: {v:?}");
    assert_eq!(v[0].0, State::Healthy);
    assert!(v[0].1 < 0.1, "at once, not after an interval: {}", v[0].1);
    // Failures first leave it pending; its first pass still makes it healthy.
    let v = verdicts_for(&[false, false, true], Duration::from_secs(5)).await;
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].0, State::Healthy);
    assert!((2.0..2.1).contains(&v[0].1), "third probe: {}", v[0].1);
    // Never passing: unhealthy after the usual threshold, once.
    let v = verdicts_for(&[false; 6], Duration::from_secs(5)).await;
    let states: Vec<State> = v.iter().map(|v| v.0).collect();
    assert_eq!(states, [State::Unhealthy], "{v:?}");
    assert!((2.0..2.1).contains(&v[0].1), "third probe: {}", v[0].1);
    // Judged healthy, a pass after failures needs the threshold again.
    let v = verdicts_for(
        &[true, false, false, false, true, false, true, true],
        Duration::from_secs(9),
    )
    .await;
    let states: Vec<State> = v.iter().map(|v| v.0).collect();
    assert_eq!(
        states,
        [State::Healthy, State::Unhealthy, State::Healthy],
        "{v:?}"
    );
    assert!((7.0..7.1).contains(&v[2].1), "eighth probe: {}", v[2].1);
}

#[tokio::test(start_paused = true)]
async fn a_new_registration_is_checked_when_the_snapshot_shows_it_not_a_tick_later() {
    let probe = Arc::new(ScriptedProbe(Mutex::new(VecDeque::new())));
    let sink = Arc::new(Recorded::default());
    let metrics = CheckMetrics::new(&prometheus::Registry::new()).unwrap();
    let cancel = CancellationToken::new();
    let (changes, wake) = watch::channel(0);
    let task = tokio::spawn(run(sink.clone(), probe, metrics, wake, cancel.clone()));
    // Between two ticks (0 s, 0.5 s) the registration appears and a snapshot is published.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let registered = tokio::time::Instant::now();
    sink.regs.lock().unwrap().push(registration());
    changes.send_replace(1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let verdicts = sink.verdicts.lock().unwrap().clone();
    assert_eq!(verdicts.len(), 1, "checked before the next tick");
    assert!(verdicts[0].2 - registered < Duration::from_millis(10));
    cancel.cancel();
    task.await.unwrap();
}
