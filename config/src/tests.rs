//! Inline-TOML tests for defaults, validation (many errors at once) and precedence.

use std::collections::HashMap;
use std::time::Duration;

use crate::*;

fn errors_of(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e.lines(),
    }
}

/// The key path each error names.
fn error_keys(errors: &[String]) -> Vec<&str> {
    errors
        .iter()
        .map(|e| e.split(':').next().unwrap())
        .collect()
}

#[test]
fn empty_file_gives_useful_defaults() {
    let c = parse("").unwrap();
    assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9901");
    assert_eq!(c.dns.listen, vec!["127.0.0.1:8600".parse().unwrap()]);
    assert_eq!(c.proxy.http.len(), 1);
    assert_eq!(c.proxy.http[0].listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.registry.backend, Backend::Embedded);
    assert_eq!(c.registry.lease_ttl, Duration::from_secs(10));
    assert_eq!(c.shutdown.drain_timeout, Duration::from_secs(10));
    assert_eq!(c.dns.domain, "cluster.local");
    assert_eq!(c.dns.max_answers, 20);
    assert_eq!(c.log.format, LogFormat::Human);
    // Nothing non-loopback by default.
    assert!(matches!(c.admin.listen, AdminListen::Tcp(a) if a.ip().is_loopback()));
    assert_eq!(c.admin.metrics_listen, None);
    assert!(c.dns.listen.iter().all(|a| a.ip().is_loopback()));
    assert!(c.proxy.http.iter().all(|l| l.listen.ip().is_loopback()));
}

#[test]
fn default_file_parses_to_defaults() {
    assert_eq!(parse(DEFAULT_CONFIG_TOML).unwrap(), Config::default());
}

#[test]
fn example_file_in_docs_is_the_default_file() {
    let example = include_str!("../../docs/svcd.example.toml");
    assert_eq!(
        example, DEFAULT_CONFIG_TOML,
        "docs/svcd.example.toml is stale: regenerate with `svcd config default > docs/svcd.example.toml`"
    );
}

#[test]
fn every_error_reported_at_once_with_key_paths() {
    let errors = errors_of(
        r#"
        [admin]
        listen = "nope"
        [dns]
        ttl = "5 parsecs"
        max_answers = 0
        [[proxy.http]]
        listen = "127.0.0.1:8081"
        [[proxy.http]]
        listen = "x:99999"
        [registry]
        backend = "zookeeper"
        [shutdown]
        drain_timeout = "0s"
        [log]
        format = "xml"
        "#,
    );
    let expect = [
        "admin.listen: invalid socket address \"nope\"",
        "dns.ttl: invalid duration \"5 parsecs\"",
        "dns.max_answers: 0 is out of range 1..=1000",
        "proxy.http[1].listen: invalid socket address \"x:99999\"",
        "registry.backend: \"zookeeper\" is not one of",
        "shutdown.drain_timeout: \"0s\" must be greater than zero",
        "log.format: \"xml\" is not one of",
    ];
    for e in expect {
        assert!(
            errors.iter().any(|line| line.starts_with(e)),
            "missing {e:?} in {errors:#?}"
        );
    }
    assert_eq!(errors.len(), expect.len(), "{errors:#?}");
}

#[test]
fn unknown_key_is_an_error_naming_the_key() {
    // Every unknown key at once, with the validation errors of the rest.
    let errors = errors_of(
        "[dns]\nlisen = \"127.0.0.1:53\"\nmax_answers = 0\n\
         [[proxy.http]]\nlisten = \"127.0.0.1:1\"\nroute = 1\n[registry.etcd]\ntls = { ca = \"/c\", crt = \"/x\" }\n",
    );
    assert_eq!(
        errors,
        vec![
            "dns.lisen: unknown key; did you mean \"listen\"?",
            "proxy.http[0].route: unknown key; expected one of: listen, tls",
            "registry.etcd.tls.crt: unknown key; did you mean \"cert\"?",
            "dns.max_answers: 0 is out of range 1..=1000",
        ],
        "{errors:?}"
    );
}

