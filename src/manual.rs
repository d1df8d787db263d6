//! The manual: svcd(1) and one page per subcommand (svcd-run(1), svcd-config-check(1), …), as
//! `svcd(1)`'s COMMANDS section names them. clap_mangen renders what the command line defines
//! (synopsis, description, every option with its default and variable); this module adds the
//! sections clap knows nothing about, per page: FILES, ENVIRONMENT, SIGNALS, EXIT STATUS and
//! SEE ALSO. `scripts/package` installs every page (`svcd man --out-dir`).

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::Command;
use roff::{bold, italic, roman, Inline, Roff};

/// A term and what it means, rendered as a tagged paragraph.
type Item = (&'static str, &'static str);

/// The command line as the pages describe it: built (so subcommands carry their display names,
/// `svcd-config-check`), without clap's `help` subcommand, which has no page.
fn command() -> Command {
    let mut cmd =
        <crate::cli::Cli as clap::CommandFactory>::command().disable_help_subcommand(true);
    cmd.build();
    cmd
}

/// svcd(1), for `svcd man`.
pub fn render_main(out: &mut dyn Write) -> io::Result<()> {
    render(&command(), out)
}

/// Every page into `dir`: svcd.1 and one per subcommand at any depth. Returns the files written.
pub fn write_all(dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    let mut pending = vec![command()];
    while let Some(cmd) = pending.pop() {
        pending.extend(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
        let path = dir.join(format!("{}.1", page_name(&cmd)));
        let mut file = io::BufWriter::new(std::fs::File::create(&path)?);
        render(&cmd, &mut file)?;
        file.flush()?;
        written.push(path);
    }
    written.sort();
    Ok(written)
}

/// `svcd`, `svcd-run`, `svcd-config-check`: the page's name (and its file's, less `.1`).
fn page_name(cmd: &Command) -> String {
    cmd.get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_string()
}

/// One page: clap_mangen's sections in its order, then this module's.
pub fn render(cmd: &Command, out: &mut dyn Write) -> io::Result<()> {
    // Every page's footer names the package and version (clap's default is the subcommand's
    // name, and subcommands have no version).
    let man = clap_mangen::Man::new(cmd.clone())
        .source(format!("svcd {}", crate::cli::VERSION))
        .manual("svcd manual");
    // Each piece is a whole roff document, opening with the same preamble: written once.
    let preamble = Roff::new().render();
    let body = |render: &dyn Fn(&mut dyn Write) -> io::Result<()>| -> io::Result<String> {
        let mut buf = Vec::new();
        render(&mut buf)?;
        let text = String::from_utf8(buf).map_err(io::Error::other)?;
        Ok(text.strip_prefix(&preamble).unwrap_or(&text).to_string())
    };
    let mut page = preamble.clone();
    page += &body(&|w| man.render_title(w))?;
    page += &body(&|w| man.render_name_section(w))?;
    page += &body(&|w| man.render_synopsis_section(w))?;
    page += &body(&|w| man.render_description_section(w))?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        page += &body(&|w| man.render_options_section(w))?;
    }
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        page += &body(&|w| man.render_subcommands_section(w))?;
    }
    // `after_help` (the variables without a flag) is not rendered: ENVIRONMENT lists them all.
    let name = page_name(cmd);
    let sections = Sections::of(&name);
    let mut roff = Roff::new();
    section(&mut roff, "FILES", sections.files);
    section(&mut roff, "ENVIRONMENT", &sections.environment());
    section(&mut roff, "SIGNALS", sections.signals);
    section(&mut roff, "EXIT STATUS", sections.exit_status);
    see_also(&mut roff, &name);
    page += &body(&|w| roff.to_writer(w))?;
    if cmd.get_version().is_some() {
        page += &body(&|w| man.render_version_section(w))?;
    }
    out.write_all(page.as_bytes())
}

/// `.SH title` and a tagged paragraph per item (the term in bold).
fn section<T: AsRef<str>, U: AsRef<str>>(roff: &mut Roff, title: &str, items: &[(T, U)]) {
    roff.control("SH", [title]);
    for (term, text) in items {
        roff.control("TP", []);
        roff.text([bold(term.as_ref())]);
        roff.text([roman(text.as_ref())]);
    }
}

