//! One suite, two backends: the embedded store must behave like etcd for everything the registry
//! relies on.

use std::sync::Arc;
use std::time::Duration;

use svcd_config::EtcdConfig;
use svcd_registry::store::{list_all, EventKind, Store, StoreError, WatchMessage, WatchStream};
use svcd_registry::{EmbeddedStore, EtcdStore};

use crate::support::etcd::Etcd;
use crate::support::eventually;

const P: &str = "/conformance/";

async fn next_events(w: &mut Box<dyn WatchStream>) -> Vec<(EventKind, String, i64)> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("watch message within 5s")
            .expect("watch ok")
            .expect("watch open");
        if let WatchMessage::Events { events, .. } = m {
            return events
                .into_iter()
                .map(|e| (e.kind, e.key, e.mod_revision))
                .collect();
        }
    }
}

/// `keeps_history`: old revisions can be read (etcd); the embedded store keeps only the latest
/// and answers a read pinned to an older one as compacted, so its caller re-lists.
async fn suite(store: Arc<dyn Store>, keeps_history: bool) {
    let s = store.as_ref();
    // put / list / revisions
    let r1 = s.put(&format!("{P}a"), b"1".to_vec(), None).await.unwrap();
    let r2 = s.put(&format!("{P}b"), b"2".to_vec(), None).await.unwrap();
    let r3 = s.put(&format!("{P}c"), b"3".to_vec(), None).await.unwrap();
    s.put("/conformance-other/x", b"x".to_vec(), None)
        .await
        .unwrap();
    assert!(r1 < r2 && r2 < r3, "revisions increase: {r1} {r2} {r3}");

    // paged listing at one revision: a write between pages is not seen
    let page1 = s.list(P, "", 0, 2).await.unwrap();
    assert_eq!(page1.kvs.len(), 2);
    assert!(page1.more);
    // A page read at a pinned revision says that revision, not the store's current one (a
    // listing that took the latter resumed its watch past writes made while it listed).
    s.put("/conformance-other/y", b"y".to_vec(), None)
        .await
        .unwrap();
    let next = format!("{}\0", page1.kvs[1].key);
    match s.list(P, &next, page1.revision, 2).await {
        Ok(page2) => {
            assert!(keeps_history);
            assert_eq!(
                page2.revision, page1.revision,
                "page 2 is at page 1's revision"
            );
            assert_eq!(page2.kvs.len(), 1);
        }
        Err(StoreError::Compacted { .. }) => assert!(!keeps_history, "etcd keeps history"),
        Err(e) => panic!("page 2: {e}"),
    }
    let (all, rev) = list_all(s, P, 2).await.unwrap();
    assert_eq!(
        all.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(),
        [format!("{P}a"), format!("{P}b"), format!("{P}c")]
    );
    assert_eq!(all[1].value, b"2");
    assert_eq!(all[2].mod_revision, r3);
    assert!(rev >= r3);

    // delete
    assert!(s.delete(&format!("{P}b")).await.unwrap());
    assert!(!s.delete(&format!("{P}b")).await.unwrap());

    // watch from an old revision replays history, in order, filtered by prefix
    let mut w = s.watch(P, r2).await.unwrap();
    let events = next_events(&mut w).await;
    assert_eq!(events[0], (EventKind::Put, format!("{P}b"), r2));
    let mut seen = events;
    while seen.len() < 3 {
        seen.extend(next_events(&mut w).await);
    }
    assert_eq!(seen[1], (EventKind::Put, format!("{P}c"), r3));
    assert_eq!(seen[2].0, EventKind::Delete);
    assert_eq!(seen[2].1, format!("{P}b"));

    // live events
    let r4 = s.put(&format!("{P}d"), b"4".to_vec(), None).await.unwrap();
    assert_eq!(
        next_events(&mut w).await,
        vec![(EventKind::Put, format!("{P}d"), r4)]
    );

    // progress on request
    w.request_progress().await.unwrap();
    let progress = loop {
        match tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("progress in 5s")
            .unwrap()
            .unwrap()
        {
            WatchMessage::Progress { revision } => break revision,
            WatchMessage::Events { .. } => continue,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(progress >= r4);

    // leases: put under a lease, keep alive, revoke deletes its keys in one revision
    let lease = s.grant(Duration::from_secs(30)).await.unwrap();
    s.put(&format!("{P}l1"), b"x".to_vec(), Some(lease))
        .await
        .unwrap();
    s.put(&format!("{P}l2"), b"x".to_vec(), Some(lease))
        .await
        .unwrap();
    assert_eq!(next_events(&mut w).await.len(), 1);
    assert_eq!(next_events(&mut w).await.len(), 1);
    assert!(s.keep_alive(lease).await.unwrap().is_some());
    s.revoke(lease).await.unwrap();
    let mut deletes = next_events(&mut w).await;
    while deletes.len() < 2 {
        deletes.extend(next_events(&mut w).await);
    }
    assert!(deletes.iter().all(|(k, _, _)| *k == EventKind::Delete));
    assert_eq!(
        deletes[0].2, deletes[1].2,
        "lease revocation deletes in one revision"
    );
    assert_eq!(
        s.keep_alive(lease).await.unwrap(),
        None,
        "revoked lease is gone"
    );
    s.revoke(lease).await.unwrap(); // idempotent

    // put with an unknown lease fails
    assert!(matches!(
        s.put(&format!("{P}z"), b"x".to_vec(), Some(lease)).await,
        Err(StoreError::LeaseNotFound(_))
    ));

    // lease expiry without keep-alive
    let short = s.grant(Duration::from_secs(1)).await.unwrap();
    s.put(&format!("{P}ttl"), b"x".to_vec(), Some(short))
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "leased key to expire", || async {
        let page = s.list(&format!("{P}ttl"), "", 0, 0).await.ok()?;
        page.kvs.is_empty().then_some(())
    })
    .await;

    // compaction: watching from a compacted revision says so
    let now = s.put(&format!("{P}e"), b"5".to_vec(), None).await.unwrap();
    s.compact(now).await.unwrap();
    let mut old = s.watch(P, r1).await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), old.next())
        .await
        .unwrap();
    assert!(
        matches!(m, Ok(Some(WatchMessage::Compacted { .. }))),
        "expected Compacted, got {m:?}"
    );

    // put_if_absent: the first call creates, later ones read what it wrote; a put keeps the
    // create revision
    let marker = "/conformance-other/marker";
    let first = s.put_if_absent(marker, b"one".to_vec()).await.unwrap();
    assert_eq!(first.value, b"one");
    assert!(first.create_revision > now);
    assert_eq!(first.mod_revision, first.create_revision);
    let second = s.put_if_absent(marker, b"two".to_vec()).await.unwrap();
    assert_eq!(second, first, "an existing key is returned as it is");
    let rewritten = s.put(marker, b"three".to_vec(), None).await.unwrap();
    let page = s.list(marker, "", 0, 0).await.unwrap();
    assert_eq!(page.kvs.len(), 1);
    assert_eq!(page.kvs[0].create_revision, first.create_revision);
    assert_eq!(page.kvs[0].mod_revision, rewritten);
    s.delete(marker).await.unwrap();
    let third = s.put_if_absent(marker, b"four".to_vec()).await.unwrap();
    assert_eq!(third.value, b"four", "a deleted key is created again");
    assert!(third.create_revision > rewritten);
}

#[tokio::test]
async fn embedded_store_conforms() {
    suite(Arc::new(EmbeddedStore::new()), false).await;
}

#[tokio::test]
async fn etcd_store_conforms() {
    let etcd = Etcd::start().await;
    let config = EtcdConfig {
        endpoints: vec![etcd.endpoint()],
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        keepalive_interval: Duration::from_secs(5),
        keepalive_timeout: Duration::from_secs(2),
        username: None,
        password: None,
        password_file: None,
        tls: None,
    };
    suite(Arc::new(EtcdStore::connect(&config).await.unwrap()), true).await;
}
