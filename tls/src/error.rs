use std::path::PathBuf;

/// Why TLS material could not be loaded. Each names the config key and the file, so a bad file
/// at start is reported as a config error would be, and on reload in the log beside the count.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key}: {path}: {reason}")]
    Material {
        /// The config key that names the file, e.g. `proxy.http[0].tls.cert`.
        key: String,
        path: PathBuf,
        reason: String,
    },
    #[error("{key}: {reason}")]
    Config { key: String, reason: String },
}

impl TlsError {
    pub(crate) fn material(
        key: impl Into<String>,
        path: &std::path::Path,
        reason: impl std::fmt::Display,
    ) -> TlsError {
        TlsError::Material {
            key: key.into(),
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }
}
