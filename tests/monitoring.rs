//! What the people on call get besides Marquee itself: the Prometheus alert rules (checked and
//! unit-tested with promtool) and the Grafana dashboard, whose queries must parse and name
//! only metrics Marquee exports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs promtool with `args` in `dir`; fails with how to install it when it is missing.
fn promtool(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "promtool is needed to check the alert rules ({e}): install Debian's prometheus \
                 package (sudo apt-get install --no-install-recommends prometheus), as \
                 scripts/test.sh does"
            )
        });
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "promtool {}:\n{text}", args.join(" "));
    text
}

/// Every metric name Marquee registers: the `"marquee_…"` literals of its source.
fn exported() -> BTreeSet<String> {
    fn walk(dir: &Path, names: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, names);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                names.extend(
                    metric_names(&text)
                        .into_iter()
                        .filter(|n| text.contains(&format!("\"{n}\""))),
                );
            }
        }
    }
    let mut names = BTreeSet::new();
    walk(&root().join("src"), &mut names);
    assert!(
        names.len() > 20,
        "the source registers its metrics: {names:?}"
    );
    names
}

/// The `marquee_…` metric names in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("marquee_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// `name` is exported, directly or as a histogram's series.
fn is_exported(name: &str, exported: &BTreeSet<String>) -> bool {
    ["", "_bucket", "_sum", "_count"].iter().any(|suffix| {
        name.strip_suffix(suffix)
            .is_some_and(|base| exported.contains(base))
    })
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = root().join("prometheus");
    let checked = promtool(&dir, &["check", "rules", "marquee-alerts.yml"]);
    assert!(checked.contains("SUCCESS: 9 rules found"), "{checked}");
    promtool(&dir, &["test", "rules", "marquee-alerts.test.yml"]);
}

#[test]
fn every_alert_names_exported_metrics_and_has_a_runbook() {
    let rules = std::fs::read_to_string(root().join("prometheus/marquee-alerts.yml")).unwrap();
    let exported = exported();
    let code: String = rules
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let used = metric_names(&code);
    assert!(used.len() >= 8, "{used:?}");
    for name in &used {
        assert!(
            is_exported(name, &exported),
            "{name} is not a metric Marquee exports"
        );
    }
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let anchors: BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("### "))
        .map(|h| {
            h.to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect();
    let runbooks: Vec<&str> = code
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook: \"README.md#"))
        .map(|l| l.trim_end_matches('"'))
        .collect();
    assert_eq!(runbooks.len(), 9, "one runbook per alert");
    for anchor in runbooks {
        assert!(
            anchors.contains(anchor),
            "README.md has no section #{anchor}"
        );
    }
}

#[test]
fn the_grafana_dashboard_is_valid_and_queries_only_exported_metrics() {
    let text = std::fs::read_to_string(root().join("grafana/marquee.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let exported = exported();
    let mut exprs = Vec::new();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().unwrap_or_default();
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        assert!(!targets.is_empty(), "panel {title:?} queries something");
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_default();
            let names = metric_names(expr);
            assert!(
                !names.is_empty() || expr.contains("up{"),
                "panel {title:?}: {expr:?} names no Marquee metric"
            );
            for name in &names {
                assert!(
                    is_exported(name, &exported),
                    "panel {title:?}: {name} is not a metric Marquee exports"
                );
            }
            exprs.push(expr.to_string());
        }
    }
    assert!(exprs.len() >= 20, "{} queries", exprs.len());
    // promtool parses each query as a recording rule's expression.
    let dir = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: grafana\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        rules += &format!(
            "      - record: grafana:query{i}\n        expr: {}\n",
            serde_json::to_string(expr).unwrap()
        );
    }
    std::fs::write(dir.path().join("queries.yml"), rules).unwrap();
    promtool(dir.path(), &["check", "rules", "queries.yml"]);
}
