//! Forwarded questions under way: bounded, and asked once however many clients ask them.
//!
//! A question for a name outside the zone waits on an upstream for up to `dns.forwarding.timeout`.
//! Without a bound, a flood of such questions to a slow or silent upstream holds one task each
//! and memory grows with the flood. Here a question is *led* by one task that asks the upstream;
//! an identical question (same name, type, class and DO bit) asked while it is under way *joins*
//! it and is answered from the same upstream answer with its own ID and question (as dnsmasq
//! does: a client's retry or a second client is not a second upstream query). Leading takes a
//! slot of its lane (a UDP worker, or DNS over TCP) and of the server; joining takes a place among
//! that question's waiters. With no slot or place left the question is refused at once: the
//! caller answers SERVFAIL and counts it.
//!
//! Every slot is taken under the table's lock (once per forwarded question, never on the fast
//! path), so the counts never pass their bounds; a [`Lease`] gives its slots back when dropped and
//! takes its question out of the table however its task ends, so no later question can join one
//! that nobody will answer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hickory_proto::rr::{DNSClass, Name, RecordType};
use prometheus::IntGauge;

/// Clients that may wait on one question under way (the lead's included). Past it an identical
/// question is refused like one over the in-flight bound.
pub const MAX_WAITERS: usize = 64;

/// What makes two questions one: the name (case-insensitive), type, class, and the DO bit.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct QuestionKey {
    /// Lower-cased; also the name asked upstream.
    pub name: Name,
    pub qtype: RecordType,
    pub qclass: DNSClass,
    pub dnssec_ok: bool,
}

impl QuestionKey {
    pub fn new(name: &Name, qtype: RecordType, qclass: DNSClass, dnssec_ok: bool) -> Self {
        QuestionKey {
            name: name.to_lowercase(),
            qtype,
            qclass,
            dnssec_ok,
        }
    }
}

/// The bound that refused a question.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// Its lane leads `max_in_flight_per_worker` questions already.
    Worker,
    /// The server leads `max_in_flight` questions already.
    Total,
    /// [`MAX_WAITERS`] clients wait on the identical question already.
    Waiters,
}

/// One serving path's share of the bound: a UDP worker thread, or DNS over TCP as a whole.
#[derive(Default, Debug)]
pub struct Lane {
    /// Questions this lane leads now.
    leading: AtomicUsize,
}

impl Lane {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    pub fn leading(&self) -> usize {
        self.leading.load(Ordering::Relaxed)
    }
}

/// The questions under way, each with the clients waiting on it (`W`: what answering one takes).
pub struct InFlight<W> {
    table: Mutex<HashMap<QuestionKey, Vec<W>>>,
    /// Questions led now, in all lanes. Raised only under `table`'s lock.
    leading: AtomicUsize,
    /// `dns.forwarding.max_in_flight`, and `max_in_flight_per_worker` (reloadable).
    max_total: AtomicUsize,
    max_per_lane: AtomicUsize,
    /// `svcd_dns_forward_in_flight`: follows `leading`.
    gauge: IntGauge,
}

/// What became of a question offered to [`InFlight::admit`].
pub enum Admission<W> {
    /// The first to ask: the caller asks the upstream and answers everyone with
    /// [`Lease::complete`].
    Lead(Lease<W>),
    /// An identical question is under way; its lead answers this waiter too.
    Joined,
    /// Over a bound: the waiter is handed back to be answered at once.
    Refused(W, Limit),
}

impl<W> InFlight<W> {
    pub fn new(max_total: usize, max_per_lane: usize, gauge: IntGauge) -> Arc<Self> {
        Arc::new(InFlight {
            table: Mutex::new(HashMap::new()),
            leading: AtomicUsize::new(0),
            max_total: AtomicUsize::new(max_total),
            max_per_lane: AtomicUsize::new(max_per_lane),
            gauge,
        })
    }

    /// New bounds (a reload); questions already led keep their slots.
    pub fn set_limits(&self, max_total: usize, max_per_lane: usize) {
        self.max_total.store(max_total, Ordering::Relaxed);
        self.max_per_lane.store(max_per_lane, Ordering::Relaxed);
    }

    /// Questions led now, in all lanes.
    pub fn leading(&self) -> usize {
        self.leading.load(Ordering::Relaxed)
    }

