//! Every shipped topology loads and validates; bad topologies fail with messages that name
//! the file, the key and what was expected; `marquee validate` says the same.

use std::path::Path;
use std::process::Command;

use marquee::config::Topology;

#[test]
fn every_shipped_topology_is_valid() {
    let mut checked = 0;
    for entry in std::fs::read_dir("topologies").unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Topology::load(&path).unwrap_or_else(|e| panic!("{e}"));
            checked += 1;
        }
    }
    assert!(checked >= 2, "qos.toml and demo.toml at least");
}

fn error_of(text: &str) -> String {
    Topology::parse(text, Path::new("topologies/broken.toml"))
        .expect_err("the topology is invalid")
        .to_string()
}

const MINIMAL: &str = "name = \"t\"\n[source]\n[qos]\n[state]\ndir = \"x\"\n";

#[test]
fn a_minimal_topology_takes_the_documented_defaults() {
    let t = Topology::parse(MINIMAL, Path::new("t.toml")).unwrap();
    assert_eq!(t.source.topic, "playback-events");
    assert_eq!(t.group_id(), "marquee-t");
    assert_eq!(t.qos.as_ref().unwrap().window.as_secs(), 60);
    assert_eq!(t.qos.as_ref().unwrap().grace.as_secs(), 30);
    assert_eq!(t.sink.topic, "qos-windows");
    assert_eq!(t.sink.late_topic, "qos-late");
    assert_eq!(t.sink.dead_letter_topic, "qos-dead-letter");
}

#[test]
fn unknown_keys_are_named() {
    let e = error_of(&MINIMAL.replace("[qos]\n", "[qos]\nwindow_size = \"1m\"\n"));
    assert!(
        e.contains("topologies/broken.toml") && e.contains("window_size"),
        "{e}"
    );
}

#[test]
fn bad_durations_say_what_was_expected() {
    let e = error_of(&MINIMAL.replace("[qos]\n", "[qos]\ngrace = \"thirty seconds\"\n"));
    assert!(
        e.contains("thirty seconds") && e.contains("such as 500ms, 30s, 5m"),
        "{e}"
    );
    assert!(e.contains("grace"), "names the key: {e}");
}

#[test]
fn missing_fields_are_named() {
    let e = error_of("name = \"t\"\n[source]\n[qos]\n[state]\n");
    assert!(e.contains("dir"), "{e}");
}

#[test]
fn every_semantic_problem_is_reported_at_once() {
    let text = MINIMAL.replace(
        "[qos]\n",
        "[qos]\nwindow = \"7s\"\ngauge_dimensions = [\"title_id\"]\ndimensions = [\"cdn\", \"title_id\"]\n",
    ) + "[sink]\ntopic = \"playback-events\"\n";
    let e = error_of(&text);
    assert!(e.contains("3 problem(s)"), "{e}");
    assert!(e.contains("`qos.window` is 7000ms"), "{e}");
    assert!(e.contains("`title_id`"), "{e}");
    assert!(
        e.contains("`sink.topic` is `playback-events`, the input topic"),
        "{e}"
    );
}

#[test]
fn validate_command_checks_without_running() {
    let ok = Command::new(env!("CARGO_BIN_EXE_marquee"))
        .args(["validate", "topologies/qos.toml"])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("topologies/qos.toml: ok"));

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, MINIMAL.replace("[qos]\n", "[qos]\nwindow = \"0s\"\n")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_marquee"))
        .args(["validate", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml") && stderr.contains("qos.window"),
        "{stderr}"
    );
}

#[test]
fn run_fails_fast_and_clearly_when_kafka_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_marquee"))
        .args([
            "run",
            "topologies/qos.toml",
            "--brokers",
            "127.0.0.1:1",
            "--http",
            "127.0.0.1:0",
        ])
        .args(["--state-dir", dir.path().to_str().unwrap()])
        .env("RUST_LOG", "error,librdkafka=off,rdkafka=off")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("reaching the cluster at 127.0.0.1:1 (is it running and reachable?)"),
        "{stderr}"
    );
}