#[test]
fn wrong_type_is_an_error_naming_the_key() {
    let e = parse("[dns]\nmax_answers = \"many\"\n").unwrap_err();
    assert!(e.to_string().starts_with("dns.max_answers"), "{e}");
}

#[test]
fn not_toml_is_an_error() {
    assert!(matches!(parse("[admin\n"), Err(ConfigError::Syntax { .. })));
}

#[test]
fn non_loopback_admin_needs_token() {
    let errors = errors_of("[admin]\nlisten = \"0.0.0.0:9901\"\n");
    assert!(errors[0].contains("admin.token_file"), "{errors:?}");
    parse("[admin]\nlisten = \"0.0.0.0:9901\"\ntoken_file = \"/tmp/t\"\n").unwrap();
}

#[test]
fn etcd_backend_needs_endpoints_and_endpoints_imply_etcd() {
    let errors = errors_of("[registry]\nbackend = \"etcd\"\n");
    assert!(
        errors[0].starts_with("registry.etcd.endpoints: required"),
        "{errors:?}"
    );
    let c = parse("[registry.etcd]\nendpoints = [\"127.0.0.1:2379\"]\n").unwrap();
    assert_eq!(c.registry.backend, Backend::Etcd);
    let errors =
        errors_of("[registry.etcd]\nendpoints = [\"127.0.0.1\", \"http://h:2379\", \"h:0\"]\n");
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].starts_with("registry.etcd.endpoints[0]"));
    assert!(errors[1].starts_with("registry.etcd.endpoints[2]"));
}

#[test]
fn etcd_credentials_and_tls_are_checked_with_key_paths() {
    let c = parse(
        r#"
        [registry]
        read_only = true
        [registry.etcd]
        endpoints = ["etcd-1:2379"]
        username = "svcd"
        password_file = "/etc/svcd/etcd-password"
        [registry.etcd.tls]
        ca = "/etc/svcd/ca.pem"
        cert = "/etc/svcd/client.pem"
        key = "/etc/svcd/client-key.pem"
        server_name = "etcd.internal"
        "#,
    )
    .unwrap();
    assert!(c.registry.read_only);
    let tls = c.registry.etcd.tls.as_ref().unwrap();
    assert_eq!(tls.server_name.as_deref(), Some("etcd.internal"));
    assert_eq!(
        c.registry.etcd.password_file.as_deref(),
        Some(std::path::Path::new("/etc/svcd/etcd-password"))
    );

    let errors = errors_of(
        r#"
        [registry]
        read_only = true
        [[registry.static]]
        service = "db"
        id = "db-1"
        ip = "10.0.0.9"
        [registry.etcd]
        endpoints = ["http://etcd-1:2379"]
        username = "svcd"
        password = "x"
        password_file = "/p"
        [registry.etcd.tls]
        cert = "/c.pem"
        "#,
    );
    let keys = error_keys(&errors);
    assert_eq!(
        keys,
        vec![
            "registry.etcd.tls.key",
            "registry.etcd.tls.ca",
            "registry.etcd.password_file",
            "registry.static",
        ],
        "{errors:?}"
    );
    // TLS set: a plaintext endpoint is a mistake, not a silent downgrade.
    let errors =
        errors_of("[registry.etcd]\nendpoints = [\"http://e:2379\"]\ntls = { ca = \"/ca.pem\" }\n");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("plaintext"), "{errors:?}");
    let errors = errors_of("[registry.etcd]\nendpoints = [\"e:2379\"]\nusername = \"u\"\n");
    assert!(errors[0].starts_with("registry.etcd.password: username needs a password"));
}

#[test]
fn admin_listens_on_tcp_or_a_unix_socket_and_metrics_on_their_own_port() {
    let c = parse(
        "[admin]\nlisten = \"unix:/run/svcd/admin.sock\"\nmetrics_listen = \"0.0.0.0:9902\"\n",
    )
    .unwrap();
    assert_eq!(
        c.admin.listen,
        AdminListen::Unix("/run/svcd/admin.sock".into())
    );
    assert_eq!(c.admin.listen.to_string(), "unix:/run/svcd/admin.sock");
    assert_eq!(
        c.admin.metrics_listen,
        Some("0.0.0.0:9902".parse().unwrap())
    );
    let errors = errors_of(
        "[admin]\nlisten = \"unix:relative.sock\"\nmetrics_listen = \"127.0.0.1:8600\"\n",
    );
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0]
        .starts_with("admin.listen: \"unix:relative.sock\": the socket path must be absolute"));
    assert!(
        errors[1].starts_with("admin.metrics_listen: 127.0.0.1:8600 is already used by dns.listen"),
        "{errors:?}"
    );
}

