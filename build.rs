//! Stamps the git revision into the binary for `svcd_build_info{revision}` and `svcd version`:
//! `SVCD_REVISION` from the environment when set (a container build, whose context has no
//! `.git`: `docker build --build-arg SVCD_REVISION=…`), else `git rev-parse`, else "unknown" (a
//! packaged source tree).

fn main() {
    println!("cargo:rerun-if-env-changed=SVCD_REVISION");
    let given = std::env::var("SVCD_REVISION")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    if let Some(given) = &given {
        // It becomes a metric label and a line of `svcd version`: a revision, nothing else.
        let valid = given.len() <= 64
            && given
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c));
        assert!(
            valid,
            "SVCD_REVISION={given:?}: expected a git revision (at most 64 of [A-Za-z0-9._+-])"
        );
    }
    let revision = given
        .or_else(|| {
            std::process::Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=SVCD_REVISION={revision}");
    // A new commit or checkout changes HEAD (or the ref it points to).
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
}