#[test]
fn a_skew_bound_that_defeats_the_grace_is_rejected() {
    // Defaults: 5s out-of-orderness + 30s grace absorb at most 35s of clock skew.
    let e = error_of(&MINIMAL.replace("[qos]\n", "[time]\nmax_future_skew = \"3m\"\n[qos]\n"));
    assert!(
        e.contains("max_future_skew") && e.contains("35s"),
        "names the key and the bound: {e}"
    );
    let ok = MINIMAL.replace("[qos]\n", "[time]\nmax_future_skew = \"34s\"\n[qos]\n");
    Topology::parse(&ok, Path::new("t.toml")).unwrap();
    let t = Topology::parse(MINIMAL, Path::new("t.toml")).unwrap();
    assert_eq!(t.time.max_future_skew.as_secs(), 30, "the default fits");
}

#[test]
fn topic_settings_must_be_positive() {
    let e = error_of(&MINIMAL.replace("[state]\n", "[sink]\npartitions = 0\n[state]\n"));
    assert!(e.contains("sink.partitions"), "{e}");
}

#[test]
fn a_hopping_advance_must_divide_the_window() {
    let hopping = |advance: &str| {
        MINIMAL.replace(
            "[qos]\n",
            &format!("[qos]\nwindow = \"5m\"\nadvance = \"{advance}\"\n"),
        )
    };
    let t = Topology::parse(&hopping("1m"), Path::new("t.toml")).unwrap();
    assert_eq!(
        t.qos.unwrap().advance,
        Some(std::time::Duration::from_secs(60))
    );
    let e = error_of(&hopping("7s"));
    assert!(
        e.contains("`qos.advance` is 7000ms") && e.contains("divides"),
        "{e}"
    );
    let e = error_of(&hopping("1s"));
    assert!(e.contains("300 windows"), "{e}");
    let e = error_of(&hopping("10m"));
    assert!(e.contains("`qos.advance` is 600000ms"), "{e}");
}

#[test]
fn early_results_need_an_interval_of_at_least_100ms() {
    let early = |interval: &str| {
        MINIMAL.replace(
            "[qos]\n",
            &format!("[qos]\nemit = \"early\"\nearly_interval = \"{interval}\"\n"),
        )
    };
    let t = Topology::parse(&early("2s"), Path::new("t.toml")).unwrap();
    assert_eq!(t.qos.unwrap().emit, marquee::config::EmitPolicy::Early);
    let e = error_of(&early("10ms"));
    assert!(e.contains("`qos.early_interval` is 10ms"), "{e}");
    let e = error_of(&MINIMAL.replace("[qos]\n", "[qos]\nemit = \"sometimes\"\n"));
    assert!(e.contains("sometimes") && e.contains("early"), "{e}");
}

/// Exactly-once holds for every operator, the resume table included.
#[test]
fn exactly_once_is_accepted_with_every_operator() {
    for file in ["topologies/resume.toml", "topologies/qos.toml"] {
        let text = std::fs::read_to_string(file).unwrap()
            + "\n[processing]\nguarantee = \"exactly_once\"\n";
        let topology = marquee::config::Topology::parse(&text, std::path::Path::new(file)).unwrap();
        assert_eq!(
            topology.processing.guarantee,
            marquee::config::Guarantee::ExactlyOnce
        );
    }
}

/// A session timeout shorter than a window can stay open (a new session could begin while the
/// old one's events still arrive) is refused, naming the key and the bound.
#[test]
fn a_session_timeout_shorter_than_a_window_can_stay_open_is_refused() {
    let with = |timeout: &str| {
        MINIMAL.replace(
            "[qos]\n",
            &format!("[qos]\nsession_timeout = \"{timeout}\"\n"),
        )
    };
    let e = error_of(&with("1m"));
    assert!(
        e.contains("`qos.session_timeout` is 1m") && e.contains("95000ms"),
        "{e}"
    );
    Topology::parse(&with("95s"), Path::new("t.toml")).unwrap();
    // Without QoE there are no sessions to time out.
    Topology::parse(
        &with("1m").replace("[qos]\n", "[qos]\nqoe = false\n"),
        Path::new("t.toml"),
    )
    .unwrap();
}