#[test]
fn dns_abuse_limits_have_defaults_and_ranges() {
    let c = parse("").unwrap();
    assert_eq!(c.dns.rrl.rate, 0, "off by default");
    assert_eq!(
        (c.dns.rrl.slip, c.dns.rrl.ipv4_prefix, c.dns.rrl.ipv6_prefix),
        (2, 24, 56)
    );
    assert_eq!(
        (c.dns.tcp.max_connections, c.dns.tcp.max_per_client),
        (1024, 16)
    );
    let errors = errors_of(
        "[dns.rrl]\nipv4_prefix = 33\n[dns.tcp]\nmax_connections = 4\nmax_per_client = 8\nbogus = 1\n",
    );
    assert_eq!(errors.len(), 3, "{errors:?}"); // the unknown key and both checks
    assert_eq!(
        errors[0],
        "dns.tcp.bogus: unknown key; expected one of: max_connections, max_per_client, idle_timeout"
    );
    let errors = errors_of(
        "[dns.rrl]\nipv4_prefix = 33\n[dns.tcp]\nmax_connections = 4\nmax_per_client = 8\n",
    );
    let keys = error_keys(&errors);
    assert_eq!(
        keys,
        vec!["dns.rrl.ipv4_prefix", "dns.tcp.max_per_client"],
        "{errors:?}"
    );
}

#[test]
fn dns_forwarding_bounds_are_checked_with_their_keys() {
    let c = Config::default();
    assert_eq!(
        (
            c.dns.forwarding.max_in_flight,
            c.dns.forwarding.max_in_flight_per_worker,
            c.dns.forwarding.timeout
        ),
        (256, 128, Duration::from_secs(1))
    );
    // Unset, the per-worker bound follows a smaller total.
    let c = parse("[dns.forwarding]\nmax_in_flight = 20\n").unwrap();
    assert_eq!(c.dns.forwarding.max_in_flight_per_worker, 20);
    let errors = errors_of(
        "[dns.forwarding]\nmax_in_flight = 0\nmax_in_flight_per_worker = 300\ntimeout = \"1m\"\nbogus = 1\n",
    );
    assert!(
        errors[0].starts_with("dns.forwarding.bogus: unknown key"),
        "{errors:?}"
    );
    let errors = errors_of(
        "[dns.forwarding]\nmax_in_flight = 0\nmax_in_flight_per_worker = 300\ntimeout = \"1m\"\n",
    );
    assert_eq!(
        error_keys(&errors),
        vec![
            "dns.forwarding.max_in_flight",
            "dns.forwarding.max_in_flight_per_worker",
            "dns.forwarding.timeout"
        ],
        "{errors:?}"
    );
    let errors = errors_of("[dns.forwarding]\nmax_in_flight = 10\nmax_in_flight_per_worker = 11\n");
    assert_eq!(
        errors,
        vec!["dns.forwarding.max_in_flight_per_worker: 11 is more than dns.forwarding.max_in_flight (10)"]
    );
}

#[test]
fn port_clash_names_both_keys() {
    let errors = errors_of("[dns]\nlisten = \"127.0.0.1:9901\"\n");
    assert_eq!(
        errors,
        vec!["dns.listen: 127.0.0.1:9901 is already used by admin.listen"]
    );
}

