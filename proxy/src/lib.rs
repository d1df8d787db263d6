//! svcd proxies: L4 (TCP with splice, UDP) and L7 (HTTP/1.1, HTTP/2) round robin over the healthy
//! instances of the registry snapshot (issues #5, #6). The crate sits above `svcd-registry` and
//! reads its `SnapshotReader` only; nothing here is wired yet.