/// DAU settings: a running value at most every second, and a skew bound its grace absorbs.
#[test]
fn dau_settings_are_checked_with_their_keys() {
    let dau = |extra: &str| format!("{MINIMAL}[dau]\n{extra}");
    let t = Topology::parse(&dau(""), Path::new("t.toml")).unwrap();
    assert_eq!(t.dau.as_ref().unwrap().topic, "daily-active");
    let e = error_of(&dau("interval = \"500ms\"\n"));
    assert!(e.contains("`dau.interval` is 500ms"), "{e}");
    let e = error_of(&dau("grace = \"1s\"\n"));
    assert!(e.contains("`dau.grace`"), "{e}");
    let e = error_of(&dau("counting = \"approximately\"\n"));
    assert!(e.contains("approximately"), "{e}");
}

/// `marquee` with `args` and `env`, its output captured (a pipe, as when redirected to a file).
fn marquee(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_marquee"));
    command.args(args).env_remove("NO_COLOR");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().unwrap()
}

#[test]
fn a_mistake_in_a_topology_is_one_message_without_a_stack_trace() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, MINIMAL.replace("[qos]\n", "[qos]\nwindow = \"0s\"\n")).unwrap();
    // Set on many Rust developers' machines: it is for panics, not for the user's mistakes.
    let out = marquee(
        &["validate", bad.to_str().unwrap()],
        &[("RUST_BACKTRACE", "1")],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains("qos.window"), "{stderr}");
    assert!(
        !stderr.contains("backtrace") && stderr.lines().count() <= 4,
        "no stack trace under the message:\n{stderr}"
    );
}

#[test]
fn logs_written_to_a_file_carry_no_colour_codes_and_json_logs_parse() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_str().unwrap();
    let run = |format: &str| {
        marquee(
            &[
                "run",
                "topologies/qos.toml",
                "--brokers",
                "127.0.0.1:1",
                "--http",
                "127.0.0.1:0",
                "--state-dir",
                state,
                "--log-format",
                format,
            ],
            &[("RUST_LOG", "info,librdkafka=off,rdkafka=off")],
        )
    };
    let text = run("text");
    let stderr = String::from_utf8_lossy(&text.stderr);
    assert!(!text.status.success());
    assert!(stderr.contains("INFO"), "log lines are written: {stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "no terminal codes in a file:\n{stderr}"
    );

    let json = run("json");
    assert!(!json.status.success());
    let stderr = String::from_utf8_lossy(&json.stderr);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert!(lines.len() >= 2, "{stderr}");
    for line in &lines {
        assert!(
            line["timestamp"].is_string() && line["level"].is_string(),
            "{line}"
        );
    }
    let last = lines.last().unwrap();
    assert_eq!(last["level"], "ERROR");
    assert!(
        last["error"]
            .as_str()
            .unwrap_or_default()
            .contains("127.0.0.1:1"),
        "the error that stopped it is the last line: {last}"
    );
}

#[test]
fn logs_on_a_terminal_are_coloured_unless_no_color_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let command = format!(
        "{} run topologies/qos.toml --brokers 127.0.0.1:1 --http 127.0.0.1:0 --state-dir {}",
        env!("CARGO_BIN_EXE_marquee"),
        dir.path().display()
    );
    // `script` runs the command on a pseudo-terminal and copies what it shows to stdout.
    let on_a_terminal = |no_color: Option<&str>| {
        let mut script = Command::new("script");
        script
            .args(["-qec", &command, "/dev/null"])
            .env("RUST_LOG", "info,librdkafka=off,rdkafka=off")
            .env_remove("NO_COLOR");
        if let Some(v) = no_color {
            script.env("NO_COLOR", v);
        }
        let out = script.output().unwrap_or_else(|e| {
            panic!("`script` (util-linux) runs marquee on a terminal: install util-linux ({e})")
        });
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let coloured = on_a_terminal(None);
    assert!(coloured.contains("INFO"), "{coloured}");
    assert!(
        coloured.contains("\x1b["),
        "colour on a terminal:\n{coloured}"
    );
    let plain = on_a_terminal(Some("1"));
    assert!(plain.contains("INFO"), "{plain}");
    assert!(
        !plain.contains("\x1b["),
        "NO_COLOR turns colour off:\n{plain}"
    );
}