/// svcd(1) from every subcommand's page, svcd-run(1) and svcd-config-check(1) where they help,
/// and the documentation shipped in /usr/share/doc/svcd.
fn see_also(roff: &mut Roff, name: &str) {
    let mut refs: Vec<Inline> = Vec::new();
    let mut add = |page: &str, section: &str| {
        if !refs.is_empty() {
            refs.push(roman(", "));
        }
        refs.push(bold(page.to_string()));
        refs.push(roman(format!("({section})")));
    };
    if name != "svcd" {
        add("svcd", "1");
    }
    if name == "svcd" || name.starts_with("svcd-config") {
        add("svcd-run", "1");
    }
    if name != "svcd-config-check" {
        add("svcd-config-check", "1");
    }
    if name == "svcd" || name == "svcd-run" {
        add("systemctl", "1");
    }
    refs.extend([
        roman(", and the documentation in "),
        italic("/usr/share/doc/svcd"),
        roman(" (README.md, deploy.md, metrics.md)."),
    ]);
    roff.control("SH", ["SEE ALSO"]);
    roff.text(refs);
}

/// What a page says beyond its options.
struct Sections {
    files: &'static [Item],
    /// Every variable the command reads (those of options are under OPTIONS as well).
    environment: Vec<(String, String)>,
    signals: &'static [Item],
    exit_status: &'static [Item],
}

const CONFIG_FILE: Item = (
    "/etc/svcd/svcd.toml",
    "The configuration of the packaged daemon (svcd.service runs svcd run --config with it). \
     svcd config default prints every key with its default; svcd config check validates a file.",
);
const ADMIN_SOCKET: Item = (
    "/run/svcd/admin.sock",
    "The packaged daemon's admin API (admin.listen = \"unix:/run/svcd/admin.sock\", mode 0660, \
     group svcd). Client commands use it when it exists and --admin is not given, else \
     127.0.0.1:9901; a user outside group svcd is told to join it.",
);
const UNIT: Item = (
    "/lib/systemd/system/svcd.service",
    "The systemd unit (Type=notify): systemctl reload svcd sends SIGHUP.",
);
const RESOLV_CONF: Item = (
    "/etc/resolv.conf",
    "Read for dns.forward = [\"resolv.conf\"] (at start and on SIGHUP), svcd's own addresses \
     skipped.",
);

const CLIENT_ENV: &[Item] = &[
    (
        "SVCD_ADMIN_LISTEN",
        "The daemon's admin API, as --admin: IP:PORT or unix:/PATH.",
    ),
    (
        "SVCD_ADMIN_TOKEN_FILE",
        "File with the admin bearer token, as --token-file (needed when the daemon sets \
         admin.token_file).",
    ),
    (
        "RUST_LOG",
        "Filter for the command's own warnings on standard error (default warn).",
    ),
];

const DAEMON_ENV: &[Item] = &[
    (
        "SVCD_CONFIG",
        "The configuration file, as --config; re-read on SIGHUP.",
    ),
    (
        "RUST_LOG",
        "Log filter of svcd run; wins over log.level and --log-level. (Client commands print \
         their warnings by it, default warn.)",
    ),
    (
        "NOTIFY_SOCKET",
        "Set by systemd for Type=notify: READY=1 once /readyz would answer 200, RELOADING=1 and \
         READY=1 around a reload, STOPPING=1 at shutdown.",
    ),
    (
        "WATCHDOG_USEC",
        "Set by systemd's WatchdogSec=: svcd sends WATCHDOG=1 at half that interval.",
    ),
];

const NO_SIGNALS: &[Item] = &[(
    "SIGINT, SIGTERM",
    "Not handled: the command ends at once (it changes nothing that needs undoing).",
)];

const CLIENT_EXIT: &[Item] = &[
    ("0", "The daemon did what was asked."),
    (
        "1",
        "An error: the daemon is unreachable, refused the request (the reason is printed), or \
         the arguments were invalid.",
    ),
    ("2", "Wrong usage (unknown option, missing argument)."),
];

const LOCAL_EXIT: &[Item] = &[
    ("0", "Success."),
    ("1", "The output could not be written."),
    ("2", "Wrong usage (unknown option, missing argument)."),
];