#[test]
fn static_instances_parse_and_report_paths() {
    let c = parse(
        r#"
        [[registry.static]]
        service = "db.prod"
        id = "db-1"
        ip = "10.0.0.9"
        ports = { postgres = 5432 }
        "#,
    )
    .unwrap();
    let s = &c.registry.static_instances[0];
    assert_eq!(
        (s.service.as_str(), s.namespace.as_str(), s.id.as_str()),
        ("db", "prod", "db-1")
    );
    assert_eq!(s.instance.ports["postgres"], 5432);

    let errors = errors_of(
        r#"
        [[registry.static]]
        service = "db"
        id = "db-1"
        ip = "10.0.0.9"
        [[registry.static]]
        service = "Bad"
        id = "x_y"
        ip = "10.0.0.9"
        ports = { HTTP = 80 }
        [[registry.static]]
        service = "db"
        id = "ok"
        ip = "not-an-ip"
        [[registry.static]]
        service = "db"
        id = "db-3"
        ip = "10.0.0.9"
        state = "pending"
        "#,
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("registry.static[1].service")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("registry.static[1].id")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("registry.static[1].ports.HTTP")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("registry.static[2].ip")),
        "{errors:?}"
    );
    // `pending` is the daemon's to write, not a registration's.
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("registry.static[3].state")),
        "{errors:?}"
    );
    assert_eq!(errors.len(), 5, "{errors:?}");
}

