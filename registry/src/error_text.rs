//! Errors as one line for logs, `/readyz` and check reasons: the error and every cause under it,
//! `outer: inner: root`, skipping a cause its parent's text already says (hyper, tonic and
//! etcd-client wrap their causes, and the outer text alone often names none).

/// An error and every cause under it.
pub fn with_causes(e: &dyn std::error::Error) -> String {
    with_sources(e.to_string(), e.source())
}

/// `text`, then each cause from `source` down (those it does not already say).
pub fn with_sources(
    mut text: String,
    mut source: Option<&(dyn std::error::Error + 'static)>,
) -> String {
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn causes_are_chained_once() {
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let outer = std::io::Error::other(inner);
        // The outer text already says the inner one: not repeated.
        assert_eq!(super::with_causes(&outer), "refused");
        assert_eq!(
            super::with_sources("connect".into(), Some(&outer)),
            "connect: refused"
        );
    }
}