impl Sections {
    fn of(page: &str) -> Sections {
        let client = |exit_status| Sections {
            files: &[ADMIN_SOCKET],
            environment: owned(CLIENT_ENV),
            signals: NO_SIGNALS,
            exit_status,
        };
        match page {
            "svcd" => Sections {
                files: &[CONFIG_FILE, ADMIN_SOCKET, UNIT, RESOLV_CONF],
                environment: [
                    config_env()
                        .into_iter()
                        .map(|(var, text)| {
                            let client = CLIENT_ENV.iter().find(|(v, _)| *v == var);
                            match client {
                                Some((_, also)) => (var, format!("{text} Client commands: {also}")),
                                None => (var, text),
                            }
                        })
                        .collect(),
                    owned(DAEMON_ENV),
                ]
                .concat(),
                signals: RUN_SIGNALS,
                exit_status: &[
                    ("0", "Success (svcd run: an orderly shutdown)."),
                    ("1", "An error; see the page of the subcommand."),
                    (
                        "2",
                        "Wrong usage, or an invalid configuration (svcd config check), or a \
                         daemon not yet synced with its store (svcd list).",
                    ),
                    (
                        "130",
                        "svcd run got a second SIGTERM or SIGINT during the shutdown.",
                    ),
                ],
            },
            "svcd-run" => Sections {
                files: &[CONFIG_FILE, ADMIN_SOCKET, UNIT, RESOLV_CONF],
                environment: [config_env(), owned(DAEMON_ENV)].concat(),
                signals: RUN_SIGNALS,
                exit_status: &[
                    (
                        "0",
                        "An orderly shutdown after SIGTERM or SIGINT: drained, lease revoked.",
                    ),
                    (
                        "1",
                        "Could not start: an invalid configuration (every error is logged with \
                         its key), a listener that cannot be bound, an unreadable token or \
                         credential file.",
                    ),
                    ("2", "Wrong usage (unknown option, missing argument)."),
                    ("130", "A second SIGTERM or SIGINT during the shutdown."),
                ],
            },
            "svcd-config" | "svcd-config-check" => Sections {
                files: &[CONFIG_FILE],
                environment: config_env(),
                signals: NO_SIGNALS,
                exit_status: &[
                    (
                        "0",
                        "The file is valid (svcd config check prints the effective \
                         configuration), or the default was printed.",
                    ),
                    (
                        "1",
                        "An invalid --set or flag value that is no configuration error.",
                    ),
                    (
                        "2",
                        "The configuration is invalid: every error, each with its key path, \
                         on standard error. Also wrong usage.",
                    ),
                ],
            },
            "svcd-config-default" => Sections {
                files: &[CONFIG_FILE],
                environment: Vec::new(),
                signals: NO_SIGNALS,
                exit_status: LOCAL_EXIT,
            },
            "svcd-list" => client(&[
                ("0", "The listing was printed."),
                (
                    "1",
                    "An error: the daemon is unreachable or refused the request (the reason is \
                     printed).",
                ),
                (
                    "2",
                    "The daemon has not synced with its registry store yet (no listing), or \
                     wrong usage.",
                ),
            ]),
            "svcd-resolve" => client(&[
                ("0", "At least one healthy instance was printed."),
                (
                    "1",
                    "No (healthy) instances, or an error: the daemon is unreachable or refused \
                     the request.",
                ),
                ("2", "Wrong usage (unknown option, missing argument)."),
            ]),
            "svcd-health" => client(&[
                ("0", "/healthz (with --ready: /readyz) answered 200."),
                (
                    "1",
                    "It did not, or the daemon is unreachable: the reason is printed.",
                ),
                ("2", "Wrong usage (unknown option, missing argument)."),
            ]),
            "svcd-watch" => Sections {
                signals: &[(
                    "SIGINT, SIGTERM",
                    "End the watch (it runs until interrupted).",
                )],
                ..client(&[
                    (
                        "1",
                        "An error: the daemon is unreachable or refused the request.",
                    ),
                    ("2", "Wrong usage (unknown option, missing argument)."),
                ])
            },
            "svcd-exec" => Sections {
                signals: &[
                    (
                        "SIGTERM",
                        "Drains the instance (no new work reaches it) and passes SIGTERM to CMD \
                         after --drain-timeout; a second SIGTERM goes through at once.",
                    ),
                    (
                        "SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2",
                        "Passed to CMD (SIGINT and SIGQUIT from the terminal reach CMD \
                         directly, as it shares the foreground process group).",
                    ),
                    (
                        "SIGKILL",
                        "CMD gets SIGTERM from the kernel (parent-death signal); the daemon \
                         drops the registration once renewals stop, after --ttl.",
                    ),
                ],
                ..client(&[
                    (
                        "N",
                        "CMD's exit status; 128+N when a signal N ended it. svcd exec \
                         deregisters the instance before it exits.",
                    ),
                    (
                        "1",
                        "svcd exec could not start CMD, or its arguments were invalid.",
                    ),
                    ("2", "Wrong usage (unknown option, missing argument)."),
                ])
            },
            "svcd-register" | "svcd-deregister" | "svcd-drain" => client(CLIENT_EXIT),
            // version, completions, man: nothing but standard output.
            _ => Sections {
                files: &[],
                environment: Vec::new(),
                signals: NO_SIGNALS,
                exit_status: LOCAL_EXIT,
            },
        }
    }