#[test]
fn precedence_cli_over_env_over_file_over_default() {
    let file = "[admin]\nlisten = \"127.0.0.1:1001\"\n[dns]\nlisten = \"127.0.0.1:1002\"\n[log]\nlevel = \"warn\"\n";
    let env: HashMap<String, String> = [
        ("SVCD_DNS_LISTEN", "127.0.0.1:2002"),
        ("SVCD_LOG_LEVEL", "debug"),
        ("SVCD_ETCD_ENDPOINTS", "127.0.0.1:2379, 127.0.0.1:22379"),
        ("SVCD_HTTP_LISTEN", "127.0.0.1:3001,127.0.0.1:3002"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let cli = vec![
        Override::known("log.level", "trace"),
        Override::parse_set("dns.max_answers=7").unwrap(),
    ];
    let c = Sources::new()
        .file_text(file)
        .env(env)
        .cli(cli)
        .load()
        .unwrap();
    assert_eq!(c.admin.listen.to_string(), "127.0.0.1:1001"); // file
    assert_eq!(c.dns.listen, vec!["127.0.0.1:2002".parse().unwrap()]); // env over file
    assert_eq!(c.log.level, "trace"); // cli over env over file
    assert_eq!(c.dns.max_answers, 7); // cli --set, typed
    assert_eq!(c.dns.ttl, Duration::from_secs(5)); // default
    assert_eq!(c.registry.backend, Backend::Etcd);
    assert_eq!(
        c.registry.etcd.endpoints,
        vec!["127.0.0.1:2379", "127.0.0.1:22379"]
    );
    assert_eq!(c.proxy.http.len(), 2);
}

#[test]
fn override_errors_use_the_same_key_paths() {
    let e = Sources::new()
        .cli(vec![Override::known("admin.listen", "bogus")])
        .load()
        .unwrap_err();
    assert!(
        e.lines()[0].starts_with("admin.listen: invalid socket address"),
        "{e}"
    );
    assert!(Override::parse_set("novalue").is_err());
    assert!(Override::parse_set("a..b=1").is_err());
    let o = Override::parse_set("dns.domain=example.org").unwrap();
    assert_eq!(o.value, toml::Value::String("example.org".into()));
}

#[test]
fn effective_config_redacts_secrets() {
    let c = parse(
        "[registry.etcd]\nendpoints = [\"h:2379\"]\nusername = \"u\"\npassword = \"hunter2\"\n",
    )
    .unwrap();
    let text = c.to_toml();
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("<redacted>"), "{text}");
    assert!(text.contains("drain_timeout = \"10s\""), "{text}");
}

#[test]
fn proxy_listeners_parse_and_report_paths() {
    let c = parse(
        r#"
        [proxy]
        max_connections = 5
        splice = false
        [[proxy.tcp]]
        listen = "127.0.0.1:15432"
        service = "db"
        port = "postgres"
        [[proxy.udp]]
        listen = "127.0.0.1:15353"
        service = "dns-cache.infra"
        "#,
    )
    .unwrap();
    assert_eq!(c.proxy.max_connections, 5);
    assert!(!c.proxy.splice);
    assert_eq!(c.proxy.tcp[0].target.as_ref().unwrap().namespace, "default");
    assert_eq!(
        c.proxy.tcp[0].target.as_ref().unwrap().port.as_deref(),
        Some("postgres")
    );
    assert_eq!(c.proxy.tcp[0].idle_timeout, Duration::from_secs(3600));
    assert_eq!(c.proxy.udp[0].target.as_ref().unwrap().namespace, "infra");
    assert_eq!(c.proxy.udp[0].idle_timeout, Duration::from_secs(30));

    let errors = errors_of(
        r#"
        [[proxy.tcp]]
        listen = "127.0.0.1:8600"
        service = "Db"
        port = "PG"
        [[proxy.tcp]]
        service = "db"
        [[proxy.udp]]
        listen = "127.0.0.1:8600"
        "#,
    );
    for e in [
        "proxy.tcp[0].service",
        "proxy.tcp[0].port",
        "proxy.tcp[1].listen: missing",
        "proxy.udp[0].service: missing",
        "proxy.udp[0].listen: 127.0.0.1:8600 is already used by dns.listen",
    ] {
        assert!(
            errors.iter().any(|line| line.starts_with(e)),
            "missing {e:?} in {errors:#?}"
        );
    }
}

#[test]
fn http_routes_balance_and_outlier_settings_checked_with_key_paths() {
    let c = parse(
        r#"
[[proxy.routes]]
host = "API.example.com"
path_prefix = "/v1"
service = "api.prod"
timeout = "2s"
retries = 0
[proxy.l7]
balance = "least_request"
balance_by_service = { "web" = "round_robin" }
[proxy.outlier]
consecutive_failures = 0
panic_mode = "fail"
"#,
    )
    .unwrap();
    let r = &c.proxy.routes[0];
    assert_eq!(
        (r.host.as_str(), r.path_prefix.as_str()),
        ("api.example.com", "/v1")
    );
    assert_eq!(
        (r.target.service.as_str(), r.target.namespace.as_str()),
        ("api", "prod")
    );
    assert_eq!(
        (r.timeout, r.retries),
        (Some(Duration::from_secs(2)), Some(0))
    );
    assert_eq!(c.proxy.l7.balance, crate::Balance::LeastRequest);
    assert_eq!(
        c.proxy.l7.balance_by_service.get("web.default"),
        Some(&crate::Balance::RoundRobin)
    );
    assert_eq!(c.proxy.outlier.consecutive_failures, 0);
    assert_eq!(c.proxy.outlier.panic_mode, crate::PanicMode::Fail);

    let errors = errors_of(
        r#"
[[proxy.routes]]
host = "a b"
path_prefix = "v1"
[[proxy.routes]]
host = "x"
service = "Bad_Name"
timeout = "soon"
retries = 99
[proxy.l7]
balance = "random"
balance_by_service = { "-x" = "least_request", "ok" = "fastest" }
max_header_bytes = 10
[proxy.outlier]
max_ejection_percent = 101
panic_mode = "yolo"
"#,
    );
    for want in [
        "proxy.routes[0].host: invalid host",
        "proxy.routes[0].path_prefix: \"v1\" must start with \"/\"",
        "proxy.routes[0].service: missing",
        "proxy.routes[1].service: service",
        "proxy.routes[1].timeout: invalid duration",
        "proxy.routes[1].retries: 99 is out of range",
        "proxy.l7.balance: unknown balance \"random\"",
        "proxy.l7.balance_by_service.-x: service",
        "proxy.l7.balance_by_service.ok: unknown balance \"fastest\"",
        "proxy.l7.max_header_bytes: 10 is out of range",
        "proxy.outlier.max_ejection_percent: 101 is out of range",
        "proxy.outlier.panic_mode: unknown panic mode \"yolo\"",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(want)),
            "missing {want:?} in {errors:#?}"
        );
    }
}

