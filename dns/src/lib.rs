//! svcd DNS responder: answers `<svc>.<ns>.svc.<domain>` with the healthy instance IPs of the
//! registry snapshot (issue #4). The crate sits above `svcd-registry` and reads its
//! `SnapshotReader` only; nothing here is wired yet.