    /// Questions in the table (led and not yet completed).
    pub fn questions(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<QuestionKey, Vec<W>>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Joins `waiter` to the identical question under way, or makes it the lead of a new one
    /// within `lane`'s and the server's bounds, or refuses it.
    pub fn admit(self: &Arc<Self>, key: QuestionKey, waiter: W, lane: &Arc<Lane>) -> Admission<W> {
        let mut table = self.lock();
        if let Some(waiters) = table.get_mut(&key) {
            if waiters.len() >= MAX_WAITERS {
                return Admission::Refused(waiter, Limit::Waiters);
            }
            waiters.push(waiter);
            return Admission::Joined;
        }
        if lane.leading.load(Ordering::Relaxed) >= self.max_per_lane.load(Ordering::Relaxed) {
            return Admission::Refused(waiter, Limit::Worker);
        }
        if self.leading.load(Ordering::Relaxed) >= self.max_total.load(Ordering::Relaxed) {
            return Admission::Refused(waiter, Limit::Total);
        }
        lane.leading.fetch_add(1, Ordering::Relaxed);
        self.leading.fetch_add(1, Ordering::Relaxed);
        self.gauge.inc();
        table.insert(key.clone(), vec![waiter]);
        Admission::Lead(Lease {
            inflight: self.clone(),
            lane: lane.clone(),
            key: Some(key),
        })
    }
}

/// A led question's slots; given back when dropped, and the question taken out of the table if
/// [`Lease::complete`] was not called (its waiters are dropped unanswered: a task cancelled at
/// shutdown).
pub struct Lease<W> {
    inflight: Arc<InFlight<W>>,
    lane: Arc<Lane>,
    /// `None` once completed.
    key: Option<QuestionKey>,
}

impl<W> Lease<W> {
    pub fn key(&self) -> &QuestionKey {
        self.key
            .as_ref()
            .expect("a lease is completed only by value")
    }