#[test]
fn request_timeouts_are_bounded_by_the_histogram_buckets() {
    let errors = errors_of(
        "[proxy.l7]\nrequest_timeout = \"10m\"\n[[proxy.routes]]\nhost = \"a\"\nservice = \"a.default\"\ntimeout = \"301s\"\n",
    );
    assert_eq!(
        errors,
        [
            "proxy.routes[0].timeout: \"301s\" is longer than the maximum of 5m",
            "proxy.l7.request_timeout: \"10m\" is longer than the maximum of 5m",
        ]
    );
    let c = crate::parse(
        "[proxy.l7]\nrequest_timeout = \"5m\"\n[admin]\nendpoint_state_series = true\n",
    )
    .unwrap();
    assert_eq!(
        c.proxy.l7.request_timeout,
        std::time::Duration::from_secs(300)
    );
    assert!(c.admin.endpoint_state_series);
    assert!(!crate::Config::default().admin.endpoint_state_series);
}

#[test]
fn max_flows_belongs_to_udp_listeners() {
    let errors = errors_of(
        "[[proxy.tcp]]\nlisten = \"127.0.0.1:1\"\nservice = \"a\"\nmax_flows = 5\n\
         [[proxy.udp]]\nlisten = \"127.0.0.1:2\"\nservice = \"b\"\nmax_flows = 0\n",
    );
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].starts_with("proxy.tcp[0].max_flows: only UDP listeners"),
        "{errors:?}"
    );
    assert!(
        errors[1].starts_with("proxy.udp[0].max_flows:"),
        "{errors:?}"
    );
    let c = crate::parse("[[proxy.udp]]\nlisten = \"127.0.0.1:2\"\nservice = \"b\"\n").unwrap();
    assert_eq!(c.proxy.udp[0].max_flows, Some(crate::DEFAULT_MAX_FLOWS));
}