    fn environment(&self) -> Vec<(String, String)> {
        if self.environment.is_empty() {
            return owned(&[("(none)", "This command reads no environment variable.")]);
        }
        self.environment.clone()
    }
}

/// `svcd run` on SIGHUP, SIGTERM and SIGINT.
const RUN_SIGNALS: &[Item] = &[
    (
        "SIGHUP",
        "Re-reads the configuration file, the token and credential files and the TLS files, and \
         applies what can change live; an invalid file is rejected and the running \
         configuration kept (svcd_config_reloads_total{result=\"failed\"}).",
    ),
    (
        "SIGTERM, SIGINT",
        "Ordered shutdown: /readyz answers 503 and this node's registrations are marked \
         draining; everything serves on for shutdown.readiness_grace; the proxies stop \
         accepting and drain for up to shutdown.drain_timeout while DNS and the admin API still \
         answer; the lease is revoked; exit 0. A second signal exits at once with 130.",
    ),
];

/// The `SVCD_*` variables the configuration layer reads, each with the key it sets.
fn config_env() -> Vec<(String, String)> {
    svcd_config::ENV_OVERRIDES
        .iter()
        .map(|(var, key)| {
            (
                var.to_string(),
                format!("Sets {key}: below the command-line flags, above the configuration file."),
            )
        })
        .collect()
}

fn owned(items: &[Item]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every page the generator writes, as text.
    fn pages() -> (tempfile::TempDir, Vec<(String, String)>) {
        let dir = tempfile::tempdir().unwrap();
        let pages = write_all(dir.path())
            .unwrap()
            .into_iter()
            .map(|p| {
                let name = p.file_stem().unwrap().to_str().unwrap().to_string();
                (name, std::fs::read_to_string(&p).unwrap())
            })
            .collect();
        (dir, pages)
    }

    #[test]
    fn every_page_svcd_1_refers_to_is_generated_with_the_four_sections() {
        let (_dir, pages) = pages();
        let names: Vec<&str> = pages.iter().map(|(n, _)| n.as_str()).collect();
        for want in [
            "svcd",
            "svcd-run",
            "svcd-config",
            "svcd-config-check",
            "svcd-config-default",
            "svcd-register",
            "svcd-exec",
            "svcd-watch",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        assert!(!names.iter().any(|n| n.ends_with("-help")), "{names:?}");
        // Every `svcd-…(1)` a page names is one of the pages.
        let mut references = 0;
        for (name, text) in &pages {
            for (at, _) in text.match_indices("(1)") {
                let start = text[..at]
                    .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '\\'))
                    .map_or(0, |i| i + 1);
                let referred = text[start..at].replace("\\-", "-");
                let referred = referred.strip_prefix("\\fB").unwrap_or(&referred);
                let referred = referred.strip_suffix("\\fR").unwrap_or(referred);
                if referred.starts_with("svcd") {
                    references += 1;
                    assert!(
                        names.contains(&referred),
                        "{name} refers to {referred}(1), which is not generated"
                    );
                }
            }
            for section in [
                ".SH FILES",
                ".SH ENVIRONMENT",
                ".SH SIGNALS",
                ".SH \"EXIT STATUS\"",
            ] {
                assert!(text.contains(section), "{name}: no {section}:\n{text}");
            }
        }
        assert!(references > 2 * pages.len(), "{references} references");
    }

    #[test]
    fn the_pages_say_what_each_command_reads_and_how_it_exits() {
        let (_dir, pages) = pages();
        let page = |n: &str| &pages.iter().find(|(name, _)| name == n).unwrap().1;
        for (var, _) in svcd_config::ENV_OVERRIDES {
            assert!(page("svcd-run").contains(var), "{var}");
        }
        assert!(page("svcd-run").contains("SIGHUP"));
        assert!(page("svcd-list").contains("SVCD_ADMIN_TOKEN_FILE"));
        assert!(page("svcd-exec").contains("128+N"));
        assert!(page("svcd-config-check").contains("key path"));
        // The flags' own variables come from clap (clap_mangen's env feature).
        assert!(
            page("svcd-run").contains("environment variable"),
            "{}",
            page("svcd-run")
        );
    }

    #[test]
    fn man_renders_the_main_page_that_man_can_format() {
        let mut out = Vec::new();
        render_main(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with(".ie") || text.contains(".TH svcd 1"),
            "{text}"
        );
        assert!(text.contains("svcd\\-run(1)"), "{text}");
    }
}