    /// Ends the question: everyone waiting on it, the lead first. A question asked from now on
    /// is a new one.
    pub fn complete(mut self) -> Vec<W> {
        let key = self.key.take().expect("completed once");
        self.inflight.lock().remove(&key).unwrap_or_default()
    }
}

impl<W> Drop for Lease<W> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let waiters = self.inflight.lock().remove(&key);
            drop(waiters); // outside the lock
        }
        self.lane.leading.fetch_sub(1, Ordering::Relaxed);
        self.inflight.leading.fetch_sub(1, Ordering::Relaxed);
        self.inflight.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, qtype: RecordType, dnssec_ok: bool) -> QuestionKey {
        QuestionKey::new(
            &Name::from_ascii(name).unwrap(),
            qtype,
            DNSClass::IN,
            dnssec_ok,
        )
    }

    fn table(total: usize, per_lane: usize) -> Arc<InFlight<u16>> {
        let gauge = IntGauge::new("in_flight", "test").unwrap();
        InFlight::new(total, per_lane, gauge)
    }

    fn lead(a: Admission<u16>) -> Lease<u16> {
        match a {
            Admission::Lead(lease) => lease,
            Admission::Joined => panic!("joined, expected to lead"),
            Admission::Refused(_, limit) => panic!("refused ({limit:?}), expected to lead"),
        }
    }

    #[test]
    fn identical_questions_join_the_one_under_way_and_all_are_answered() {
        let inflight = table(10, 10);
        let lane = Lane::new();
        let lease = lead(inflight.admit(key("Example.ORG.", RecordType::A, false), 1, &lane));
        // The same question however spelled: joins, takes no slot.
        for (id, name) in [(2, "example.org."), (3, "EXAMPLE.org.")] {
            assert!(matches!(
                inflight.admit(key(name, RecordType::A, false), id, &lane),
                Admission::Joined
            ));
        }
        assert_eq!((inflight.leading(), lane.leading()), (1, 1));
        assert_eq!(inflight.gauge.get(), 1);
        // Every waiter, each with its own ID, the lead first.
        assert_eq!(lease.complete(), vec![1, 2, 3]);
        assert_eq!((inflight.leading(), lane.leading()), (0, 0));
        assert_eq!((inflight.questions(), inflight.gauge.get()), (0, 0));
        // Asked again after the answer: a new question.
        let again = lead(inflight.admit(key("example.org.", RecordType::A, false), 4, &lane));
        assert_eq!(again.complete(), vec![4]);
    }

    #[test]
    fn type_class_and_do_bit_make_different_questions() {
        let inflight = table(10, 10);
        let lane = Lane::new();
        let name = Name::from_ascii("example.org.").unwrap();
        let keys = [
            QuestionKey::new(&name, RecordType::A, DNSClass::IN, false),
            QuestionKey::new(&name, RecordType::AAAA, DNSClass::IN, false),
            QuestionKey::new(&name, RecordType::A, DNSClass::ANY, false),
            QuestionKey::new(&name, RecordType::A, DNSClass::IN, true),
        ];
        let leases: Vec<_> = keys
            .into_iter()
            .enumerate()
            .map(|(i, k)| lead(inflight.admit(k, i as u16, &lane)))
            .collect();
        assert_eq!(inflight.leading(), 4);
        drop(leases);
        assert_eq!((inflight.leading(), inflight.questions()), (0, 0));
    }

    #[test]
    fn past_the_lane_and_total_bounds_questions_are_refused_and_handed_back() {
        let inflight = table(3, 2);
        let (a, b) = (Lane::new(), Lane::new());
        let mut leases = vec![
            lead(inflight.admit(key("a1.", RecordType::A, false), 1, &a)),
            lead(inflight.admit(key("a2.", RecordType::A, false), 2, &a)),
        ];
        match inflight.admit(key("a3.", RecordType::A, false), 3, &a) {
            Admission::Refused(3, Limit::Worker) => {}
            _ => panic!("lane a is full"),
        }
        leases.push(lead(inflight.admit(
            key("b1.", RecordType::A, false),
            4,
            &b,
        )));
        match inflight.admit(key("b2.", RecordType::A, false), 5, &b) {
            Admission::Refused(5, Limit::Total) => {}
            _ => panic!("the server is full"),
        }
        // A question under way can still be joined while the bounds are reached.
        assert!(matches!(
            inflight.admit(key("a1.", RecordType::A, false), 6, &b),
            Admission::Joined
        ));
        assert_eq!(inflight.gauge.get(), 3);
        // A slot given back is a slot for the next question.
        let first = leases.remove(0);
        assert_eq!(first.complete(), vec![1, 6]);
        leases.push(lead(inflight.admit(
            key("a3.", RecordType::A, false),
            7,
            &a,
        )));
        // A reload lowers the bound: no new lead until enough have ended.
        inflight.set_limits(1, 1);
        match inflight.admit(key("c.", RecordType::A, false), 8, &Lane::new()) {
            Admission::Refused(8, Limit::Total) => {}
            _ => panic!("over the lowered bound"),
        }
        drop(leases);
        assert_eq!(inflight.leading(), 0);
        lead(inflight.admit(key("c.", RecordType::A, false), 9, &a));
    }

    #[test]
    fn waiters_on_one_question_are_bounded() {
        let inflight = table(10, 10);
        let lane = Lane::new();
        let k = key("popular.example.", RecordType::A, false);
        let lease = lead(inflight.admit(k.clone(), 0, &lane));
        for id in 1..MAX_WAITERS as u16 {
            assert!(matches!(
                inflight.admit(k.clone(), id, &lane),
                Admission::Joined
            ));
        }
        match inflight.admit(k.clone(), 999, &lane) {
            Admission::Refused(999, Limit::Waiters) => {}
            _ => panic!("too many waiters"),
        }
        assert_eq!(lease.complete().len(), MAX_WAITERS);
    }

    #[test]
    fn a_lease_dropped_without_completing_takes_its_question_out() {
        let inflight = table(10, 10);
        let lane = Lane::new();
        let k = key("cancelled.example.", RecordType::A, false);
        let lease = lead(inflight.admit(k.clone(), 1, &lane));
        assert!(matches!(
            inflight.admit(k.clone(), 2, &lane),
            Admission::Joined
        ));
        drop(lease);
        assert_eq!(
            (inflight.questions(), inflight.leading(), lane.leading()),
            (0, 0, 0)
        );
        // Nobody joins a question that nobody answers: the next one leads.
        lead(inflight.admit(k, 3, &lane));
    }

    #[test]
    fn racing_lanes_never_lead_more_than_the_bounds() {
        let inflight = table(8, 3);
        let peak = Arc::new(AtomicUsize::new(0));
        std::thread::scope(|s| {
            for t in 0..4u16 {
                let (inflight, peak) = (inflight.clone(), peak.clone());
                s.spawn(move || {
                    let lane = Lane::new();
                    let mut held = std::collections::VecDeque::new();
                    for i in 0..2000u16 {
                        let k = key(&format!("q{t}-{i}.example."), RecordType::A, false);
                        if let Admission::Lead(lease) = inflight.admit(k, i, &lane) {
                            assert!(lane.leading() <= 3);
                            peak.fetch_max(inflight.leading(), Ordering::Relaxed);
                            held.push_back(lease);
                        }
                        if held.len() > 2 || i % 7 == 0 {
                            held.pop_front();
                        }
                    }
                });
            }
        });
        assert!(peak.load(Ordering::Relaxed) <= 8);
        assert_eq!((inflight.leading(), inflight.gauge.get()), (0, 0));
    }
}