#[test]
fn a_registration_is_one_json_object_of_at_most_64_kib() {
    assert!(crate::Instance::from_json(br#" {"ip":"10.0.0.1"}"#).is_ok());
    let array = crate::Instance::from_json(br#"["10.0.0.1"]"#).unwrap_err();
    assert_eq!(array.message, "a registration is a JSON object");
    let huge = format!(
        r#"{{"ip":"10.0.0.1","meta":{{"m":"{}"}}}}"#,
        "x".repeat(64 * 1024)
    );
    let e = crate::Instance::from_json(huge.as_bytes()).unwrap_err();
    assert!(e.message.contains("over the 64 KiB limit"), "{}", e.message);
}

#[test]
fn consul_is_off_by_default_and_checked_with_key_paths() {
    let c = parse("").unwrap().consul;
    assert!(!c.enabled());
    assert_eq!(
        (
            c.dns_domain.as_str(),
            c.datacenter.as_str(),
            c.port_name.as_str()
        ),
        ("consul", "dc1", "http")
    );
    assert_eq!(c.max_blocking_queries, 4096);
    let c = parse("[consul]\nlisten = \"127.0.0.1:8500\"\ndns_domain = \"Discovery.\"\n")
        .unwrap()
        .consul;
    assert!(c.enabled());
    assert_eq!(c.dns_domain, "discovery");

    // Every error at once, each with its key path.
    let errors = errors_of(
        "[consul]\nlisten = \"0.0.0.0:8500\"\ndns_domain = \"a_b\"\ndatacenter = \"DC 1\"\n\
         port_name = \"a-very-long-port-name\"\nmax_blocking_queries = 0\n",
    );
    assert_eq!(
        error_keys(&errors),
        [
            "consul.listen",
            "consul.dns_domain",
            "consul.datacenter",
            "consul.port_name",
            "consul.max_blocking_queries"
        ],
        "{errors:?}"
    );
    assert!(errors[0].contains("admin.token_file"), "{errors:?}");
    parse("[admin]\ntoken_file = \"/tmp/t\"\n[consul]\nlisten = \"0.0.0.0:8500\"\n").unwrap();

    // A clash with another listener names both keys; a typo gets the closest key.
    let errors = errors_of("[consul]\nlisten = \"127.0.0.1:9901\"\n");
    assert!(
        errors[0].starts_with("consul.listen: 127.0.0.1:9901 is already used by admin.listen"),
        "{errors:?}"
    );
    let errors = errors_of("[consul]\nlisen = \"127.0.0.1:8500\"\n");
    assert!(errors[0].contains("did you mean \"listen\""), "{errors:?}");
}

#[test]
fn tls_tables_report_every_shape_error_with_its_key() {
    let errors = errors_of(
        r#"
        [admin]
        listen = "unix:/run/svcd/admin.sock"
        [admin.tls]
        cert = "/etc/a.crt"
        key = "/etc/a.key"
        [[proxy.http]]
        listen = "127.0.0.1:8443"
        [proxy.http.tls]
        cert = "/etc/web.crt"
        certs = [{ cert = "/etc/b.crt" }]
        allow = ["spiffe://td/ns/default/svc/web", "has space"]
        handshake_timeout = "0s"
        [[proxy.http]]
        listen = "127.0.0.1:8444"
        [proxy.http.tls]
        client_ca = ""
        "#,
    );
    assert_eq!(
        errors,
        [
            "admin.tls: TLS needs a TCP admin.listen (a unix socket is guarded by its file mode); for HTTPS on admin.metrics_listen alone use admin.metrics_tls",
            "proxy.http[0].tls.key: missing",
            "proxy.http[0].tls.certs[0].key: missing",
            "proxy.http[0].tls.allow[1]: invalid identity \"has space\" (a URI SAN such as spiffe://td/ns/default/svc/web, or a DNS name)",
            "proxy.http[0].tls.allow: needs client_ca: identities come from verified client certificates",
            "proxy.http[0].tls.handshake_timeout: \"0s\" must be greater than zero",
            "proxy.http[1].tls.cert: missing: a TLS listener needs `cert` and `key`, or `certs = [{ cert, key }, …]`",
            "proxy.http[1].tls.client_ca: must be a file path (PEM)",
        ]
    );
    // Client certificates stand in for a token off loopback.
    let ok = crate::parse(
        r#"
        [admin]
        listen = "0.0.0.0:9901"
        [admin.tls]
        cert = "/etc/a.crt"
        key = "/etc/a.key"
        client_ca = "/etc/ca.pem"
        "#,
    );
    assert!(ok.is_ok(), "{ok:?}");
}

/// `admin.metrics_tls` is the metrics listener's own table: checked as any `tls` table, only
/// with `metrics_listen`, and it serves there in place of `admin.tls`, even when the API is a
/// unix socket.
#[test]
fn the_metrics_listener_takes_its_own_tls_table() {
    let errors = errors_of(
        r#"
        [admin.metrics_tls]
        cert = "/etc/m.crt"
        "#,
    );
    assert_eq!(
        errors,
        [
            "admin.metrics_tls.key: missing",
            "admin.metrics_tls: is the metrics listener's TLS; set admin.metrics_listen too",
        ]
    );
    let config = crate::parse(
        r#"
        [admin]
        listen = "unix:/run/svcd/admin.sock"
        metrics_listen = "0.0.0.0:9902"
        [admin.metrics_tls]
        cert = "/etc/m.crt"
        key = "/etc/m.key"
        client_ca = "/etc/prometheus-ca.pem"
        "#,
    )
    .unwrap();
    let (spec, key) = config.admin.scrape_tls().unwrap();
    assert_eq!(key, "admin.metrics_tls");
    assert_eq!(spec.certs[0].cert, std::path::Path::new("/etc/m.crt"));
    assert!(config.admin.tls.is_none());
    // Without its own table the metrics listener serves the API's.
    let config = crate::parse(
        r#"
        [admin]
        metrics_listen = "127.0.0.1:9902"
        [admin.tls]
        cert = "/etc/a.crt"
        key = "/etc/a.key"
        "#,
    )
    .unwrap();
    assert_eq!(config.admin.scrape_tls().unwrap().1, "admin.tls");
}

#[test]
fn sni_routes_are_checked_and_make_the_listeners_service_optional() {
    let errors = errors_of(
        r#"
        [[proxy.tcp]]
        listen = "127.0.0.1:8443"
        port = "https"
        [[proxy.tcp.sni]]
        name = "a.example"
        service = "a"
        [[proxy.tcp.sni]]
        name = "A.example"
        service = "b"
        [[proxy.tcp.sni]]
        name = "bad name"
        [[proxy.udp]]
        listen = "127.0.0.1:5353"
        service = "dns"
        [[proxy.udp.sni]]
        name = "x.example"
        service = "x"
        "#,
    );
    assert_eq!(
        errors,
        [
            "proxy.tcp[0].sni[1].name: \"a.example\" is listed twice",
            "proxy.tcp[0].sni[2].name: invalid name \"bad name\" (a DNS name, or *.<name> for one label under it)",
            "proxy.tcp[0].sni[2].service: missing (\"<svc>\" or \"<svc>.<ns>\")",
            "proxy.tcp[0].port: needs service",
            "proxy.udp[0].sni: only TCP listeners route by SNI (TLS runs over TCP)",
        ]
    );
    let c = crate::parse(
        r#"
        [[proxy.tcp]]
        listen = "127.0.0.1:8443"
        [[proxy.tcp.sni]]
        name = "*.Example.com"
        service = "web.prod"
        port = "https"
        [[proxy.tcp.sni]]
        name = "api.example.com"
        service = "api"
        "#,
    )
    .unwrap();
    let l = &c.proxy.tcp[0];
    assert!(l.target.is_none());
    assert_eq!(l.sni[0].name, "*.example.com");
    assert_eq!(l.sni[0].target.namespace, "prod");
    assert_eq!(l.sni_route(Some("api.example.com")), Some(1), "exact wins");
    assert_eq!(l.sni_route(Some("www.example.com")), Some(0));
    assert_eq!(l.sni_route(Some("a.b.example.com")), None);
    assert_eq!(l.sni_route(None), None);
}

#[test]
fn upstream_tls_entries_are_checked_and_name_the_service_by_default() {
    let errors = errors_of(
        r#"
        [[proxy.upstream_tls]]
        service = "web"
        cert = "/etc/node.crt"
        [[proxy.upstream_tls]]
        service = "web.default"
        ca = "/etc/ca.pem"
        server_name = "has space"
        "#,
    );
    assert_eq!(
        errors,
        [
            "proxy.upstream_tls[0].ca: missing",
            "proxy.upstream_tls[0].key: missing",
            "proxy.upstream_tls[1].service: web.default is listed twice",
            "proxy.upstream_tls[1].server_name: invalid name \"has space\" (a DNS name or an IP address)",
        ]
    );
    let c = crate::parse(
        r#"
        [dns]
        domain = "corp.local"
        [[proxy.upstream_tls]]
        service = "api.prod"
        ca = "/etc/ca.pem"
        "#,
    )
    .unwrap();
    assert_eq!(
        c.proxy.upstream_tls[0].server_name,
        "api.prod.svc.corp.local"
    );
}

#[test]
fn xds_is_off_by_default_and_checked_with_key_paths() {
    let x = parse("").unwrap().xds;
    assert_eq!(x.listen, None);
    assert_eq!((x.max_streams, x.max_names), (4096, 100_000));
    let x = parse("[xds]\nlisten = \"unix:/run/svcd/xds.sock\"\nmax_streams = 10\n")
        .unwrap()
        .xds;
    assert_eq!(
        x.listen,
        Some(crate::AdminListen::Unix("/run/svcd/xds.sock".into()))
    );
    assert_eq!(x.max_streams, 10);

    // Every error at once, each with its key path.
    let errors = errors_of(
        "[xds]\nlisten = \"nowhere\"\nmax_streams = 0\nmax_names = -1\n[xds.tls]\ncert = \"/c\"\nkey = \"/k\"\n",
    );
    assert_eq!(
        error_keys(&errors),
        ["xds.listen", "xds.tls", "xds.max_streams", "xds.max_names"],
        "{errors:?}"
    );
    let errors = errors_of("[xds]\nlisten = \"127.0.0.1:9901\"\n");
    assert!(
        errors[0].starts_with("xds.listen: 127.0.0.1:9901 is already used by admin.listen"),
        "{errors:?}"
    );
    let errors = errors_of("[xds]\nlisen = \"127.0.0.1:18000\"\n");
    assert!(errors[0].contains("did you mean \"listen\""), "{errors:?}");
}
